"""Validation of an uploaded .npz data set (docs/datasets.md) without trusting any byte of it.

An .npz is a zip of ``<name>.npy`` entries. ``validate_npz(path)`` checks the archive first (entry
count, no directories, symlinks or paths, per-entry and total uncompressed size, compression ratio,
so a zip bomb is refused before it is inflated), then reads each entry's .npy header (shape, dtype)
and refuses object dtypes (pickles), non-numeric dtypes, empty arrays (0 samples: a job could only
fail on them) and NaN/Inf in float arrays, loading one
array at a time with ``allow_pickle=False``. It returns each array's name, shape and dtype.
"""
from __future__ import annotations

import math
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import InvalidInput
from core.settings import Settings, get_settings

LABELS = "_labels"


class InvalidDataset(InvalidInput):
    type = "https://featherweight.dev/problems/invalid-dataset"
    title = "Invalid data set"


@dataclass(frozen=True)
class ArchiveEntry:
    name: str
    size: int


def _safe_path(name: str) -> bool:
    """A relative path that stays inside the directory it is extracted to."""
    return not (name.startswith(("/", "\\")) or "\\" in name or ":" in name
                or any(part in ("", ".", "..") for part in name.split("/")))


def check_archive(archive: zipfile.ZipFile, settings: Settings, field: str = "file",
                  error: type[InvalidInput] = InvalidDataset) -> list[ArchiveEntry]:
    """Entry-level checks shared by .npz data sets and .zip model uploads (``error`` is raised)."""
    InvalidDataset = error  # noqa: N806 - the class this caller wants raised
    infos = archive.infolist()
    if len(infos) > settings.max_archive_entries:
        raise InvalidDataset(f"the archive has {len(infos)} entries; at most {settings.max_archive_entries} are allowed",
                             [{"loc": [field], "msg": "too many entries"}])
    total = 0
    entries = []
    for info in infos:
        name = info.filename
        mode = info.external_attr >> 16
        if info.is_dir() and stat.S_IFMT(mode) in (0, stat.S_IFDIR) and info.file_size == 0 \
                and _safe_path(name.rstrip("/")):
            # a folder's own entry (``zip -r`` writes one): nothing to write, its files carry their path
            continue
        if info.is_dir() or stat.S_IFMT(mode) not in (0, stat.S_IFREG):
            raise InvalidDataset(f"archive entry {name!r} is not a regular file",
                                 [{"loc": [field, name], "msg": "directories, links and devices are refused"}])
        if not _safe_path(name):
            raise InvalidDataset(f"archive entry {name!r} escapes its directory",
                                 [{"loc": [field, name], "msg": "unsafe path"}])
        if info.flag_bits & 0x1:
            raise InvalidDataset(f"archive entry {name!r} is encrypted", [{"loc": [field, name], "msg": "encrypted"}])
        total += info.file_size
        if total > settings.max_archive_uncompressed_bytes:
            raise InvalidDataset(f"the archive inflates past {settings.max_archive_uncompressed_bytes} bytes",
                                 [{"loc": [field], "msg": "too large uncompressed"}])
        if info.file_size > 1024 * 1024 and info.file_size > settings.max_compression_ratio * max(info.compress_size, 1):
            raise InvalidDataset(f"archive entry {name!r} is compressed more than {settings.max_compression_ratio:g}:1",
                                 [{"loc": [field, name], "msg": "compression ratio too high"}])
        entries.append(ArchiveEntry(name, info.file_size))
    if len({e.name for e in entries}) != len(entries):
        raise InvalidDataset("the archive names an entry twice", [{"loc": [field], "msg": "duplicate entry"}])
    return entries


def _read_header(handle: Any, name: str) -> tuple[tuple[int, ...], np.dtype]:
    try:
        version = np.lib.format.read_magic(handle)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(handle)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(handle)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except (ValueError, OSError, SyntaxError, EOFError) as exc:
        raise InvalidDataset(f"array {name!r} is not a valid .npy entry: {exc}",
                             [{"loc": ["file", name], "msg": "not a .npy array"}]) from None
    return tuple(int(d) for d in shape), np.dtype(dtype)


def validate_npz(path: Path, settings: Settings | None = None) -> list[dict[str, Any]]:
    """Check the .npz at ``path``; return ``[{"name", "shape", "dtype"}]`` in archive order."""
    settings = settings or get_settings()
    if not zipfile.is_zipfile(path):
        raise InvalidDataset("not an .npz file (numpy.savez / savez_compressed)", [{"loc": ["file"], "msg": "not a zip archive"}])
    try:
        with zipfile.ZipFile(path) as archive:
            entries = check_archive(archive, settings)
            if not entries:
                raise InvalidDataset("the .npz holds no arrays", [{"loc": ["file"], "msg": "empty"}])
            arrays = []
            for entry in entries:
                if not entry.name.endswith(".npy") or "/" in entry.name:
                    raise InvalidDataset(f"entry {entry.name!r} is not a top-level .npy array",
                                         [{"loc": ["file", entry.name], "msg": "not a .npy entry"}])
                name = entry.name[:-4]
                with archive.open(entry.name) as handle:
                    shape, dtype = _read_header(handle, name)
                if dtype.hasobject:
                    raise InvalidDataset(f"array {name!r} holds Python objects (a pickle); only numbers are accepted",
                                         [{"loc": ["file", name], "msg": "object arrays are refused"}])
                if dtype.kind not in "biuf":
                    raise InvalidDataset(f"array {name!r} has dtype {dtype}; only bool, integer and float arrays are accepted",
                                         [{"loc": ["file", name], "msg": "not a number type"}])
                if shape and math.prod(shape) == 0:
                    raise InvalidDataset(f"array {name!r} has shape {list(shape)}: it holds no samples; a data set "
                                         "needs at least one", [{"loc": ["file", name], "msg": "0 samples"}])
                if math.prod(shape) * dtype.itemsize > entry.size:
                    raise InvalidDataset(f"array {name!r} declares more data than its entry holds",
                                         [{"loc": ["file", name], "msg": "truncated"}])
                if dtype.kind == "f":
                    _check_finite(archive, entry.name, name)
                arrays.append({"name": name, "shape": list(shape), "dtype": str(dtype.newbyteorder("="))})
    except zipfile.BadZipFile as exc:
        raise InvalidDataset(f"the .npz is damaged: {exc}", [{"loc": ["file"], "msg": "bad zip"}]) from None
    if LABELS in {a["name"] for a in arrays}:
        labels = next(a for a in arrays if a["name"] == LABELS)
        if len(labels["shape"]) != 1 or labels["dtype"][0] not in "iu":
            raise InvalidDataset("_labels must be integer class ids of shape [N]", [{"loc": ["file", LABELS], "msg": "bad labels"}])
    return arrays


def _check_finite(archive: zipfile.ZipFile, entry: str, name: str) -> None:
    with archive.open(entry) as handle:
        try:
            array = np.lib.format.read_array(handle, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise InvalidDataset(f"array {name!r} cannot be read: {exc}",
                                 [{"loc": ["file", name], "msg": "unreadable"}]) from None
    if not np.isfinite(array).all():
        raise InvalidDataset(f"array {name!r} holds NaN or Inf", [{"loc": ["file", name], "msg": "NaN or Inf"}])
