"""A model uploaded as a .zip: one ``.onnx`` and its external-data files (docs/rest.md).

``unpack_model_archive(zip, dest)`` checks the archive before inflating anything (entry count, no
links or devices, folder entries skipped (``zip -r`` writes them), no absolute or ``..`` paths, total and per-entry compression ratio
caps; core.npz_guard.check_archive), then extracts entry by entry into ``dest``, never writing more
bytes for an entry than its header declared (a lying header stops the extraction), and returns the
path of the single ``.onnx``. The API validates that model (core.onnx_guard: every external-data
location must resolve inside ``dest``); the worker unpacks the stored archive the same way.
"""
from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

from core.errors import InvalidModel
from core.npz_guard import check_archive
from core.settings import Settings, get_settings

CHUNK = 1024 * 1024


def is_zip(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(4) == b"PK\x03\x04"


def unpack_model_archive(path: Path, dest: Path, settings: Settings | None = None) -> Path:
    settings = settings or get_settings()
    try:
        with zipfile.ZipFile(path) as archive:
            entries = check_archive(archive, settings, error=InvalidModel)
            models = [e.name for e in entries if e.name.lower().endswith(".onnx")]
            if len(models) != 1:
                raise InvalidModel(f"the archive must hold exactly one .onnx file; it holds {len(models)}",
                                   [{"loc": ["file"], "msg": "one .onnx expected"}])
            dest.mkdir(parents=True, exist_ok=True)
            for entry in entries:
                target = dest / entry.name
                target.parent.mkdir(parents=True, exist_ok=True)
                written = 0
                with archive.open(entry.name) as source, open(target, "xb") as out:
                    while chunk := source.read(CHUNK):
                        written += len(chunk)
                        if written > entry.size:
                            raise InvalidModel(f"archive entry {entry.name!r} inflates past its declared size",
                                               [{"loc": ["file", entry.name], "msg": "size mismatch"}])
                        out.write(chunk)
    except zipfile.BadZipFile as exc:
        shutil.rmtree(dest, ignore_errors=True)
        raise InvalidModel(f"the .zip is damaged: {exc}", [{"loc": ["file"], "msg": "bad zip"}]) from None
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return dest / models[0]
