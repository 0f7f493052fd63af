"""The embedded default's broker: kombu's ``filesystem://`` transport, with messages that appear whole
and are taken by one consumer.

kombu's filesystem channel publishes by creating ``<ms>_<uuid>.<queue>.msg`` and then writing into it,
while a consumer lists the folder, moves the first matching file away and reads it. A consumer that
comes between the create and the write reads an empty or partial file, fails to decode it, and the
message is gone: the job stays ``queued`` for ever (kombu issue #1551). With the API and the worker in
separate processes on a loaded 2-core machine this is not rare: a tight producer/consumer loop lost 6-9%
of its messages that way here, and one CI run lost an end-to-end test's job.

``Channel._put`` writes under a name no consumer matches (``.<name>.part``) and renames it into place;
a rename within one folder is atomic, so a ``.msg`` file is always whole. ``Channel._get`` claims a
message by renaming it into ``claimed/`` inside the same folder (one filesystem, so exactly one
consumer's rename succeeds), where kombu moves it to the system temp folder: a copy, not a rename, when
that is another filesystem, which two consumers could then both read. Everything else (exchanges,
bindings, size, purge) is kombu's.

Celery uses this transport through ``broker_transport`` (core.queue) while the URL stays ``filesystem://``.
"""
from __future__ import annotations

import contextlib
import os
import uuid
from queue import Empty
from time import monotonic

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import bytes_to_str, str_to_bytes
from kombu.utils.json import dumps, loads

CLAIMED_FOLDER = "claimed"
PARTIAL_SUFFIX = ".part"


class Channel(filesystem.Channel):
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
        wanted = f"{queue}.msg"
        claimed_folder = os.path.join(self.data_folder_in, CLAIMED_FOLDER)
        os.makedirs(claimed_folder, exist_ok=True)
        for name in sorted(os.listdir(self.data_folder_in)):
            if name.partition(".")[2] != wanted:
                continue
            claimed = os.path.join(claimed_folder, f"{name}.{os.getpid()}")
            try:
                os.rename(os.path.join(self.data_folder_in, name), claimed)
            except FileNotFoundError:
                continue  # another consumer took it first
            except OSError as exc:
                raise ChannelError(f"Cannot take {name!r} from the queue folder") from exc
            try:
                with open(claimed, "rb") as file:
                    payload = file.read()
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(claimed)
            return loads(bytes_to_str(payload))
        raise Empty()


class Transport(filesystem.Transport):
    Channel = Channel
