"""Knowledge distillation: train the student's float weights on the teacher's softened outputs.

Per mini-batch, for each model output (logits taken before a final Softmax / LogSoftmax where the
graph has one, in the teacher and the student alike):

- ``[batch, classes]`` outputs: ``T^2 * KL(softmax(z_t / T) || softmax(z_s / T))``, batch mean
  (Hinton et al. 2015: the ``T^2`` keeps the gradient scale independent of ``T``);
- other outputs (hidden states, regressions): ``mean((y_s - y_t)^2) / var(y_t)``.

The soft term is averaged over outputs; with ``_labels`` the first classification output also gets
cross-entropy against the labels: ``loss = alpha * soft + (1 - alpha) * CE``. Adam, ``epochs`` passes
over the calibration data in shuffled mini-batches. Before training and after every epoch the
whole-data loss is measured without gradients; the weights of the best of those points are kept, so
the step never returns a student worse on its own objective than the one it was given.

Constraints hold throughout (``torch_graph``): masked weights are multiplied by their mask,
quantized weights fake-quantized on their fixed grid (straight-through), shared values trained as
their centroids; the trained values are then written back into the ONNX initializers.
"""
from __future__ import annotations

import copy
import fnmatch
from typing import Callable

import numpy as np
import onnx
import torch
import torch.nn.functional as F

from core.errors import PipelineError
from core.recipe import DistillStep
from worker.pipeline import graph, sessions
from worker.pipeline.data import Dataset
from worker.pipeline.distill.layers import WeightSource, constant_nodes, constant_values, linear_layer, weight_source
from worker.pipeline.distill.torch_graph import TorchGraph, WeightSpec
from worker.pipeline.step import LayerRecord

AGREEMENT_TOLERANCE = 1e-3   # relative L2 between the torch translation and ONNX Runtime
# where a float initializer is a trainable weight: (op, input index); None = any input
_WEIGHT_SLOTS = {"MatMul": None, "Gemm": None, "Conv": (1, 2), "ConvTranspose": (1, 2),
                 "LayerNormalization": (1, 2), "BatchNormalization": (1, 2), "Gather": (0,), "Add": None, "Sub": None}
_FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)


def _selected(names: list[str], params: DistillStep, size: int) -> bool:
    if params.include and not any(fnmatch.fnmatchcase(n, p) for n in names for p in params.include):
        return False
    if any(fnmatch.fnmatchcase(n, p) for n in names for p in params.exclude):
        return False
    return not ("min_params" in params.model_fields_set and size < params.min_params)


def trainable_weights(student: onnx.ModelProto, params: DistillStep, layers: dict[str, LayerRecord]) -> list[WeightSpec]:
    """The student's weights to train and the constraints each one carries."""
    inits = graph.initializers(student)
    uses = graph.consumers(student)
    nodes = {n.name: n for n in student.graph.node if n.name}
    # constraints by the name of the tensor the graph reads (a float initializer, or a DQ's output)
    masks: dict[str, np.ndarray] = {}
    codebooks: dict[str, np.ndarray] = {}
    signs: set[str] = set()
    for record in layers.values():
        if record.factors is not None:
            continue
        read = record.weight if record.weight in inits else None
        node = nodes.get(record.node)
        if read is None and node is not None and len(node.input) > 1:
            read = node.input[1] if node.op_type != "Gather" else node.input[0]
        if read is None:
            continue
        if record.mask is not None:
            masks[read] = np.asarray(record.mask, dtype=bool)
        if record.codebook is not None:
            codebooks[read] = np.asarray(record.codebook, dtype=np.float32).reshape(-1)
        if record.grid is not None and record.grid.get("bits") == 1:
            signs.add(read)
        if record.mask is None and record.sparsity > 0 and read in inits:
            masks[read] = graph.get_array(student, read) != 0

    specs: list[WeightSpec] = []
    # weights the graph computes from constants: integers behind a DequantizeLinear, or a codebook
    # gathered by labels (the cluster step); read where a layer takes its weight
    for node in student.graph.node:
        if node.op_type in ("MatMulNBits", "DynamicQuantizeMatMul") and node.domain == "com.microsoft":
            layer, _ = linear_layer(student, node)
            if layer is not None and not any(spec.output == node.input[1] for spec in specs) and _selected(
                    [node.input[1], node.name], params, int(np.prod(layer.weight.shape))):
                mask = masks.get(node.input[1])
                specs.append(WeightSpec(node.input[1], node.input[1], grid=layer.weight.grid, source=layer.weight,
                                        mask=mask if mask is not None and mask.shape == layer.weight.shape else None))
            continue
        slot = {"MatMul": 1, "Gemm": 1, "Conv": 1, "Gather": 0}.get(node.op_type)
        if slot is None or len(node.input) <= slot or node.input[slot] in inits:
            continue
        tensor = node.input[slot]
        if any(spec.output == tensor for spec in specs):
            continue
        source = weight_source(student, tensor, {"bits": 1} if tensor in signs else None)
        if source is None or (source.grid is None and source.labels is None):
            continue
        readers = [c.name for c, _ in uses.get(tensor, [])]
        if not _selected([source.name, tensor, *readers], params, int(np.prod(source.shape))):
            continue
        mask = masks.get(tensor)
        mask = mask if mask is not None and mask.shape == source.shape else None
        if source.labels is not None:
            codebook = graph.get_array(student, source.name).astype(np.float32).reshape(-1)
            specs.append(WeightSpec(source.name, tensor, mask=mask, labels=source.labels, codebook=codebook))
        else:
            specs.append(WeightSpec(source.name, tensor, mask=mask, grid=source.grid))
    seen = {spec.output for spec in specs} | {spec.name for spec in specs}
    for name, tensor in inits.items():
        if name in seen or tensor.data_type not in _FLOATS or not tensor.dims or int(np.prod(tensor.dims)) < 2:
            continue
        consumers = uses.get(name, [])
        if not consumers:
            continue
        slots_ok = all(node.op_type in _WEIGHT_SLOTS and (_WEIGHT_SLOTS[node.op_type] is None or index in _WEIGHT_SLOTS[node.op_type])
                       for node, index in consumers)
        if not slots_ok or not _selected([name, *(n.name for n, _ in consumers)], params, int(np.prod(tensor.dims))):
            continue
        mask = masks.get(name)
        mask = mask if mask is not None and mask.shape == tuple(tensor.dims) else None
        spec = WeightSpec(name, name, mask=mask)
        if name in codebooks:
            values = graph.get_array(student, name).astype(np.float32)
            spec.codebook = codebooks[name]
            spec.labels = np.abs(values[..., None] - spec.codebook).argmin(axis=-1)
        specs.append(spec)
        seen.add(name)
    return specs


def _logits_name(model: onnx.ModelProto, output: str) -> str:
    """The tensor before a final Softmax / LogSoftmax over the last axis: the logits to soften."""
    producer = graph.producers(model).get(output)
    if producer is not None and producer.op_type in ("Softmax", "LogSoftmax") and graph.opset(model) >= 13 \
            and graph.attribute(producer, "axis", -1) in (-1,):
        return producer.input[0]
    return output


class _Batches:
    """Mini-batches of the calibration data as torch feeds, and the teacher's targets for them.

    Where the model takes whole batches, a mini-batch is one call; where it takes one sample at a
    time (a fixed batch axis), a mini-batch is several one-sample calls whose losses are averaged."""

    def __init__(self, data: Dataset, teacher: onnx.ModelProto, targets: list[str]):
        self.data = data
        self.targets = targets
        run = sessions.session(teacher, outputs=targets)
        per_call = [run.run(targets, feeds) for feeds in data.batches(256)]
        if data.batchable:
            self.teacher = [np.concatenate([values[k] for values in per_call]) for k in range(len(targets))]
        else:
            self.teacher = per_call
        self.variance = [float(np.var(np.concatenate([np.asarray(v[k]).reshape(-1) for v in per_call]))) + 1e-12
                         for k in range(len(targets))]

    def calls(self, indices: np.ndarray) -> list[tuple[dict[str, torch.Tensor], list[torch.Tensor], torch.Tensor | None]]:
        """(feeds, teacher targets, labels) per model call for the samples ``indices``."""
        labels = self.data.labels
        if self.data.batchable:
            feeds = {spec.name: torch.from_numpy(np.ascontiguousarray(self.data.arrays[spec.name][indices]))
                     for spec in self.data.specs}
            teacher = [torch.from_numpy(np.ascontiguousarray(t[indices])).float() for t in self.teacher]
            lab = torch.from_numpy(labels[indices].astype(np.int64)) if labels is not None else None
            return [(feeds, teacher, lab)]
        out = []
        for i in indices:
            feeds = {}
            for spec in self.data.specs:
                array = self.data.arrays[spec.name]
                feeds[spec.name] = torch.from_numpy(np.ascontiguousarray(array[i] if self.data.stacked[spec.name] else array[i:i + 1]))
            teacher = [torch.from_numpy(np.ascontiguousarray(t)).float() for t in self.teacher[i]]
            lab = torch.from_numpy(labels[i:i + 1].astype(np.int64)) if labels is not None else None
            out.append((feeds, teacher, lab))
        return out


def _loss(student_out: list[torch.Tensor], teacher_out: list[torch.Tensor], labels: torch.Tensor | None,
          variance: list[float], params: DistillStep) -> torch.Tensor:
    temperature = params.temperature
    soft_terms = []
    ce = None
    for s, t, var in zip(student_out, teacher_out, variance):
        s = s.float()
        if t.dim() == 2 and t.shape[1] > 1:
            soft_terms.append(F.kl_div(F.log_softmax(s / temperature, dim=1), F.log_softmax(t / temperature, dim=1),
                                       reduction="batchmean", log_target=True) * temperature ** 2)
            if ce is None and labels is not None and labels.shape[0] == s.shape[0]:
                ce = F.cross_entropy(s, labels)
        else:
            soft_terms.append(torch.mean((s - t) ** 2) / var)
    soft = torch.stack(soft_terms).mean()
    if ce is None:
        return soft
    return params.alpha * soft + (1.0 - params.alpha) * ce


def _whole_loss(net: TorchGraph, batches: _Batches, names: list[str], params: DistillStep, size: int) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, size, 256):
            indices = np.arange(start, min(start + 256, size))
            for feeds, teacher, labels in batches.calls(indices):
                out = net(feeds)
                n = next(iter(feeds.values())).shape[0] if batches.data.batchable else 1
                total += float(_loss([out[k] for k in names], teacher, labels, batches.variance, params)) * n
                count += n
    return total / max(count, 1)


def _check_translation(net: TorchGraph, student: onnx.ModelProto, data: Dataset) -> float:
    """Relative L2 between the torch translation and ONNX Runtime on the first calibration batch.

    Graph optimizations are off for this run: ORT fuses DequantizeLinear(int4) + MatMul into
    MatMulNBits, whose kernel rounds the activations too (about 0.5% off on small models), and the
    check is about the ONNX semantics, not one runtime's fused approximation of them."""
    run = sessions.session(student, optimize=False)
    feeds = next(iter(data.batches(64)))
    want = run.run(None, feeds)
    with torch.no_grad():
        got = net({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()})
    worst = 0.0
    for value, output in zip(want, student.graph.output):
        mine = got[output.name].detach().numpy()
        if mine.shape != value.shape:
            raise PipelineError(f"distill: the torch translation of output {output.name!r} has shape {mine.shape}, "
                                f"ONNX Runtime gives {value.shape}")
        if value.dtype.kind == "f":
            ref = np.linalg.norm(value.astype(np.float64)) + 1e-12
            worst = max(worst, float(np.linalg.norm(mine.astype(np.float64) - value) / ref))
    if worst > AGREEMENT_TOLERANCE:
        raise PipelineError(f"distill: the torch translation disagrees with ONNX Runtime (relative L2 {worst:.2e}); "
                            f"not training on it")
    return worst


def distill(student: onnx.ModelProto, teacher: onnx.ModelProto, data: Dataset, params: DistillStep, *,
            layers: dict[str, LayerRecord], progress: Callable[[float, str], None],
            check_cancelled: Callable[[], None], seed: int = 0) -> tuple[onnx.ModelProto, dict]:
    """Train a copy of ``student`` against ``teacher``; returns it and the metrics (with ``changed``)."""
    torch.manual_seed(seed)
    specs = trainable_weights(student, params, layers)
    if not specs:
        raise PipelineError("distill kd: the student has no float weights to train")
    outputs = [o.name for o in teacher.graph.output]
    teacher_names = [_logits_name(teacher, name) for name in outputs]
    student_names = [_logits_name(student, name) for name in outputs]
    # soften logits only where both graphs end in the same Softmax; otherwise compare the outputs
    pairs = [(t, s) if (t == o) == (s == o) else (o, o) for t, s, o in zip(teacher_names, student_names, outputs)]
    teacher_names, student_names = [p[0] for p in pairs], [p[1] for p in pairs]

    trained_outputs = {spec.output for spec in specs}
    constant = constant_nodes(student)
    constant_outputs = {o for node in constant for o in node.output if o}
    readers = graph.consumers(student)
    graph_outputs = set(outputs)
    constant_keys = {tuple(node.output) for node in constant}
    boundary = sorted(o for o in constant_outputs - trained_outputs
                      if o in graph_outputs or any(tuple(n.output) not in constant_keys for n, _ in readers.get(o, [])))
    folded = constant_values(student, boundary)
    net = TorchGraph(student, specs, extra_outputs=[n for n in student_names if n not in outputs], folded=folded)
    agreement = _check_translation(net, student, data)
    batches = _Batches(data, teacher, teacher_names)
    size = data.size

    optimizer = torch.optim.Adam(net.params.parameters(), lr=params.learning_rate)
    generator = np.random.default_rng(seed)
    best = _whole_loss(net, batches, student_names, params, size)
    history = [best]
    best_state = copy.deepcopy(net.params.state_dict())
    best_epoch = 0
    progress(0.0, f"epoch 0/{params.epochs} loss {best:.4f}")
    for epoch in range(1, params.epochs + 1):
        order = generator.permutation(size)
        net.train()
        for start in range(0, size, params.batch_size):
            check_cancelled()
            calls = batches.calls(order[start:start + params.batch_size])
            optimizer.zero_grad()
            for feeds, teacher_out, labels in calls:
                out = net(feeds)
                loss = _loss([out[k] for k in student_names], teacher_out, labels, batches.variance, params)
                (loss / len(calls)).backward()
            optimizer.step()
        net.eval()
        current = _whole_loss(net, batches, student_names, params, size)
        history.append(current)
        if current < best:
            best, best_epoch = current, epoch
            best_state = copy.deepcopy(net.params.state_dict())
        progress(epoch / params.epochs, f"epoch {epoch}/{params.epochs} loss {current:.4f}")
    net.params.load_state_dict(best_state)

    trained = onnx.ModelProto()
    trained.CopyFrom(student)
    finals = net.final_weights()
    centroids = net.centroids()
    changed = []
    for spec in specs:
        value = finals[spec.name]
        if spec.labels is not None and spec.name != spec.output:
            WeightSource(spec.name, tuple(value.shape), labels=spec.labels).write_codebook(trained, centroids[spec.name])
        elif spec.source is not None:
            spec.source.write_integers(trained, spec.grid.quantize(value))
        elif spec.grid is not None:
            WeightSource(spec.name, tuple(value.shape), spec.grid).write_integers(trained, spec.grid.quantize(value))
        else:
            old = graph.get_array(student, spec.name)
            graph.set_array(trained, spec.name, value.astype(old.dtype))
        changed.append(spec.name)
    by_output = {spec.output: spec.name for spec in specs if spec.labels is not None}
    for record in layers.values():
        name = by_output.get(record.weight)
        if name is not None and record.codebook is not None:
            record.codebook = centroids[name].astype(np.float32)
    return trained, {"changed": changed if best_epoch > 0 else [], "loss": history, "best_epoch": best_epoch,
                     "trained_tensors": len(specs),
                     "trained_params": int(sum(int(np.prod(np.shape(finals[s.name]))) for s in specs)),
                     "translation_rel_l2": agreement}
