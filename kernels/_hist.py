"""Wrappers of hist.c: histograms, percentiles and the entropy threshold, and ``Histogram``, which
streams them over batches whose range grows."""

from __future__ import annotations

import math

import numpy as np

from kernels._args import _check, _data, _fail, _float, _int, _ptr, _wptr
from kernels._common import minmax
from kernels._load import ffi, lib


_MAX_BINS = 1 << 22


def histogram(x, bins, lo, hi) -> np.ndarray:
    """int64[bins] counts over [lo, hi]: bin = floor((x - lo) * (bins / (hi - lo))) in float32,
    values outside clamp to the edge bins, NaN ignored."""
    x = _data(x, np.float32, "x")
    nb = _int(bins, "bins", 1, _MAX_BINS)
    flo, fhi = _float(lo, "lo"), _float(hi, "hi")
    counts = np.zeros(nb, dtype=np.int64)
    _check(lib.fw_histogram(_ptr("float[]", x), x.size, nb, flo, fhi, _wptr("int64_t[]", counts)))
    return counts


def _counts(counts) -> np.ndarray:
    c = np.asarray(counts)
    if c.dtype.kind not in "iu" or c.ndim != 1 or c.size == 0:
        raise _fail("counts must be a non-empty 1-D integer array")
    if c.size > _MAX_BINS:
        raise _fail(f"at most {_MAX_BINS} bins")
    if c.dtype == np.uint64 and c.size and int(c.max()) >= 2**63:
        raise _fail("counts too large")
    c = np.ascontiguousarray(c, dtype=np.int64)
    if (c < 0).any():
        raise _fail("counts must be >= 0")
    return c


def percentile_from_histogram(counts, lo, hi, p) -> float:
    """The value below which p% of the histogram's mass lies (linear within a bin)."""
    c = _counts(counts)
    flo, fhi = _float(lo, "lo"), _float(hi, "hi")
    pp = _float(p, "p")
    out = ffi.new("double *")
    _check(lib.fw_percentile(_ptr("int64_t[]", c), c.size, flo, fhi, pp, out))
    return float(out[0])


def entropy_threshold(counts, lo, hi, num_quant_bins=128) -> float:
    """TensorRT-style KL-divergence threshold on |x| from a histogram of |x| over [0, hi] or of x
    over [-hi, hi] (even bin count; folded)."""
    c = _counts(counts)
    flo, fhi = _float(lo, "lo"), _float(hi, "hi")
    nq = _int(num_quant_bins, "num_quant_bins", 2, _MAX_BINS)
    out = ffi.new("double *")
    _check(lib.fw_entropy_threshold(_ptr("int64_t[]", c), c.size, flo, fhi, nq, out))
    return float(out[0])


class Histogram:
    """Streaming activation histogram over a symmetric range [-R, R] that grows as data arrives.

    The first update with a finite non-zero value sets R to its max |x|; a later value beyond R
    doubles R (merging bin pairs, exact) until it fits. `bins` must be a multiple of 4.
    `percentile(p)` is over x; `abs_percentile(p)` and `entropy_threshold()` are over |x|.
    """

    def __init__(self, bins: int = 2048):
        nb = _int(bins, "bins", 4, _MAX_BINS)
        if nb % 4:
            raise _fail(f"bins must be a multiple of 4, got {nb}")
        self.bins = nb
        self.counts = np.zeros(nb, dtype=np.int64)
        self.range = 0.0  # R; 0 until a non-zero finite value is seen
        self._pending_zeros = 0
        self._min = math.inf
        self._max = -math.inf
        self.count = 0  # values binned (NaN excluded)

    @property
    def lo(self) -> float:
        return -self.range

    @property
    def hi(self) -> float:
        return self.range

    def update(self, x, extremes: tuple[float, float, int] | None = None) -> "Histogram":
        """Add ``x``. ``extremes``: ``minmax(x)`` where the caller already computed it (one pass
        over the data fewer)."""
        x = _data(x, np.float32, "x")
        if x.size == 0:
            return self
        mn, mx, nfin = minmax(x) if extremes is None else extremes
        if nfin:
            self._min = min(self._min, mn)
            self._max = max(self._max, mx)
            amax = max(-mn, mx)
        else:
            amax = 0.0
        if self.range == 0.0:
            if amax == 0.0:
                # nothing to size the range with yet: only zeros (and maybe +-Inf)
                nnan = int(np.isnan(x).sum())
                ninf = int(np.isinf(x).sum())
                if ninf:
                    raise _fail("Histogram: the first non-zero values are infinite")
                self._pending_zeros += x.size - nnan
                self.count += x.size - nnan
                return self
            self.range = float(np.float32(amax))
            if self._pending_zeros:
                self.counts[self.bins // 2] += self._pending_zeros
                self._pending_zeros = 0
        while amax > self.range:
            if not math.isfinite(self.range * 2) or self.range * 2 > 3.0e38:
                break
            merged = self.counts.reshape(-1, 2).sum(axis=1)
            self.counts = np.zeros_like(self.counts)
            q = self.bins // 4
            self.counts[q : 3 * q] = merged
            self.range *= 2.0
        add = histogram(x, self.bins, -self.range, self.range)
        self.counts += add
        self.count += int(add.sum())
        return self

    def minmax(self) -> tuple[float, float]:
        """(min, max) of the finite values seen ((inf, -inf) before any)."""
        return self._min, self._max

    def _view(self) -> tuple[np.ndarray, float]:
        if self.range == 0.0:
            # only zeros so far: a degenerate histogram with all the mass at 0
            c = np.zeros(self.bins, dtype=np.int64)
            c[self.bins // 2] = self._pending_zeros
            return c, 1.0
        return self.counts, self.range

    def abs_counts(self) -> np.ndarray:
        """The histogram of |x| over [0, R] (bins // 2 bins)."""
        c, _ = self._view()
        h = self.bins // 2
        return c[h:] + c[:h][::-1]

    def percentile(self, p) -> float:
        c, r = self._view()
        if self.range == 0.0 and self._pending_zeros:
            return 0.0
        return percentile_from_histogram(c, -r, r, p)

    def abs_percentile(self, p) -> float:
        if self.range == 0.0 and self._pending_zeros:
            return 0.0
        return percentile_from_histogram(self.abs_counts(), 0.0, self._view()[1], p)

    def entropy_threshold(self, num_quant_bins=128) -> float:
        if self.range == 0.0:
            if self._pending_zeros:
                return 0.0
            raise _fail("Histogram is empty")
        return entropy_threshold(self.abs_counts(), 0.0, self.range, num_quant_bins)
