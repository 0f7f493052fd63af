"""POST/GET/DELETE /v1/datasets: .npz checks (pickles, bombs, paths, NaN), and nothing left behind."""
from __future__ import annotations

import io
import os
import zipfile

import numpy as np
import pytest
import sqlalchemy as sa

PROBLEM = "application/problem+json"


def _npz(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _zip(entries: dict[str, bytes], compression=zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _npy(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def _count(table: str) -> int:
    from core.db import get_engine

    with get_engine().connect() as connection:
        return connection.execute(sa.text(f"SELECT COUNT(*) FROM {table}")).scalar_one()


def _leftovers(home) -> list[str]:
    found = []
    for folder in ("artifacts", "scratch"):
        root = home / folder
        if root.exists():
            found += [str(p) for p in root.rglob("*") if p.is_file()]
    return found


def test_upload_describes_each_array_and_stores_it(api_client, migrated):
    data = _npz(x=np.zeros((4, 128), np.float32), _labels=np.arange(4))
    response = api_client.post("/v1/datasets", files={"file": ("cal.npz", data)})
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["arrays"] == [{"name": "x", "shape": [4, 128], "dtype": "float32"},
                              {"name": "_labels", "shape": [4], "dtype": "int64"}]
    assert body["bytes"] == len(data) and body["filename"] == "cal.npz"
    assert api_client.get(f"/v1/datasets/{body['id']}").json() == body
    assert (migrated / "artifacts" / "datasets" / body["id"] / "data.npz").read_bytes() == data


BOMB = _zip({"x.npy": _npy(np.zeros((4096, 1024), np.float32))}, zipfile.ZIP_DEFLATED)


@pytest.mark.parametrize("case, payload", [
    ("not a zip", b"\x00" * 64),
    ("empty", b""),
    ("pickled object array", _zip({"x.npy": _npy(np.array([{"a": 1}, None], dtype=object))})),
    ("string array", _npz(x=np.array(["a", "b"]))),
    ("nan", _npz(x=np.array([1.0, np.nan], np.float32))),
    ("inf", _npz(x=np.array([np.inf], np.float64))),
    ("path escaping", _zip({"../x.npy": _npy(np.zeros(3, np.float32))})),
    ("nested entry", _zip({"dir/x.npy": _npy(np.zeros(3, np.float32))})),
    ("not an npy entry", _zip({"x.txt": b"hello"})),
    ("truncated npy", _zip({"x.npy": _npy(np.zeros(1000, np.float32))[:200]})),
    ("compression bomb", BOMB),
    ("no arrays", _zip({})),
    ("bad labels", _npz(x=np.zeros((2, 3), np.float32), _labels=np.zeros((2, 2), np.int64))),
    ("0 samples", _npz(x=np.zeros((0, 128), np.float32))),
    ("0 labels", _npz(x=np.zeros((2, 3), np.float32), _labels=np.zeros((0,), np.int64))),
])
def test_bad_dataset_is_422_and_leaves_nothing(api_client, migrated, case, payload):
    response = api_client.post("/v1/datasets", files={"file": ("d.npz", payload)})
    assert response.status_code == 422, (case, response.text)
    assert response.headers["content-type"] == PROBLEM
    assert response.json()["type"].endswith(("/invalid-dataset", "/invalid-input"))
    assert _count("datasets") == 0 and _leftovers(migrated) == []


def test_symlink_entry_and_too_many_entries_are_refused(api_client, migrated, monkeypatch):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        info = zipfile.ZipInfo("x.npy")
        info.external_attr = (0o120777 << 16)  # a symlink
        archive.writestr(info, "/etc/passwd")
    response = api_client.post("/v1/datasets", files={"file": ("d.npz", buffer.getvalue())})
    assert response.status_code == 422 and "not a regular file" in response.json()["detail"]

    monkeypatch.setenv("FEATHERWEIGHT_MAX_ARCHIVE_ENTRIES", "3")
    from core.settings import get_settings

    get_settings.cache_clear()
    many = _npz(**{f"a{i}": np.zeros(2, np.float32) for i in range(4)})
    response = api_client.post("/v1/datasets", files={"file": ("d.npz", many)})
    assert response.status_code == 422 and "entries" in response.json()["detail"]
    assert _count("datasets") == 0 and _leftovers(migrated) == []


def test_list_pages_newest_first_and_delete_hides_and_removes(api_client, migrated):
    ids = [api_client.post("/v1/datasets", files={"file": (f"{i}.npz", _npz(x=np.full(2, i, np.float32)))}).json()["id"]
           for i in range(3)]
    first = api_client.get("/v1/datasets", params={"limit": 2}).json()
    assert [d["id"] for d in first["items"]] == ids[::-1][:2] and first["next_cursor"]
    second = api_client.get("/v1/datasets", params={"limit": 2, "cursor": first["next_cursor"]}).json()
    assert [d["id"] for d in second["items"]] == [ids[0]] and second["next_cursor"] is None
    assert api_client.get("/v1/datasets", params={"cursor": "garbage!"}).status_code == 422

    assert api_client.delete(f"/v1/datasets/{ids[1]}").status_code == 204
    assert api_client.get(f"/v1/datasets/{ids[1]}").status_code == 404
    assert api_client.delete(f"/v1/datasets/{ids[1]}").status_code == 404
    assert not (migrated / "artifacts" / "datasets" / ids[1] / "data.npz").exists()
    assert ids[1] not in [d["id"] for d in api_client.get("/v1/datasets").json()["items"]]


def test_upload_over_the_byte_cap_is_413(api_client, migrated, monkeypatch):
    monkeypatch.setenv("FEATHERWEIGHT_MAX_UPLOAD_BYTES", "1000")
    from core.settings import get_settings

    get_settings.cache_clear()
    response = api_client.post("/v1/datasets", files={"file": ("d.npz", _npz(x=np.zeros(1000, np.float32)))})
    assert response.status_code == 413
    assert _count("datasets") == 0 and _leftovers(migrated) == []
    assert not os.listdir(migrated / "scratch")


def test_an_empty_array_is_refused_naming_it(api_client, migrated):
    response = api_client.post("/v1/datasets", files={"file": ("d.npz", _npz(x=np.zeros((0, 3, 8, 8), np.float32)))})
    assert response.status_code == 422 and response.headers["content-type"] == PROBLEM
    body = response.json()
    assert [e["loc"] for e in body["errors"]] == [["file", "x"]]
    assert "no samples" in body["detail"] and "[0, 3, 8, 8]" in body["detail"]


def test_submit_refuses_a_recorded_data_set_of_0_samples_with_its_field_path():
    # Data sets recorded before uploads refused empty arrays are caught at submit.
    from core.errors import InvalidInput
    from core.preflight import check_dataset

    inputs = [{"name": "x", "shape": ["batch", 3], "dtype": "float32"}]
    with pytest.raises(InvalidInput) as refused:
        check_dataset(inputs, [{"name": "x", "shape": [0, 3], "dtype": "float32"}], "eval_dataset_id")
    assert [e["loc"] for e in refused.value.errors] == [["body", "eval_dataset_id", "x"]]
    assert "0 samples" in str(refused.value.detail)
