"""The embedded broker (core.fs_broker): a consumer never reads a message still being written, each
message is taken by exactly one consumer, a message outlives a consumer that dies before acknowledging
it, and Celery's producer publishes through this transport."""
from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from queue import Empty

import pytest
from kombu import Connection

from core.fs_broker import CLAIMED_FOLDER, UNREADABLE_FOLDER, Transport, parse_claim_name, process_identity

REPO_ROOT = Path(__file__).resolve().parents[3]


def channel(folder: Path):
    connection = Connection("filesystem://", transport=Transport, transport_options={
        "data_folder_in": str(folder), "data_folder_out": str(folder), "control_folder": str(folder.parent / "control")})
    return connection.default_channel


def publish(producer, queue: str, body: dict) -> None:
    producer.basic_publish(producer.prepare_message(json.dumps(body), content_type="application/json"), "", queue)


def queued(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_file())


def claimed(folder: Path) -> list[str]:
    return sorted(p.name for p in (folder / CLAIMED_FOLDER).iterdir())


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    path = tmp_path / "messages"
    path.mkdir()
    return path


def test_a_consumer_polling_during_a_long_write_gets_the_whole_message(folder):
    # ~40 MB of JSON takes long enough to write that a polling consumer meets the file mid-write:
    # kombu's own filesystem channel hands it over empty or torn (a JSONDecodeError, the message lost)
    payload = {"body": "x" * 40_000_000, "properties": {"delivery_tag": "t1"}}
    producer, consumer = channel(folder), channel(folder)
    writing = threading.Thread(target=producer._put, args=("q", payload))
    received, errors = [], []
    writing.start()
    while not received and not errors:
        try:
            received.append(consumer._get("q"))
        except Empty:
            if not writing.is_alive():
                received.append(consumer._get("q"))   # published by now: it must be there
        except Exception as exc:  # noqa: BLE001 - what kombu's channel raises on a torn message
            errors.append(exc)
    writing.join()
    assert errors == []
    assert len(received[0]["body"]) == len(payload["body"])
    assert queued(folder) == [] and len(claimed(folder)) == 1   # held until acknowledged


def test_each_message_goes_to_exactly_one_of_two_consumers(folder):
    producer = channel(folder)
    for number in range(300):
        publish(producer, "q", {"n": number})
    publish(producer, "other", {"n": -1})
    taken: list[list[int]] = [[], []]

    def drain(into: list[int]) -> None:
        consumer = channel(folder)
        while (message := consumer.basic_get("q")) is not None:
            into.append(message.decode()["n"])
            message.ack()

    threads = [threading.Thread(target=drain, args=(into,)) for into in taken]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(taken[0] + taken[1]) == list(range(300))
    assert claimed(folder) == []                                   # every one acknowledged
    assert producer._size("q") == 0 and producer._size("other") == 1   # another queue's message is left alone


def test_ack_and_reject_release_the_claim_and_a_requeue_puts_the_message_back(folder):
    producer, consumer = channel(folder), channel(folder)
    for number in range(3):
        publish(producer, "q", {"n": number})
    first, second, third = (consumer.basic_get("q") for _ in range(3))
    assert len(claimed(folder)) == 3 and producer._size("q") == 0
    first.ack()
    second.reject()
    third.requeue()
    assert claimed(folder) == []
    again = consumer.basic_get("q")
    assert again.decode() == third.decode()                         # only the requeued one is back
    assert consumer.basic_get("q") is None


def test_a_message_taken_by_a_process_that_died_unacknowledged_is_delivered_again(folder):
    producer = channel(folder)
    publish(producer, "q", {"job": "j1"})
    script = (
        "import os, signal, sys\n"
        "from tests.unit.core.test_fs_broker import channel\n"
        "from pathlib import Path\n"
        "message = channel(Path(sys.argv[1])).basic_get('q')\n"
        "print(message.decode()['job'], os.getpid(), flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"        # no ack, no shutdown: like an OOM kill
    )
    dead = subprocess.run([sys.executable, "-c", script, str(folder)], cwd=REPO_ROOT, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, timeout=120)
    job, pid = dead.stdout.split()
    assert job == "j1", dead.stderr
    [name] = claimed(folder)
    assert parse_claim_name(name)[2].startswith(f"{pid}-")           # the dead process's claim is on disk
    assert producer._size("q") == 0

    message = channel(folder).basic_get("q")                        # a fresh consumer's first read recovers it
    assert message is not None and message.decode() == {"job": "j1"}


def test_a_live_consumers_claim_is_not_taken_over(folder):
    producer = channel(folder)
    publish(producer, "q", {"job": "j1"})
    holder = channel(folder)
    assert holder.basic_get("q") is not None
    assert channel(folder).basic_get("q") is None                   # this process holds it, alive


def test_a_claim_by_an_earlier_process_with_a_reused_pid_is_taken_back(folder):
    producer = channel(folder)
    publish(producer, "q", {"job": "j1"})
    assert channel(folder).basic_get("q") is not None
    [name] = claimed(folder)
    me = process_identity(os.getpid())
    assert name.endswith(f"@{me}") and me.split("-")[1]             # Linux: the start time is known
    # the same pid with another start time: a process before this one (a reboot, a new container)
    (folder / CLAIMED_FOLDER / name).rename(folder / CLAIMED_FOLDER / name.replace(f"@{me}", f"@{os.getpid()}-1"))
    message = channel(folder).basic_get("q")
    assert message is not None and message.decode() == {"job": "j1"}


def test_a_message_that_does_not_decode_is_set_aside_once(folder):
    (folder / "1_broken.q.msg").write_bytes(b"{not json")
    producer = channel(folder)
    publish(producer, "q", {"n": 1})
    consumer = channel(folder)
    assert consumer.basic_get("q").decode() == {"n": 1}
    assert consumer.basic_get("q") is None
    assert [p.name for p in (folder / UNREADABLE_FOLDER).iterdir()] == ["1_broken.q.msg"]


def test_the_producer_publishes_a_job_through_this_transport(fw_home):
    from core import queue
    from core.settings import get_settings

    queue.enqueue("job-1", "cpu-x86")
    with queue.get_producer().connection_for_read() as connection:
        assert isinstance(connection.transport, Transport)
    folder = get_settings().broker_dir / "messages"
    [message_file] = [p for p in folder.iterdir() if p.name.endswith(".msg")]
    assert not any(p.name.endswith(".part") for p in folder.iterdir())
    message = channel(folder)._get(message_file.name.partition(".")[2][:-len(".msg")])
    assert message["headers"]["task"] == queue.TASK_RUN_JOB
    assert json.loads(base64.b64decode(message["body"]))[0] == ["job-1"]   # (args, kwargs, embed)
