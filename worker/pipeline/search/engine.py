"""The anytime search behind a recipe's ``goal``.

Order of work (each build checks the time budget and cancellation first):
1. the baseline: the model as the recipe's other steps left it (float), verified - the search
   always has a model to return;
2. one uniform build per family (``space``): every layer at the family's setting, scored on a
   screening subset of the evaluation data (the first ``SCREEN_SAMPLES``), verified on the full
   evaluation data when no verified candidate dominates it; families with a transform (sparsity,
   low rank) get no uniform build;
3. per family whose uniform build misses the budget (the smallest objective grown by the budgets
   its drop misses by first: ``_promise``), then per transform family:
   per-layer sensitivity measured on the first ``PROBE_SAMPLES`` with the goal's own metric: static int8's weights
   and activations with ``sensitivity.measure`` (one gated session); the weight-only families' every
   weight alone at every level below float (transformed, int4, int8) on ONE probe session shared by
   those families, a (weight, setting) measured once and reused by each family that has it; a greedy path of moves
   ordered by *loss removed per byte added* (a move: one weight or activation one level up); the
   prefix of the path whose predicted drop (the sum of the moved-from drops left) fits 0.7 x the
   budget is built and screened; if it misses, the prefix grows (repair) until it meets, then
   shrinks by bisection while it still meets; the smallest meeting prefix is verified on the full
   data and grown again if the full data says no;
4. the chosen model: the verified candidate that meets the budget (its drop's bootstrap bound on the
   evaluation data within max_drop: ``scores.drop_bound``) with the smallest objective (size, zstd
   size or latency); none meets -> the one with the best score, and the report says so.
With ``goal.carry`` every score (the original's, the screen's, the verification's) runs the samples
one at a time in order as one stream, each fed the carried outputs of the step before; the
sensitivity probes run on the samples' own arrays (a ranking, re-checked by the builds' scores).
Every verified build is a candidate in report.json ``candidates[]``; the Pareto set (no other
verified candidate both smaller and better) is marked, and its best few after the chosen one are
saved as ``candidate-1`` ... artifacts.
"""
from __future__ import annotations

import heapq
import math
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
from onnx import numpy_helper

from core.errors import RecipeError
from core.goal import check_goal
from core.recipe import GoalSpec, QuantizeStep, WeightQuantSpec
from worker.pipeline import artifacts, graph, metrics, sensitivity, sessions
from worker.pipeline.data import Dataset, bind
from worker.pipeline.quantize.mixed_precision import FLOAT, Assignment
from worker.pipeline.quantize import file_layout
from worker.pipeline.search import scores, space
from worker.pipeline.step import StepCancelled, StepContext

SCREEN_SAMPLES = 64
PROBE_SAMPLES = 16           # per-layer sensitivity: one run per weight and level; a ranking needs
                             # fewer samples than a verdict (64 on MiniLM: 5.4 s a run, 408 s for
                             # int4 per channel's 76 runs on the loaded 2-core machine)
SAFETY = 0.7                 # the greedy path aims at this fraction of the budget: the drops of
                             # layers measured alone add up to less than their drop together

LATENCY_RUNS = 10
FINISH_RESERVE = 0.05


@dataclass
class Candidate:
    id: int
    family: str
    label: str
    moves: int
    screen_value: float
    screen_drop: float
    value: float | None = None
    drop: float | None = None
    drop_bound: float | None = None        # the verdict's drop: scores.drop_bound
    verified: bool = False
    meets: bool = False
    bytes: int = 0
    transport_bytes: int = 0
    latency_ms: float | None = None
    seconds: float = 0.0
    path: Path | None = None
    layers: dict = field(default_factory=dict)
    step_metrics: dict = field(default_factory=dict)
    assignment: dict = field(default_factory=dict)
    pareto: bool = False
    chosen: bool = False
    artifact: str | None = None

    def row(self, goal: GoalSpec) -> dict[str, Any]:
        return {"id": self.id, "family": self.family, "label": self.label, "moves": self.moves,
                "score": self.value if self.verified else self.screen_value,
                "drop": self.drop if self.verified else self.screen_drop, "drop_bound": self.drop_bound,
                "verified": self.verified,
                "meets": self.meets, "screen_score": self.screen_value, "bytes": self.bytes,
                "transport_bytes": self.transport_bytes, "latency_ms": self.latency_ms,
                "seconds": self.seconds, "pareto": self.pareto, "chosen": self.chosen,
                "artifact": self.artifact, "higher_precision": self.assignment}


@dataclass
class SearchResult:
    model: onnx.ModelProto
    layers: dict
    params: Any                      # the chosen family's QuantizeStep (None: fp16 or float)
    chosen: Candidate
    candidates: list[Candidate]
    goal_report: dict[str, Any]
    artifacts: dict[str, Path]


def split_holdout(data: Dataset, fraction: float) -> tuple[Dataset, Dataset]:
    """(calibration, held-out evaluation): the last ``fraction`` of the samples held out (>= 1 each)."""
    held = min(max(1, int(round(data.size * fraction))), data.size - 1)
    keep = data.size - held

    def part(start: int, stop: int) -> Dataset:
        return Dataset({k: v[start:stop] for k, v in data.arrays.items()}, data.stacked,
                       None if data.labels is None else data.labels[start:stop], data.specs, stop - start)

    return part(0, keep), part(keep, data.size)


class Search:
    def __init__(self, model: onnx.ModelProto, original: onnx.ModelProto, goal: GoalSpec,
                 families: list[space.Family], ctx: StepContext, evaluation: Dataset, scratch: Path,
                 started: float | None = None, clock: Callable[[], float] = time.monotonic):
        self.model, self.goal, self.families, self.ctx = model, goal, families, ctx
        self.evaluation = evaluation
        self.screen_data = evaluation.head(SCREEN_SAMPLES)
        self.scratch = scratch
        scratch.mkdir(parents=True, exist_ok=True)
        self.clock = clock
        self.started = clock() if started is None else started
        # builds stop FINISH_RESERVE of the budget early: the last build may run long under load, and
        # the chosen model and the frontier are still to be written (608 s of a 600 s budget on the
        # PP-OCR detector with the 2 cores shared by a dozen jobs)
        self.deadline = self.started + goal.time_budget_s * (1.0 - FINISH_RESERVE)
        self.output = goal.output or original.graph.output[0].name
        self.output_index = [o.name for o in model.graph.output].index(self.output)
        full_reference = self._outputs(original, evaluation)
        self.full = scores.Scorer(goal, full_reference, evaluation.labels)
        self.screen = scores.Scorer(goal, full_reference[: self.screen_data.size], self.screen_data.labels)
        self.probe_data = evaluation.head(PROBE_SAMPLES)
        self.probe_scorer = scores.Scorer(goal, full_reference[: self.probe_data.size], self.probe_data.labels)
        self.candidates: list[Candidate] = []
        self.build_seconds: list[float] = []
        self.planned = 1 + len(families)
        self.stopped: str | None = None
        self.notes: list[str] = [note] if (note := _small_data_note(evaluation.size, goal.max_drop)) else []
        self.touching: dict[str, list[str]] = {}     # static: a float layer's activations go float with it
        self.params_of = {family.name: family.params for family in families}
        self.family_of = {family.name: family for family in families}
        self._sparse_by = ctx.options.get("sparse_storage_by", "zstd")
        self._probe: tuple[Any, onnx.ModelProto] | None = None     # weight-only families share one
        self._drops: dict[tuple, float] = {}                         # (weight, setting) -> drop alone

    # ---------------------------------------------------------------- measuring

    def _outputs(self, model: onnx.ModelProto, data: Dataset) -> np.ndarray:
        session = sessions.session(model, prepack=False)
        if self.goal.carry:
            return self._carried_outputs(session, data)
        found = [session.run([self.output], feeds)[0] for feeds in data.batches(64)]
        return scores.stack_outputs(found, data.batchable)

    def _carried_outputs(self, session, data: Dataset) -> np.ndarray:
        """``goal.carry``: the samples as consecutive steps of a stream, one at a time in order, each
        after the first fed the carried outputs of the step before (the model's own state, so the
        original and each candidate drift as each would in use)."""
        carried = list(self.goal.carry)
        names = [self.output, *carried]
        found, state = [], None
        for feeds in data.batches(1):
            if state is not None:
                feeds = {**feeds, **{self.goal.carry[name]: value for name, value in zip(carried, state)}}
            outputs = session.run(names, feeds)
            found.append(outputs[0])
            state = outputs[1:]
        return scores.stack_outputs(found, data.batchable)

    def _latency(self, model: onnx.ModelProto) -> float:
        feeds = next(self.evaluation.head(1).batches(1))
        session = sessions.session(model)
        return metrics.latency([session], feeds, runs=LATENCY_RUNS, warmup=2, budget_s=2.0)[0]["p50"]

    def objective(self, c: Candidate) -> float:
        value = {"size": c.bytes, "transport_size": c.transport_bytes, "latency": c.latency_ms}[self.goal.minimize]
        return math.inf if value is None else float(value)

    # ---------------------------------------------------------------- budget, progress, cancel

    def _time_for_another(self) -> bool:
        self.ctx.check_cancelled()
        estimate = 1.3 * (sum(self.build_seconds) / len(self.build_seconds)) if self.build_seconds else 0.0
        if self.clock() + estimate > self.deadline:
            self.stopped = self.stopped or (f"time budget: {self.goal.time_budget_s:g} s reached after "
                                            f"{len(self.candidates)} candidates")
            return False
        return True

    def _progress(self) -> None:
        verified = [c for c in self.candidates if c.verified]
        best = self._best()
        elapsed = self.clock() - self.started
        average = sum(self.build_seconds) / len(self.build_seconds) if self.build_seconds else 0.0
        left = max(self.planned - len(self.candidates), 0)
        eta = min(left * average, max(self.deadline - self.clock(), 0.0))
        best_text = (f"best {self.goal.metric} {best.value:.4g} at {best.bytes / 1024:.0f} KiB" if best else "no model yet")
        self.ctx.progress(min(0.99, max(elapsed / self.goal.time_budget_s, len(self.candidates) / max(self.planned, 1))),
                          f"search: {len(verified)} verified / {self.planned} planned, {best_text}, ETA {eta:.0f} s")

    # ---------------------------------------------------------------- candidates

    def _add(self, family: str, label: str, built: onnx.ModelProto, layers: dict, step_metrics: dict,
             assignment: Assignment | None, seconds: float, moves: int) -> Candidate:
        z = self._outputs(built, self.screen_data)
        z = z.reshape(self.screen.reference.shape)
        screen_value, screen_drop = self.screen.score(z)
        data = (space.stored_model(built, self.family_of[family], self._sparse_by, self.ctx.original,
                                   self.ctx.options.get("file_node_names"))
                if family in self.family_of else built).SerializeToString()
        candidate = Candidate(len(self.candidates), family, label, moves, screen_value, screen_drop,
                              bytes=len(data), transport_bytes=file_layout.zstd_size(data), seconds=seconds,
                              layers=layers, step_metrics=step_metrics,
                              assignment=_summary(assignment) if assignment is not None else {})
        del data
        candidate.path = graph.save_model(built, self.scratch / f"candidate-{candidate.id}.onnx")
        if self.evaluation.size <= self.screen_data.size:
            candidate.value, candidate.drop, candidate.verified = screen_value, screen_drop, True
            candidate.drop_bound = self.full.bound(z, screen_drop)
            candidate.meets = self.full.meets(candidate.drop_bound)
            candidate.latency_ms = self._latency(built)
        self.candidates.append(candidate)
        return candidate

    def verify(self, candidate: Candidate, model: onnx.ModelProto | None = None) -> Candidate:
        if candidate.verified:
            return candidate
        model = model if model is not None else graph.load_model(candidate.path)
        z = self._outputs(model, self.evaluation).reshape(self.full.reference.shape)
        candidate.value, candidate.drop = self.full.score(z)
        candidate.drop_bound = self.full.bound(z, candidate.drop)
        candidate.verified, candidate.meets = True, self.full.meets(candidate.drop_bound)
        candidate.latency_ms = self._latency(model)
        return candidate

    def _dominated(self, candidate: Candidate) -> bool:
        """A verified candidate at most as large (objective) and at least as good (screen drop)."""
        size = candidate.transport_bytes if self.goal.minimize == "transport_size" else candidate.bytes
        for other in self.candidates:
            if other is candidate or not other.verified:
                continue
            other_size = other.transport_bytes if self.goal.minimize == "transport_size" else other.bytes
            if other_size <= size and other.drop <= candidate.screen_drop:
                return True
        return False

    def _best(self) -> Candidate | None:
        verified = [c for c in self.candidates if c.verified]
        meeting = [c for c in verified if c.meets]
        if meeting:
            return min(meeting, key=lambda c: (self.objective(c), c.drop))
        return min(verified, key=lambda c: (c.drop, self.objective(c))) if verified else None

    def _build(self, family: space.Family, assignment: Assignment, label: str, moves: int) -> Candidate | None:
        if not self._time_for_another():
            return None
        t0 = self.clock()
        # a build in flight stops at the deadline too (the quantizers look at ``cancelled`` per layer
        # or group): the estimate above is the mean build, and one family's build may take several
        # (int4 GPTQ solves every layer on its calibration Hessian)
        asked = self.ctx.cancelled
        bounded = replace(self.ctx, cancelled=lambda: asked() or self.clock() > self.deadline)
        try:
            result, work = space.build(self.model, family, assignment, bounded)
        except StepCancelled:
            if asked():
                raise
            self.stopped = self.stopped or (f"time budget: {self.goal.time_budget_s:g} s reached building "
                                            f"{family.name} ({label}), that build stopped")
            return None
        except space.BuildError as exc:
            self.notes.append(f"{family.name} ({label}) could not be built: {str(exc).splitlines()[0]}")
            return None
        candidate = self._add(family.name, label, result.model, work.layers, result.metrics, assignment,
                              0.0, moves)
        if not self._dominated(candidate) or self.screen.meets(candidate.screen_drop):
            self.verify(candidate, result.model)
        del result
        candidate.seconds = self.clock() - t0
        self.build_seconds.append(candidate.seconds)
        self._progress()
        return candidate

    # ---------------------------------------------------------------- the search

    def run(self) -> None:
        baseline = self._add("float", "the model before quantization", self.model, dict(self.ctx.layers), {}, None,
                             0.0, 0)
        self.verify(baseline, self.model)
        self._progress()
        uniform: list[tuple[space.Family, Candidate]] = []
        transformed: list[space.Family] = []
        for family in self.families:
            why = space.applies(family, self.model, self.ctx)
            if why is not None:
                self.notes.append(f"{family.name}: not applicable ({why})")
                self.planned -= 1
                continue
            if family.transform is not None:
                # every layer pruned / factorized at once is rarely worth a build (measured: top-1
                # agreement 0.75 on the PP-OCR classifier pruned to 50 %); such a family starts from
                # its sensitivity-ordered path, after the quantize families, with the time left
                transformed.append(family)
                self.planned -= 1         # no uniform build (its path is planned below)
                continue
            twin = next((c for f, c in uniform if f.name == family.twin), None)
            best = self._best()
            if twin is not None and best is not None and best.meets and self.goal.minimize != "latency" \
                    and self.objective(best) <= self.objective(twin):
                # same grid, same file: only its score could differ, and its size already loses
                self.notes.append(f"{family.name}: not built (its files are {family.twin}'s size, "
                                  f"{self.objective(twin):,.0f} >= #{best.id}'s {self.objective(best):,.0f}, "
                                  f"which meets the budget)")
                self.planned -= 1
                continue
            built = self._build(family, Assignment(), f"{family.name}, every layer", 0)
            if built is None:
                if self.stopped:
                    return
                continue
            uniform.append((family, built))
        # relax layer by layer where the uniform build misses, the most promising first
        order = sorted((pair for pair in uniform if pair[0].per_layer and not pair[1].meets and
                        not (pair[1].verified and pair[1].meets)), key=lambda pair: self._promise(pair[1]))
        order += [(family, None) for family in transformed]
        self.planned += 5 * len(order)
        for family, start in order:
            best = self._best()
            if start is not None and best is not None and best.meets and self.goal.minimize != "latency" \
                    and self.objective(best) <= self.objective(start):
                self.planned -= 5
                continue      # relaxing only grows this family: it cannot beat what already meets
            self.allocate(family, start)
            if self.stopped:
                return

    def _promise(self, start: Candidate) -> float:
        """The objective a family's repair is expected to end near: its uniform build's, grown by how
        many budgets its drop misses by. Smallest first would spend the time on the family that
        misses most (on the PP-OCR detector, 16 images: int4 per channel, 14 budgets over, measured
        its layers until the 600 s ran out, while weight-only int8, 0.08 of a budget over, waited)."""
        drop = start.drop if start.verified else start.screen_drop
        budget = max(self.goal.max_drop, 1e-9)      # max_drop 0 (allowed): order by the drop itself
        return self.objective(start) * (1.0 + max(0.0, drop - self.goal.max_drop) / budget)

    def allocate(self, family: space.Family, start: Candidate | None) -> None:
        if not self._time_for_another():
            return
        path, predicted_k = self.greedy_path(family)
        if not path:
            return
        tried: dict[int, Candidate | None] = {0: start}

        def at(k: int) -> Candidate | None:
            k = max(0, min(k, len(path)))
            if k not in tried:
                tried[k] = self._build(family, _apply(path[:k], self.touching), f"{family.name}, {k} layer(s) up", k)
            return tried[k]

        def screen_meets(c: Candidate | None) -> bool:
            return c is not None and (c.meets if c.verified else self.screen.meets(c.screen_drop))

        # grow until the screen meets (repair), then bisect down while it still meets
        low, k = 0, max(1, predicted_k)
        found = at(k)
        while not screen_meets(found):
            if found is None or k >= len(path):
                return
            low, k = k, min(len(path), k + max(1, k // 2))
            found = at(k)
        high = k
        while high - low > 1 and not self.stopped:
            middle = (low + high) // 2
            c = at(middle)
            if c is None:
                break
            if screen_meets(c):
                high = middle
            else:
                low = middle
        # verify on the full data; grow again if it says no
        while high <= len(path):
            c = at(high)
            if c is None:
                return
            if not c.verified and self._time_for_another():
                self.verify(c)
            if c.meets or high == len(path) or self.stopped:
                return
            high = min(len(path), high + max(1, high // 4))

    def greedy_path(self, family: space.Family) -> tuple[list[tuple[str, str, int]], int]:
        """Moves (kind, name, new level) ordered by drop removed per byte added; and the prefix
        length whose predicted drop fits SAFETY x the budget. A layer may appear twice (int4 -> int8,
        later int8 -> float): a prefix applies its last level."""
        params = family.params
        out = self.output_index
        scorer = self.probe_scorer
        shape = scorer.reference.shape

        def loss(reference: list[np.ndarray], outputs: list[np.ndarray]) -> float:
            # the drop this change adds to the model as the search got it (the probe's reference)
            return scorer.score(np.asarray(outputs[out]).reshape(shape))[1] - \
                scorer.score(np.asarray(reference[out]).reshape(shape))[1]

        try:
            if "activation" in family.kinds():
                drops, sizes = self._static_drops(family, loss)
            else:
                drops, sizes = self._weight_drops(family, loss)
        except sensitivity.OutOfTime as exc:
            self.stopped = f"time budget: {self.goal.time_budget_s:g} s reached measuring {family.name} ({exc})"
            return [], 0
        # greedy: repeatedly the move with the largest (drop removed) / (bytes added); a move may
        # jump levels (int4 -> float), or a layer int8 does not help would never look worth a step.
        # A layer the family's transform does not select starts one level up (its quantize setting).
        level = {key: (0 if family.ladder(key[0])[0] in d else 1) for key, d in drops.items()}
        path: list[tuple[str, str, int]] = []
        heap: list[tuple[float, str, str, int, int]] = []

        def push(key: tuple[str, str]) -> None:
            levels = family.ladder(key[0])
            now = levels[level[key]]
            for to in range(level[key] + 1, len(levels)):
                nxt = levels[to]
                gain = drops[key].get(now, 0.0) - drops[key].get(nxt, 0.0)
                cost = sizes[key] * (family.bits(nxt) - family.bits(now)) / 8.0 if key[0] == "weight" else 1.0
                heapq.heappush(heap, (-(gain / max(cost, 1.0)), key[0], key[1], level[key], to))

        for key in drops:
            push(key)
        total = sum(d[family.ladder(k[0])[level[k]]] for k, d in drops.items())
        target = SAFETY * self.goal.max_drop
        predicted_k = None
        while heap:
            _, kind, name, was, to = heapq.heappop(heap)
            key = (kind, name)
            if level[key] != was:
                continue          # stale: the layer moved since this was pushed
            levels = family.ladder(kind)
            total -= drops[key].get(levels[was], 0.0) - drops[key].get(levels[to], 0.0)
            level[key] = to
            path.append((kind, name, levels[to]))
            if predicted_k is None and total <= target:
                predicted_k = len(path)
            push(key)
        return path, predicted_k if predicted_k is not None else len(path)

    def _static_drops(self, family: space.Family, loss) -> tuple[dict, dict]:
        """Static int8: each weight and each activation alone (``sensitivity.measure``: activations
        need their own gated probe); which activations go float with a float layer."""
        params = family.params
        found = sensitivity.measure(self.model, params, self.probe_data, samples=self.probe_data.size,
                                    loss=loss, metric=f"{self.goal.metric} drop", cancelled=self.ctx.cancelled,
                                    out_of_time=lambda: self.clock() > self.deadline)
        self.notes.append(f"{family.name}: sensitivity of {len(found.entries)} layers / activations on "
                          f"{found.samples} samples in {found.seconds:.1f} s")
        self.touching = {e.name: [a.name for a in found.entries if a.kind == "activation"
                                  and sensitivity.glob_escape(e.node) in a.exclude]
                         for e in found.entries if e.kind == "weight"}
        drops: dict[tuple[str, str], dict[int, float]] = {}
        sizes: dict[tuple[str, str], int] = {}
        for e in found.entries:
            levels = family.ladder(e.kind)
            drops[(e.kind, e.name)] = {levels[0]: _finite(e.error), FLOAT: 0.0}
            sizes[(e.kind, e.name)] = e.params
        return drops, sizes

    def _weight_probe(self) -> tuple[Any, onnx.ModelProto]:
        """One probe session for every weight-only family: all weights any of them selects overridable."""
        if self._probe is None:
            prepared = sensitivity.prepared_copy(self.model)
            names = sorted({layer.weight for family in self.families if family.params is not None
                            and "activation" not in family.kinds()
                            for layer in sensitivity.candidate_weights(prepared, family.params)})
            probe, _ = sensitivity.build_probe(prepared, bind(prepared, self.probe_data.arrays), names, {},
                                               samples=self.probe_data.size)
            self._probe = (probe, prepared)
        return self._probe

    def _weight_drops(self, family: space.Family, loss) -> tuple[dict, dict]:
        """Each weight alone at each level of the family's ladder but float: its drop on the screen.
        One shared probe; a (weight, setting) measured for one family is reused by the others (the
        int8 level of int4, sparse + int8 and weight-only int8 is one measurement)."""
        started, measured = self.clock(), 0
        probe, prepared = self._weight_probe()
        inits = graph.initializers(prepared)
        # a twin's grid (int4 GPTQ: RTN int4 block 32): its measurements are this family's ranking too
        twin = self.family_of.get(family.twin)
        spec = sensitivity.weight_spec(twin.params if twin is not None else family.params)
        transformable = family.transformable(prepared)
        drops: dict[tuple[str, str], dict[int, float]] = {}
        sizes: dict[tuple[str, str], int] = {}
        for layer in sensitivity.candidate_weights(prepared, family.params):
            w = numpy_helper.to_array(inits[layer.weight])
            found = {FLOAT: 0.0}
            for level in family.ladder("weight")[:-1]:
                if level == space.TRANSFORMED:
                    if layer.weight not in transformable:
                        continue
                    key = (layer.weight, repr(family.transform), repr(spec))
                    make = lambda: sensitivity.fake_quantize(family.transformed_weight(w, layer), layer, spec)
                else:
                    grid = spec if level == spec.bits else WeightQuantSpec(
                        bits=level, symmetric=spec.symmetric,
                        granularity="channel" if spec.granularity == "block" else spec.granularity)
                    key = (layer.weight, repr(grid))
                    make = lambda grid=grid: sensitivity.fake_quantize(w, layer, grid)
                if key not in self._drops:
                    self.ctx.check_cancelled()
                    if self.clock() > self.deadline:
                        raise sensitivity.OutOfTime(f"after {len(drops)} layers")
                    self._drops[key] = _finite(probe.error({layer.weight: make().astype(w.dtype)}, loss))
                    measured += 1
                found[level] = self._drops[key]
            drops[("weight", layer.weight)] = found
            sizes[("weight", layer.weight)] = layer.params
        self.notes.append(f"{family.name}: {len(drops)} weights' drop alone at each level, {measured} measured "
                          f"({len(drops) * (len(family.ladder('weight')) - 1) - measured} reused) on "
                          f"{self.probe_data.size} samples in {self.clock() - started:.1f} s")
        return drops, sizes

    # ---------------------------------------------------------------- the result

    def finish(self, workdir: Path) -> SearchResult:
        verified = [c for c in self.candidates if c.verified]
        for c in verified:
            c.pareto = not any(o is not c and self.objective(o) <= self.objective(c) and o.drop <= c.drop
                               and (self.objective(o) < self.objective(c) or o.drop < c.drop) for o in verified)
        chosen = self._best()
        chosen.chosen = True
        extra = _worth_saving(verified, self.objective)
        saved: dict[str, Path] = {}
        for index, c in enumerate(extra, start=1):
            # the file whose bytes the frontier lists (the chosen model is finalized the same way)
            model = graph.load_model(c.path)
            if c.family in self.family_of:
                model = space.stored_model(model, self.family_of[c.family], self._sparse_by, self.ctx.original,
                                           self.ctx.options.get("file_node_names"))
            c.artifact = artifacts.candidate_name(index)
            saved[c.artifact] = graph.save_model(model, workdir / artifacts.candidate_file(index))
        model = graph.load_model(chosen.path)
        if (note := _unconfirmed_note(verified, chosen, self.goal.max_drop, self.objective)) is not None:
            self.notes.append(note)
        met = chosen.meets
        summary = (f"chose #{chosen.id} ({chosen.label}): {self.goal.metric} {chosen.value:.4g} "
                   f"(original {self.full.original_value:.4g}, drop {chosen.drop:.4g}, bound {chosen.drop_bound:.4g} "
                   f"{'<=' if met else '>'} max_drop {self.goal.max_drop:g}), {chosen.bytes:,} bytes; "
                   f"{len(verified)} verified of {len(self.candidates)} built")
        if not met:
            summary += "; NO candidate met the budget: the best score found is returned"
        if self.stopped:
            summary += f"; stopped by the {self.stopped}"
        report = {
            **self.goal.model_dump(mode="json"), "output": self.output, "met": met,
            "original_score": self.full.original_value, "chosen": chosen.id,
            "evaluation_samples": self.evaluation.size, "screen_samples": self.screen_data.size,
            "seconds": self.clock() - self.started, "stopped": self.stopped, "notes": self.notes,
            "summary": summary,
        }
        return SearchResult(model, chosen.layers, self.params_of.get(chosen.family), chosen, self.candidates,
                            report, saved)


def _small_data_note(samples: int, max_drop: float) -> str | None:
    """A note where the evaluation data is too small to see a drop of ``max_drop``: with fewer than
    1 / max_drop samples one sample weighs more than the whole budget, and the search believes what
    it measures (on the bench's quick sets, 8 and 16 search samples chose models 0.042 and 0.023
    below the original on the task's own evaluation, where 32 and 64 kept them within 0.015)."""
    if max_drop <= 0 or samples >= math.ceil(1.0 / max_drop):
        return None
    wanted = math.ceil(1.0 / max_drop)
    return (f"the evaluation data has {samples} samples, fewer than 1 / max_drop = {wanted}: one sample "
            f"moves a per-sample score by {1.0 / samples:.3g}, more than max_drop {max_drop:g}, so a drop "
            f"the task would show may go unseen; give the search {wanted} or more evaluation samples")


def _worth_saving(verified: list[Candidate], objective: Callable[[Candidate], float]) -> list[Candidate]:
    """The Pareto candidates saved beside the chosen one, best first: those that meet the budget by
    objective (larger, safer alternatives), then the near misses by drop. By size alone the first
    miss is the smallest point of the frontier, often a collapsed one (the PP-OCR recognizer's
    weight-only int4 at a drop of 1.0 was ``candidate-1``)."""
    extra = [c for c in verified if c.pareto and not c.chosen and c.id != 0]
    extra.sort(key=lambda c: (not c.meets, objective(c) if c.meets else c.drop, objective(c)))
    return extra[:artifacts.CANDIDATE_COUNT]


def _unconfirmed_note(verified: list[Candidate], chosen: Candidate, max_drop: float,
                      objective: Callable[[Candidate], float]) -> str | None:
    """A note where a candidate smaller than the chosen one measured a drop within ``max_drop`` that
    its bound did not confirm: what more evaluation data could buy."""
    smaller = [c for c in verified if not c.meets and c.drop is not None and c.drop <= max_drop + 1e-12
               and objective(c) < objective(chosen)]
    if not smaller:
        return None
    best = min(smaller, key=objective)
    return (f"{len(smaller)} smaller candidate(s) measured a drop within max_drop that the evaluation data "
            f"could not confirm: the smallest, #{best.id} ({best.label}), drop {best.drop:.4g} with bound "
            f"{best.drop_bound:.4g}, {objective(best) / max(objective(chosen), 1e-300):.2f}x the chosen one's "
            f"objective; more evaluation samples narrow the bound")


def _finite(error: float) -> float:
    return max(error, 0.0) if math.isfinite(error) else 1e30


def _apply(moves: list[tuple[str, str, int]], touching: dict[str, list[str]]) -> Assignment:
    assignment = Assignment()
    for kind, name, level in moves:
        if kind == "weight":
            assignment.weights[name] = level
            if level >= FLOAT:
                assignment.float_activations |= set(touching.get(name, ()))
        elif level >= FLOAT:
            assignment.float_activations.add(name)
    return assignment


def _summary(assignment: Assignment) -> dict[str, Any]:
    return {"weights": {n: ("float" if b >= FLOAT else f"int{b}") for n, b in sorted(assignment.weights.items())},
            "float_activations": sorted(assignment.float_activations)}


def _np_dtype(elem_type: int) -> str | None:
    try:
        return str(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
    except (KeyError, ValueError):
        return None


def check_and_split(model: onnx.ModelProto, goal: GoalSpec, calibration: Dataset | None,
                    evaluation: Dataset | None) -> tuple[Dataset | None, Dataset, str | None]:
    """Refuse (RecipeError at goal.<field>) a goal that does not fit the model or the data; without
    evaluation data hold out ``goal.holdout`` of the calibration data. Returns (calibration,
    evaluation, how the evaluation data was obtained when held out)."""
    def described(value: onnx.ValueInfoProto) -> dict[str, Any]:
        tensor_type = value.type.tensor_type
        dims = ([d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
                if tensor_type.HasField("shape") else None)
        return {"name": value.name, "dtype": _np_dtype(tensor_type.elem_type), "shape": dims}

    initializers = {t.name for t in model.graph.initializer}
    inputs = [described(value) for value in model.graph.input if value.name not in initializers]
    outputs = [described(value) for value in model.graph.output]
    data = evaluation if evaluation is not None else calibration
    check_goal(goal, outputs, has_data=data is not None, has_labels=data is not None and data.labels is not None,
               samples=data.size if data is not None else None, inputs=inputs)
    if evaluation is not None:
        return calibration, evaluation, None
    if calibration.size < 2:
        why = "with calibration data only, the search holds part of it out: give 2 or more samples, or --eval"
        raise RecipeError(f"invalid recipe: goal.holdout: {why}", [{"loc": ["goal", "holdout"], "msg": why}])
    kept, held = split_holdout(calibration, goal.holdout)
    if goal.metric == "spearman" and held.size < 3:
        why = f"spearman needs 3 or more held-out samples; {held.size} of {calibration.size} are held out"
        raise RecipeError(f"invalid recipe: goal.holdout: {why}", [{"loc": ["goal", "holdout"], "msg": why}])
    return kept, held, (f"held out the last {held.size} of {calibration.size} calibration samples "
                        f"({goal.holdout:.0%}); the search calibrates on the other {kept.size}")


def run_goal(model: onnx.ModelProto, original: onnx.ModelProto, recipe: Any, ctx: StepContext,
             evaluation: Dataset, has_calibration: bool, workdir: Path) -> SearchResult:
    """The search for ``recipe.goal`` on ``model`` (the recipe's other steps already applied)."""
    given = [step for step in recipe.steps if isinstance(step, QuantizeStep)]
    families = [space.recipe_family(given[0])] if given else space.default_families(has_calibration)
    scratch = workdir / ".search"
    if recipe.goal.minimize == "size":
        ctx.options["sparse_storage_by"] = "raw"      # finalize stores sparse where the file shrinks
    if recipe.goal.minimize in ("size", "transport_size"):
        # weight-only DequantizeLinear kept as is: the Cast / Mul form finalize may pick for speed
        # adds nodes and shaped scales (the classifier's goal 144 bytes above the same static recipe
        # alone, which measured the other form faster), and the user asked for the smaller file
        ctx.options.setdefault("dequantize_form", "qdq")
    try:
        search = Search(model, original, recipe.goal, families, ctx, evaluation, scratch)
        search.run()
        return search.finish(workdir)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)     # every candidate's file: the kept ones were copied
