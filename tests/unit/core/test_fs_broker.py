"""The embedded broker (core.fs_broker): a consumer never reads a message still being written, each
message is taken by exactly one consumer, and Celery's producer publishes through it."""
from __future__ import annotations

import base64
import json
import threading
from pathlib import Path
from queue import Empty

import pytest
from kombu import Connection

from core.fs_broker import CLAIMED_FOLDER, Transport


def channel(folder: Path):
    connection = Connection("filesystem://", transport=Transport, transport_options={
        "data_folder_in": str(folder), "data_folder_out": str(folder), "control_folder": str(folder.parent / "control")})
    return connection, connection.default_channel


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    path = tmp_path / "messages"
    path.mkdir()
    return path


def test_a_consumer_polling_during_a_long_write_gets_the_whole_message(folder):
    # ~40 MB of JSON takes long enough to write that a polling consumer meets the file mid-write:
    # kombu's own filesystem channel hands it over empty or torn (a JSONDecodeError, the message lost)
    payload = {"body": "x" * 40_000_000, "job": "j1"}
    _, producer = channel(folder)
    _, consumer = channel(folder)
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
    assert received[0]["job"] == "j1" and len(received[0]["body"]) == len(payload["body"])
    assert [p.name for p in folder.iterdir() if p.name != CLAIMED_FOLDER] == []
    assert list((folder / CLAIMED_FOLDER).iterdir()) == []


def test_each_message_goes_to_exactly_one_of_two_consumers(folder):
    _, producer = channel(folder)
    for number in range(300):
        producer._put("q", {"n": number})
    producer._put("other", {"n": -1})
    taken: list[list[int]] = [[], []]

    def drain(into: list[int]) -> None:
        _, consumer = channel(folder)
        while True:
            try:
                into.append(consumer._get("q")["n"])
            except Empty:
                return

    threads = [threading.Thread(target=drain, args=(into,)) for into in taken]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(taken[0] + taken[1]) == list(range(300))
    assert producer._size("q") == 0 and producer._size("other") == 1   # another queue's message is left alone
    assert producer._get("other") == {"n": -1}


def test_the_producer_publishes_a_job_through_this_transport(fw_home):
    from core import queue
    from core.settings import get_settings

    settings = get_settings()
    queue.enqueue("job-1", "cpu-x86")
    with queue.get_producer().connection_for_read() as connection:
        assert isinstance(connection.transport, Transport)
    folder = settings.broker_dir / "messages"
    [message_file] = [p for p in folder.iterdir() if p.name.endswith(".msg")]
    assert not any(p.name.endswith(".part") for p in folder.iterdir())
    _, consumer = channel(folder)
    message = consumer._get(message_file.name.partition(".")[2][:-len(".msg")])
    assert message["headers"]["task"] == queue.TASK_RUN_JOB
    assert json.loads(base64.b64decode(message["body"]))[0] == ["job-1"]   # (args, kwargs, embed)
