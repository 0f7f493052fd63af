"""core.storage.LocalStore and key checks (the S3 backend runs against moto in tests/integration)."""
from __future__ import annotations

import pytest

from core.errors import NotFound, Unavailable
from core.storage import LocalStore, check_key


@pytest.mark.parametrize("key", ["../x", "a/../../b", "/etc/passwd", "a//b", "", ".hidden", "a/./b", "a\\b", "a b"])
def test_unsafe_keys_are_refused(key):
    with pytest.raises(ValueError):
        check_key(key)


def test_put_get_iter_delete_round_trip(tmp_path):
    store = LocalStore(tmp_path / "store")
    source = tmp_path / "in.bin"
    source.write_bytes(b"x" * 3_000_000)
    store.put_file("jobs/j1/model.onnx", source)
    assert store.exists("jobs/j1/model.onnx")
    assert b"".join(store.iter_bytes("jobs/j1/model.onnx")) == source.read_bytes()
    out = tmp_path / "out.bin"
    store.get_file("jobs/j1/model.onnx", out)
    assert out.read_bytes() == source.read_bytes()
    assert [p.name for p in (tmp_path / "store" / "jobs" / "j1").iterdir()] == ["model.onnx"]
    store.delete("jobs/j1/model.onnx")
    assert not store.exists("jobs/j1/model.onnx")
    with pytest.raises(NotFound):
        store.iter_bytes("jobs/j1/model.onnx")
    with pytest.raises(NotFound):
        store.get_file("jobs/j1/model.onnx", out)


def test_symlinked_directory_cannot_lead_outside(tmp_path):
    root = tmp_path / "store"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "models").symlink_to(outside)
    store = LocalStore(root)
    source = tmp_path / "f"
    source.write_bytes(b"1")
    with pytest.raises(ValueError, match="leaves the store"):
        store.put_file("models/x/model.onnx", source)
    assert list(outside.iterdir()) == []


def test_check_reports_unwritable_root(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(Unavailable):
        LocalStore(blocker).check()
    LocalStore(tmp_path / "fine").check()
