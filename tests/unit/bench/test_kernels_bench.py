"""`python -m bench.kernels` runs and prints the documented JSON (smoke test at small sizes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def test_bench_json_smoke():
    r = subprocess.run(
        [sys.executable, "-m", "bench.kernels", "--json", "--quick",
         "--only", "quantize_int8_axis,magnitude_mask,kth_smallest_abs"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=ROOT),
    )
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert {row["kernel"] for row in rows} == {"quantize_int8_axis", "magnitude_mask", "kth_smallest_abs"}
    for row in rows:
        assert set(row) == {"kernel", "threads", "seconds", "gbps", "vs_numpy", "vs_memcpy",
                            "seconds_fresh", "gbps_fresh", "vs_memcpy_fresh", "vs_numpy_out"}
        assert row["seconds"] > 0 and row["gbps"] > 0 and row["vs_numpy"] > 0
        assert row["seconds_fresh"] > 0 and row["vs_memcpy"] > 0 and row["vs_memcpy_fresh"] > 0
        # out= rows compare against numpy with out= too; the others have no such figure
        if row["kernel"] in ("quantize_int8_axis", "magnitude_mask"):
            assert row["vs_numpy_out"] > 0
        else:
            assert row["vs_numpy_out"] is None
