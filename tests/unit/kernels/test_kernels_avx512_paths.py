"""Edge cases of the AVX-512 magnitude mask (aligned-load head, 64-value steps, 16-value and
scalar tails, one stream per task) and of the AVX-512 selection bracket pass (vpcompressd
collection, the scalar path near the buffer's end), checked against numpy and against every
variant (ref, avx2, avx512 where supported) at 1 and 2 threads."""

from __future__ import annotations

import numpy as np
import pytest

import kernels as K

ISAS = ["ref"] + [i for i in ("avx2", "avx512", "neon") if K.isa_supported(i)]
SIZES = [0, 1, 15, 16, 17, 63, 64, 65, 127, 128, 129, 1000]


def at_offset(values: np.ndarray, off: int) -> np.ndarray:
    """A contiguous copy of `values` starting `off` elements past a 64-byte boundary."""
    isz = values.itemsize
    raw = np.empty(values.size * isz + 64 + off * isz + 64, np.uint8)
    start = (-raw.ctypes.data) % 64 + off * isz
    out = raw[start:start + values.size * isz].view(values.dtype)
    out[:] = values
    assert values.size == 0 or (out.ctypes.data - off * isz) % 64 == 0
    return out


def special_values(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n).astype(np.float32)
    pool = np.array([np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, 0.5, -0.5,
                     np.nextafter(np.float32(0.5), np.float32(1)), 1e-40, -1e-40], np.float32)
    if n:
        pick = rng.random(n) < 0.3
        x[pick] = pool[rng.integers(0, pool.size, int(pick.sum()))]
    return x


def oracle_mask(x: np.ndarray, t: float) -> np.ndarray:
    return (np.abs(x) > np.float32(t)).astype(np.uint8)  # NaN compares False


@pytest.fixture
def threads(request):
    """The test's thread cap (its ``threads`` parameter), restored afterwards."""
    old = K.threads()
    K.set_threads(request.param)
    yield request.param
    K.set_threads(old)


@pytest.mark.parametrize("isa", ISAS)
def test_magnitude_mask_sizes_and_offsets(isa):
    with K.use_isa(isa):
        for n in SIZES:
            base = special_values(n, n)
            want = oracle_mask(base, 0.5)
            for off in range(0, 18):
                x = at_offset(base, off)
                np.testing.assert_array_equal(K.magnitude_mask(x, 0.5), want, f"n={n} off={off}")
                # the mask at another offset than w (64-byte stores straddle lines)
                out = at_offset(np.zeros(n, np.uint8), (off * 7 + 3) % 64)
                assert K.magnitude_mask(x, 0.5, out=out) is out
                np.testing.assert_array_equal(out, want, f"out n={n} off={off}")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("threads", [1, 2], indirect=True)
def test_magnitude_mask_large_threaded(isa, threads):
    # several dynamic pieces per thread (grain 2^16), unaligned start and odd length
    n = 5 * 65536 + 77
    base = special_values(n, 3)
    want = oracle_mask(base, 0.5)
    with K.use_isa(isa):
        for off in (0, 3):
            x = at_offset(base, off)
            np.testing.assert_array_equal(K.magnitude_mask(x, 0.5), want)


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
def test_kth_bracket_pass_all_isas(threads):
    # >= 2^20 values take the sample-bracket path; unaligned starts and odd array lengths
    rng = np.random.default_rng(5)
    x = rng.standard_normal(1_234_567).astype(np.float32)
    x[rng.random(x.size) < 0.001] = np.nan
    arrays = [at_offset(x[:777_777], 5), at_offset(x[777_777:], 11)]
    ref = np.sort(np.abs(x))
    for isa in ISAS:
        with K.use_isa(isa):
            for k in (1, 1000, 617_283, 617_284, 1_100_000, 1_233_000):
                assert K.kth_smallest_abs(arrays, k) == float(ref[k - 1]), (isa, k)


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
def test_kth_bracket_overflow_falls_back(threads):
    # The sample (every 16th value from index 8, for n = 2^20) is spread over [0, 1); all other
    # values equal the sample's median, so the bracket around it collects 15/16 of the data:
    # far past the buffer sized from the sample, the pass overflows and the radix select answers.
    n = 1 << 20
    rng = np.random.default_rng(9)
    x = np.full(n, 0.5, np.float32)
    x[8::16] = rng.random(n // 16).astype(np.float32) * np.where(rng.random(n // 16) < 0.5, -1, 1)
    ref = np.sort(np.abs(x))
    for isa in ISAS:
        with K.use_isa(isa):
            for k in (n // 2, n // 2 + 12345, n // 32, n - 5):
                assert K.kth_smallest_abs(at_offset(x, 1), k) == float(ref[k - 1]), (isa, k)


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
def test_magnitude_mask_non_temporal_path(threads, monkeypatch):
    # masks of 16 MB or more: the AVX-512 variant's non-temporal stores (aligned loads, each mask
    # line joined from two 64-value masks when w and the mask sit at different line offsets);
    # FW_KERNELS_STREAM=0 (plain stores) and =1 (the staged path) must give the same bytes
    monkeypatch.delenv("FW_KERNELS_STREAM", raising=False)
    n = (1 << 24) + 77
    base = special_values(n, 4)
    want = oracle_mask(base, 0.5)
    for w_off in (0, 5):
        x = at_offset(base, w_off)
        for m_off in (0, 1, 16, 63):
            out = at_offset(np.zeros(n, np.uint8), m_off)
            K.magnitude_mask(x, 0.5, out=out)
            np.testing.assert_array_equal(out, want, f"w_off={w_off} m_off={m_off}")
    for env in ("0", "1"):
        monkeypatch.setenv("FW_KERNELS_STREAM", env)
        np.testing.assert_array_equal(K.magnitude_mask(at_offset(base, 3), 0.5), want, env)
