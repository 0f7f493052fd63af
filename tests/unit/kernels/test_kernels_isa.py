"""Every SIMD variant and every thread count gives the reference's bits.

Two ways, both in CI: in-process with kernels.use_isa(), and in subprocesses started with
FW_KERNELS_ISA=ref / FW_KERNELS_THREADS=1 (the load-time dispatch path)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import fwk_battery
import kernels as K

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
SIMD = [i for i in ("avx2", "avx512", "neon") if K.isa_supported(i)]


def assert_same(a: dict, b: dict):
    keys = sorted(k for k in a if not k.startswith("__"))
    assert keys == sorted(k for k in b if not k.startswith("__"))
    for k in keys:
        x, y = np.asarray(a[k]), np.asarray(b[k])
        assert x.dtype == y.dtype and x.shape == y.shape, k
        if x.dtype.kind == "f":
            x, y = x.view(np.uint32 if x.itemsize == 4 else np.uint64), y.view(
                np.uint32 if y.itemsize == 4 else np.uint64)
        assert np.array_equal(x, y), f"{k} differs"


@pytest.fixture(scope="module")
def battery_default():
    return fwk_battery.run()


@pytest.fixture(scope="module")
def battery_ref():
    with K.use_isa("ref"):
        return fwk_battery.run()


def test_default_isa_is_best_supported():
    assert K.isa() in ("ref", "avx2", "avx512", "neon")
    if SIMD and not os.environ.get("FW_KERNELS_ISA"):
        assert K.isa() != "ref"


@pytest.mark.parametrize("isa", SIMD)
def test_simd_matches_reference_in_process(isa, battery_ref):
    with K.use_isa(isa):
        assert K.isa() == isa
        got = fwk_battery.run()
    assert_same(got, battery_ref)


def _subprocess_battery(tmp_path, **env):
    out = tmp_path / "b.npz"
    e = dict(os.environ, PYTHONPATH=ROOT, **env)
    subprocess.run([sys.executable, os.path.join(HERE, "fwk_battery.py"), str(out)], check=True,
                   env=e, cwd=ROOT, timeout=600)
    with np.load(out) as f:
        return {k: f[k] for k in f.files}


def test_env_forces_reference(tmp_path, battery_default):
    got = _subprocess_battery(tmp_path, FW_KERNELS_ISA="ref")
    assert str(got["__isa__"]) == "ref"
    assert_same(got, battery_default)


def test_thread_count_does_not_change_bits(tmp_path, battery_default):
    got = _subprocess_battery(tmp_path, FW_KERNELS_THREADS="1")
    assert int(got["__threads__"]) == 1
    assert_same(got, battery_default)
    got = _subprocess_battery(tmp_path, FW_KERNELS_THREADS="3")
    assert int(got["__threads__"]) == 3
    assert_same(got, battery_default)


def test_unsupported_isa_raises():
    with pytest.raises(K.KernelError):
        K.set_isa("sse9")


SET = settings(max_examples=60, deadline=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.mark.skipif(not SIMD, reason="no SIMD variant on this CPU")
@SET
@given(hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=70),
                  elements=st.floats(width=32)), st.data())
def test_simd_matches_reference_hypothesis(x, data):
    axis = data.draw(st.integers(0, x.ndim - 1))
    bs = data.draw(st.sampled_from([None, 1, 3, 16, 32]))
    bits, signed = data.draw(st.sampled_from([(8, True), (8, False), (4, True), (2, False)]))
    fin = np.where(np.isfinite(x), x, 1.0).astype(np.float32)
    s, z = K.choose_qparams(fin, bits=bits, symmetric=signed, signed=signed, axis=axis, block_size=bs)

    def run():
        r = [K.quantize(x, s, z, bits=bits, signed=signed, axis=axis, block_size=bs),
             K.histogram(x, 37, -3.0, 3.0),
             K.channel_norms(x, axis=axis, p=1).view(np.uint32),
             K.channel_norms(x, axis=axis, p=2).view(np.uint32),
             K.magnitude_mask(x, 0.5),
             K.apply_mask(x, (fin > 0).astype(np.uint8)).view(np.uint32)]
        q = r[0]
        r.append(K.dequantize(q, s, z, axis=axis, block_size=bs).view(np.uint32))
        return r

    with K.use_isa("ref"):
        ref = run()
    for isa in SIMD:
        with K.use_isa(isa):
            got = run()
        for a, b in zip(got, ref):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("stream", ["1", "all", "0"])
def test_streaming_large_outputs_match_reference(stream, monkeypatch):
    # FW_KERNELS_STREAM=1: outputs >= 16 MB take the staged non-temporal store path; =all: every size
    monkeypatch.setenv("FW_KERNELS_STREAM", stream)
    rng = np.random.default_rng(11)
    x = rng.standard_normal((4099, 4097)).astype(np.float32)
    x.reshape(-1)[::1001] = np.nan
    s, z = K.choose_qparams(np.nan_to_num(x), bits=8, symmetric=False, signed=False, axis=0)

    def run():
        q = K.quantize(x, s, z, bits=8, signed=False, axis=0)
        m = K.magnitude_mask(x, 0.7)
        return [q, K.dequantize(q, s, z, axis=0).view(np.uint32), m,
                K.apply_mask(x, m).view(np.uint32)]

    got = run()
    with K.use_isa("ref"):
        ref = run()
    for a, b in zip(got, ref):
        np.testing.assert_array_equal(a, b)


def test_streamed_outputs_same_bits(tmp_path, battery_default):
    got = _subprocess_battery(tmp_path, FW_KERNELS_STREAM="all")
    assert_same(got, battery_default)
