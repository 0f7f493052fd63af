"""core.storage.S3Store over real HTTP against moto's S3 server on loopback (a fresh bucket per test)."""
from __future__ import annotations

import pytest

from core.errors import NotFound, Unavailable
from core.settings import Settings
from core.storage import S3Store


@pytest.fixture
def store(s3_settings) -> S3Store:
    store = S3Store.from_settings(Settings())
    store.ensure_bucket()
    store.ensure_bucket()  # idempotent
    return store


def test_round_trip_over_http(store, tmp_path):
    source = tmp_path / "big.bin"
    source.write_bytes(bytes(range(256)) * 40_000)  # 10 MB: multipart upload path in boto3
    store.put_file("jobs/j/model.onnx", source)
    assert store.exists("jobs/j/model.onnx")
    assert b"".join(store.iter_bytes("jobs/j/model.onnx")) == source.read_bytes()
    out = tmp_path / "out.bin"
    store.get_file("jobs/j/model.onnx", out)
    assert out.read_bytes() == source.read_bytes()
    store.delete("jobs/j/model.onnx")
    assert not store.exists("jobs/j/model.onnx")


def test_missing_objects_are_not_found(store, tmp_path):
    with pytest.raises(NotFound):
        store.iter_bytes("models/none/model.onnx")
    with pytest.raises(NotFound):
        store.get_file("models/none/model.onnx", tmp_path / "x")
    assert not store.exists("models/none/model.onnx")


def test_check_fails_for_a_missing_bucket(s3_settings, monkeypatch):
    monkeypatch.setenv("FEATHERWEIGHT_S3_BUCKET", "never-created-bucket")
    with pytest.raises(Unavailable, match="never-created-bucket"):
        S3Store.from_settings(Settings()).check()


def test_check_fails_when_the_server_is_unreachable(s3_settings, monkeypatch, free_tcp_port):
    monkeypatch.setenv("FEATHERWEIGHT_S3_ENDPOINT_URL", f"http://127.0.0.1:{free_tcp_port}")
    with pytest.raises(Unavailable):
        S3Store.from_settings(Settings()).check()


def test_keys_are_checked_before_any_request(store, tmp_path):
    source = tmp_path / "f"
    source.write_bytes(b"1")
    with pytest.raises(ValueError):
        store.put_file("../escape", source)


def test_put_to_an_unreachable_server_is_unavailable(s3_settings, monkeypatch, free_tcp_port, tmp_path):
    monkeypatch.setenv("FEATHERWEIGHT_S3_ENDPOINT_URL", f"http://127.0.0.1:{free_tcp_port}")
    source = tmp_path / "f"
    source.write_bytes(b"1")
    with pytest.raises(Unavailable, match="refused 'jobs/j/model.onnx'"):
        S3Store.from_settings(Settings()).put_file("jobs/j/model.onnx", source)
