"""What ``metrics.fidelity`` and ``metrics.latency`` need of a runtime: ``get_outputs()`` (objects
with a ``name``) and ``run(names | None, feeds) -> list of arrays``. ONNX Runtime sessions have it;
the other formats' runtimes are wrapped in ``Runner``.

A converted model may be fixed to one sample per call (a traced TorchScript module, a LiteRT
interpreter sized for batch 1): ``Runner`` then feeds a batch one sample at a time and stacks the
outputs, so the same data sets measure every format.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Output:
    name: str


class Runner:
    """``call(feeds) -> {output name: array}`` seen as an ONNX Runtime session.

    ``per_sample``: the model takes one sample per call along axis 0 of every input; a batch of
    concatenated samples is split and the outputs concatenated back."""

    def __init__(self, outputs: Sequence[str], call: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
                 *, per_sample: bool = False, batched_inputs: bool = True) -> None:
        self._outputs = [Output(name) for name in outputs]
        self._call = call
        self.per_sample = per_sample
        self.batched_inputs = batched_inputs

    def get_outputs(self) -> list[Output]:
        return list(self._outputs)

    def run(self, names: Sequence[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        names = [o.name for o in self._outputs] if names is None else list(names)
        count = next(iter(feeds.values())).shape[0] if feeds and self.batched_inputs else 1
        if not self.per_sample or count <= 1 or not self.batched_inputs:
            results = self._call(feeds)
            return [np.asarray(results[name]) for name in names]
        parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
        for index in range(count):
            results = self._call({key: value[index:index + 1] for key, value in feeds.items()})
            for name in names:
                parts[name].append(np.asarray(results[name]))
        return [np.concatenate(parts[name], axis=0) for name in names]
