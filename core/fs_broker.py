"""The embedded default's broker: kombu's ``filesystem://`` transport, with messages that appear whole,
are taken by one consumer, and outlive a consumer that dies before acknowledging them.

kombu's filesystem channel has three gaps that lose jobs:

- it publishes by creating ``<ms>_<uuid>.<queue>.msg`` and then writing into it. A consumer that lists
  the folder between the two reads an empty or partial file, fails to decode it, and the message is
  gone: the job stays ``queued`` for ever (kombu issue #1551). With the API and the worker in separate
  processes on a loaded 2-core machine this is not rare: a tight producer/consumer loop lost 6-9% of
  its messages here, and one CI run lost an end-to-end test's job;
- it deletes a message as it reads it, so a message delivered but not yet acknowledged lives only in
  the worker's memory: a worker killed (OOM, SIGKILL, power) loses the job it had reserved;
- it moves a message to the system temp folder to take it: a copy, not a rename, when that is another
  filesystem, which two consumers can then both read.

Here ``Channel._put`` writes under a name no consumer matches (``.<name>.part``) and renames it into
place, so a ``.msg`` file is always whole. ``Channel._get`` takes a message by renaming it into
``claimed/`` in the same folder (one filesystem: exactly one consumer's rename succeeds), under a name
that says which host and process hold it (pid and start time), and the file stays there until the
message is acknowledged, rejected or restored. A consumer puts back in the queue, at its first read
and then every ``RECOVER_INTERVAL_S``, the claimed messages of processes on its host that no longer
run; the job's own claim (core.repos) makes that second delivery harmless if the first had started
it. A file that does not decode is moved to ``unreadable/`` and logged, never retried in a loop.
Exchanges, bindings, size and purge are kombu's.

Celery uses this transport through ``broker_transport`` (core.queue) while the URL stays ``filesystem://``.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import uuid
from queue import Empty
from time import monotonic

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import bytes_to_str, str_to_bytes
from kombu.utils.json import dumps, loads

log = logging.getLogger("featherweight.broker")

CLAIMED_FOLDER = "claimed"
UNREADABLE_FOLDER = "unreadable"
PARTIAL_SUFFIX = ".part"
RECOVER_INTERVAL_S = 30.0


def claim_name(message_name: str, host: str, holder: str) -> str:
    return f"{message_name}@{host}@{holder}"


def parse_claim_name(name: str) -> tuple[str, str, str] | None:
    """(message name, host, holder) of a file in ``claimed/``, or None when it is not one of ours."""
    parts = name.rsplit("@", 2)
    return (parts[0], parts[1], parts[2]) if len(parts) == 3 else None


def process_identity(pid: int) -> str:
    """``<pid>-<start time>``: the kernel's start time (Linux ``/proc``) tells apart a later process that
    got the same pid (after a reboot, or in a new container); elsewhere only the pid."""
    return f"{pid}-{_start_time(pid)}"


def _start_time(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            stat = file.read()
    except OSError:
        return ""
    # field 22 (starttime); the command name before it may hold spaces and ")", so count from its end
    return stat.rsplit(b")", 1)[1].split()[19].decode()


def holder_gone(holder: str) -> bool:
    pid_text, _, started = holder.partition("-")
    if not pid_text.isdigit():
        return False  # not a holder this module wrote: left alone
    pid = int(pid_text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        pass
    return bool(started) and _start_time(pid) not in ("", started)


class Channel(filesystem.Channel):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._claims: dict[str, str] = {}   # delivery tag -> its file in claimed/
        self._recovered_at: float | None = None
        self._claimed_folder: str | None = None
        self._holder: tuple[int, str] | None = None   # (pid, identity): a forked child gets its own

    def _put(self, queue, payload, **kwargs):
        name = f"{int(round(monotonic() * 1000))}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        # a leading dot: kombu matches "<anything>.<queue>.msg" on the text after the first dot, which is
        # "<name>.part" here, so neither _get, _size nor _purge sees a message still being written
        partial = os.path.join(self.data_folder_out, f".{name}{PARTIAL_SUFFIX}")
        try:
            with open(partial, "wb") as file:
                file.write(str_to_bytes(dumps(payload)))
                file.flush()
                os.fsync(file.fileno())  # whole on disk before it is visible: a crash leaves no torn message
            os.replace(partial, final)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(partial)
            raise ChannelError(f"Cannot add file {final!r} to directory") from exc

    def _get(self, queue):
        self._recover_if_due()
        wanted = f"{queue}.msg"
        for name in sorted(os.listdir(self.data_folder_in)):
            if name.partition(".")[2] != wanted:
                continue
            claimed = os.path.join(self._claims_folder(), claim_name(name, socket.gethostname(), self._identity()))
            try:
                os.rename(os.path.join(self.data_folder_in, name), claimed)
            except FileNotFoundError:
                continue  # another consumer took it first
            except OSError as exc:
                raise ChannelError(f"Cannot take {name!r} from the queue folder") from exc
            try:
                with open(claimed, "rb") as file:
                    payload = loads(bytes_to_str(file.read()))
                tag = payload["properties"]["delivery_tag"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                self._set_aside(claimed, name, exc)
                continue
            self._claims[tag] = claimed
            return payload
        raise Empty()

    # The claimed file goes once kombu is done with the message: acknowledged, rejected (kombu puts
    # it back first when asked to requeue) or restored (kombu puts it back: at shutdown, on recover).
    def basic_ack(self, delivery_tag, multiple=False):
        super().basic_ack(delivery_tag, multiple=multiple)
        self._release(delivery_tag)

    def basic_reject(self, delivery_tag, requeue=False):
        super().basic_reject(delivery_tag, requeue=requeue)
        self._release(delivery_tag)

    def _restore(self, message):
        super()._restore(message)
        self._release(message.delivery_tag)

    def _release(self, delivery_tag) -> None:
        claimed = self._claims.pop(delivery_tag, None)
        if claimed is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(claimed)

    def _recover_if_due(self) -> None:
        now = monotonic()
        if self._recovered_at is None or now - self._recovered_at >= RECOVER_INTERVAL_S:
            self._recovered_at = now
            recover_claims(self.data_folder_in)

    def _claims_folder(self) -> str:
        if self._claimed_folder is None:   # made once, not on every poll
            self._claimed_folder = self._folder(CLAIMED_FOLDER)
        return self._claimed_folder

    def _identity(self) -> str:
        pid = os.getpid()
        if self._holder is None or self._holder[0] != pid:
            self._holder = (pid, process_identity(pid))
        return self._holder[1]

    def _folder(self, name: str) -> str:
        folder = os.path.join(self.data_folder_in, name)
        os.makedirs(folder, exist_ok=True)
        return folder

    def _set_aside(self, claimed: str, name: str, error: Exception) -> None:
        target = os.path.join(self._folder(UNREADABLE_FOLDER), name)
        with contextlib.suppress(OSError):
            os.replace(claimed, target)
        log.error("broker message %s could not be read (%s: %s); moved to %s", name, type(error).__name__,
                  error, target)


def recover_claims(messages_folder: str, host: str | None = None) -> list[str]:
    """Put back in ``messages_folder`` the messages claimed by processes of this host that are gone;
    return their names. Claims made on another host are left alone: whether their process lives
    cannot be told from here."""
    host = host or socket.gethostname()
    claimed_folder = os.path.join(messages_folder, CLAIMED_FOLDER)
    try:
        names = os.listdir(claimed_folder)
    except FileNotFoundError:
        return []
    recovered = []
    for name in names:
        parsed = parse_claim_name(name)
        if parsed is None or parsed[1] != host or not holder_gone(parsed[2]):
            continue
        try:
            os.rename(os.path.join(claimed_folder, name), os.path.join(messages_folder, parsed[0]))
        except FileNotFoundError:
            continue  # another consumer recovered it first
        log.warning("broker message %s put back in the queue: process %s that took it is gone", parsed[0],
                    parsed[2])
        recovered.append(parsed[0])
    return recovered


class Transport(filesystem.Transport):
    Channel = Channel
