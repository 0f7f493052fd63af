"""Streaming activation statistics for static quantization: the range each tensor is quantized over.

Owns: running a model over calibration data batch by batch, one ``kernels.Histogram`` per wanted
tensor (a fixed number of bins, so memory is bounded by the number of tensors, never by the number of
samples), and turning a histogram into a range by ``minmax``, ``percentile`` or ``entropy``.

Ranges:
    minmax      [min(x), max(x)]
    percentile  [P(100 - p), P(p)] of the signed values (p from the recipe, default 99.999)
    entropy     the KL-divergence threshold t on |x| (TensorRT style, 128 quantized bins; exact
                zeros left out of the search; t clips at most 1 % of the nonzero values):
                [max(min(x), -t), min(max(x), t)]
    mse         the [lo, hi] minimising the expected 8-bit rounding + clipping error over the
                histogram (``quantize.range_search``)
Every range is widened to hold 0, so that 0 (zero padding, ReLU's floor) is exactly representable.

Mask sentinels. Attention masks filled with float32's minimum (-3.4e38) or -1e9 reach tensors such
as ``scores + mask``. No clipping rule rescues such a tensor: any 8-bit grid over it either spends
every level on the sentinel (minmax) or clips the sentinel to a small negative number, which turns
"never attend here" into "attend a little" after Softmax. So a tensor in which any calibration value
is non-finite or has ``|x| >= MASK_MAGNITUDE`` is reported ``masked`` and the quantizer leaves it in
float; its sentinel values never enter the histogram (which would otherwise stretch to 1e38 and lose
every bin). Real activations of a trained network stay many orders of magnitude below 1e8.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np
import onnx

import kernels
from worker.pipeline import activations
from worker.pipeline.data import Dataset

MASK_MAGNITUDE = 1e8
DEFAULT_BINS = 2048
ENTROPY_QUANT_BINS = 128
ENTROPY_MAX_CLIPPED = 0.01      # the entropy range clips at most this share of a tensor's nonzero values
METHODS = ("minmax", "percentile", "entropy", "mse")


@dataclass(frozen=True)
class TensorRange:
    """The calibrated range of one tensor. ``masked``: sentinel values seen, keep it in float."""

    name: str
    lo: float
    hi: float
    masked: bool = False
    samples: int = 0


class ActivationStatistics:
    """One streaming histogram per tensor, fed one batch at a time."""

    def __init__(self, names: Iterable[str], bins: int = DEFAULT_BINS, *, count_zeros: bool = True):
        self.bins = bins
        self.count_zeros = count_zeros      # only the entropy range reads the zero counts
        self.histograms = {name: kernels.Histogram(bins=bins) for name in names}
        self.masked: set[str] = set()
        self.counts = {name: 0 for name in self.histograms}
        self.zeros = {name: 0 for name in self.histograms}

    def update(self, name: str, values: np.ndarray) -> None:
        """Add one batch of ``name``'s values. Sentinel values mark the tensor masked and stay out
        of its histogram."""
        flat = np.asarray(values)
        if flat.dtype.kind != "f":
            return
        flat = np.ascontiguousarray(flat, dtype=np.float32).reshape(-1)
        # one C pass tells whether any value is a sentinel; only then is the mask built (it used
        # to be two numpy passes and a bool array over every tensor of every batch)
        low, high, finite = extremes = kernels.minmax(flat) if flat.size else (0.0, 0.0, 0)
        if finite != flat.size or low <= -MASK_MAGNITUDE or high >= MASK_MAGNITUDE:
            ordinary = np.abs(flat) < MASK_MAGNITUDE      # False for NaN and +-Inf as well
            self.masked.add(name)
            flat = flat[ordinary]
            extremes = None          # the histogram measures what is left
        if flat.size:
            self.histograms[name].update(flat, extremes)
            self.counts[name] += int(flat.size)
            if self.count_zeros:
                self.zeros[name] += int(flat.size - np.count_nonzero(flat))

    def _entropy_threshold(self, name: str) -> float:
        """KL threshold on |x| without the exact zeros: every grid holds 0 exactly, so a ReLU's half
        of zeros says nothing about where to clip, yet left in the first bin it drags the KL search
        towards thresholds that clip a quarter of the real values (measured on a ReLU MLP)."""
        histogram = self.histograms[name]
        if histogram.range == 0.0:
            return 0.0
        counts = histogram.abs_counts().copy()
        counts[0] -= min(self.zeros[name], int(counts[0]))
        if not counts.any():
            return 0.0
        threshold = float(kernels.entropy_threshold(counts, 0.0, histogram.range, ENTROPY_QUANT_BINS))
        # The KL search compares shapes, not mass: where every value sits far from 0 (a Sigmoid's
        # output in [0.4, 0.6]), a threshold at the bulk's first bin folds all of it into one bin
        # that the quantized candidate matches exactly (KL ~ 0) and clips 99.8 % of the tensor.
        # No clip may take more than ENTROPY_MAX_CLIPPED of the values: the upper edge of the bin
        # where the values above it first fit within that share.
        above = counts.sum() - np.cumsum(counts)              # values above each bin's upper edge
        floor_bin = int(np.argmax(above <= ENTROPY_MAX_CLIPPED * counts.sum()))
        return max(threshold, (floor_bin + 1) * histogram.range / counts.size)

    def range(self, name: str, method: str = "minmax", percentile: float = 99.999) -> TensorRange | None:
        """The range of ``name`` by ``method``; None when no value was ever seen."""
        if method not in METHODS:
            raise ValueError(f"calibration method {method!r} is not one of {METHODS}")
        if not self.counts.get(name):
            return None
        histogram = self.histograms[name]
        low, high = (float(v) for v in histogram.minmax())
        if method == "percentile":
            low, high = float(histogram.percentile(100.0 - percentile)), float(histogram.percentile(percentile))
        elif method == "entropy":
            threshold = self._entropy_threshold(name)
            low, high = max(low, -threshold), min(high, threshold)
        elif method == "mse" and histogram.range > 0.0:
            from worker.pipeline.quantize.range_search import mse_range
            low, high = mse_range(histogram.counts, histogram.range, self.zeros[name], min(low, 0.0), max(high, 0.0))
        return TensorRange(name, min(low, 0.0), max(high, 0.0), name in self.masked, self.counts[name])


@dataclass
class DeferredScales:
    """Tensors whose values the histograms must take multiplied by a per-channel (last axis) factor
    that depends on the data itself: SmoothQuant's ``1/s`` comes from each channel's max |x| over the
    first ``samples`` samples. ``collect`` holds those tensors' batches until that many samples are
    read (or the held bytes reach ``budget_bytes``), hands ``resolve`` the maxima, and from then on
    feeds ``value * factor``: one pass over the data where SmoothQuant took its own before."""

    tensors: list[str]
    samples: int
    resolve: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]   # maxima -> {tensor: factor}
    budget_bytes: int = activations.CAPTURE_BUDGET
    maxima: dict[str, np.ndarray] = field(default_factory=dict)
    held: dict[str, list[np.ndarray]] = field(default_factory=dict)
    factors: dict[str, np.ndarray] | None = None

    def take(self, name: str, value: np.ndarray, statistics: ActivationStatistics | None) -> None:
        if self.factors is None:
            rows = value.reshape(-1, value.shape[-1])
            # max |x| per channel as max(max x, -min x): two reductions, no |x| copy (3x faster)
            found = np.maximum(rows.max(axis=0), -rows.min(axis=0))
            self.maxima[name] = found if name not in self.maxima else np.maximum(self.maxima[name], found)
            if statistics is not None and name in statistics.histograms:
                self.held.setdefault(name, []).append(value)
        elif statistics is not None and name in statistics.histograms:
            factor = self.factors.get(name)
            statistics.update(name, value if factor is None else value * factor)

    def settle(self, samples_read: int, statistics: ActivationStatistics, finished: bool = False) -> None:
        """Resolve the factors once enough samples are read (or the held values are too large, or
        the data ended), and feed what was held."""
        if self.factors is not None:
            return
        held_bytes = sum(v.nbytes for values in self.held.values() for v in values)
        if samples_read < self.samples and held_bytes < self.budget_bytes and not finished:
            return
        self.factors = self.resolve(self.maxima)
        held, self.held = self.held, {}
        for name, values in held.items():
            for value in values:
                self.take(name, value, statistics)


def collect(model: onnx.ModelProto, data: Dataset, names: Sequence[str], *, bins: int = DEFAULT_BINS,
            batch_size: int = 64, limit: int | None = None, progress=None,
            budget_bytes: int = activations.CAPTURE_BUDGET, count_zeros: bool = True,
            deferred: DeferredScales | None = None) -> ActivationStatistics:
    """Run ``model`` over ``data`` and stream every tensor in ``names`` into its histogram.
    Only one batch of activations is held at a time (and, with ``deferred``, its tensors' batches
    until their factors are known)."""
    statistics = ActivationStatistics(names, bins, count_zeros=count_zeros)
    scaled = set(deferred.tensors) if deferred is not None else set()
    wanted = list(names) + [name for name in sorted(scaled) if name not in statistics.histograms]
    if not wanted:
        return statistics
    total = data.size if limit is None else min(limit, data.size)
    done = 0
    for count, values in activations.capture_counted(model, data, wanted, batch_size=batch_size, limit=limit,
                                                           budget_bytes=budget_bytes):
        for name, value in values.items():
            if name in scaled:
                deferred.take(name, value, statistics)
            else:
                statistics.update(name, value)
        done = min(done + count, total)
        if deferred is not None:
            deferred.settle(done, statistics)
        if progress is not None and total:
            progress(done / total, f"calibration {done}/{total}")
    if deferred is not None:
        deferred.settle(done, statistics, finished=True)
    return statistics


def calibrate(model: onnx.ModelProto, data: Dataset, names: Sequence[str], *, method: str = "minmax",
              percentile: float = 99.999, bins: int = DEFAULT_BINS, batch_size: int = 64,
              limit: int | None = None, progress=None, budget_bytes: int = activations.CAPTURE_BUDGET,
              deferred: DeferredScales | None = None) -> dict[str, TensorRange]:
    """Ranges of ``names`` on ``data`` by ``method``; tensors never seen are absent."""
    statistics = collect(model, data, names, bins=bins, batch_size=batch_size, limit=limit, progress=progress,
                         budget_bytes=budget_bytes, count_zeros=method == "entropy", deferred=deferred)
    ranges = {}
    for name in names:
        found = statistics.range(name, method, percentile)
        if found is not None:
            ranges[name] = found
    return ranges
