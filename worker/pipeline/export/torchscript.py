"""``pytorch``: the compressed model as a TorchScript module (``model.pt``, ``torch.jit.load``) and
its weights as a state dict (``model.state_dict.pt``, ``torch.load(weights_only=True)``: ONNX
initializer name -> tensor).

The module is the project's ONNX-to-PyTorch interpreter (``distill.torch_graph``, the one ``kd``
trains through) traced on one sample: tracing records the torch operations the interpreter runs,
so the file holds a plain graph of aten ops and no Python, and PyTorch Mobile / LibTorch can run
it. Weights enter as the module's buffers in their stored type: an int8 / uint8 weight behind a
DequantizeLinear stays 8-bit in the file and is dequantized in the graph, a pruned weight keeps its
zeros. 4- and 2-bit weights (no torch type) are held in int8, one value per byte.

What tracing fixes: every shape the interpreter reads becomes a constant, so the module takes the
traced sample's shapes, one sample per call (a dynamic batch axis is fixed at 1; the report's
measures feed samples one by one). Ops the interpreter lacks (ONNX Runtime's fused integer
kernels such as QLinearConv, control flow) fail the conversion with their names; so does a
float16 model (the interpreter computes in float32: the module would not keep the compression).
"""
from __future__ import annotations

import re
import warnings

import numpy as np
import onnx

from worker.pipeline import artifacts, graph
from worker.pipeline.export.context import ExportContext
from worker.pipeline.export.runtime import Runner

FILES = artifacts.EXPORT_FILES["pytorch"]
_NARROW = {onnx.TensorProto.INT4: np.int8, onnx.TensorProto.INT2: np.int8,
           onnx.TensorProto.UINT4: np.uint8, onnx.TensorProto.UINT2: np.uint8}


def _runtime() -> str:
    import torch

    return f"torch {torch.__version__}"


RUNTIME = "torch.jit (TorchScript)"


def _buffer_name(name: str, taken: set[str]) -> str:
    """A module attribute name for an initializer (no dots; unique)."""
    base = re.sub(r"\W", "_", name) or "tensor"
    base = base if not base[0].isdigit() else f"t_{base}"
    candidate, index = base, 1
    while candidate in taken:
        index += 1
        candidate = f"{base}_{index}"
    taken.add(candidate)
    return candidate


def _module(model: onnx.ModelProto):
    import torch

    from worker.pipeline.distill.torch_graph import TorchGraph, unsupported_ops

    missing = unsupported_ops(model)
    if missing:
        raise ValueError(f"the ONNX-to-PyTorch interpreter has no translation for {', '.join(missing)}")
    if any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer) or any(
            node.op_type == "Cast" and graph.attribute(node, "to") == onnx.TensorProto.FLOAT16 for node in model.graph.node):
        # the interpreter computes float16 tensors in float32 (as ONNX Runtime's CPU kernels mostly
        # do): the module would hold float32 weights, twice the compressed model's
        raise ValueError("float16 models are not exported to PyTorch: the interpreter computes in float32 "
                         "and would store float32 weights (the ort and tflite formats keep float16)")
    interpreter = TorchGraph(model, [])
    narrow = {t.name: _NARROW[t.data_type] for t in model.graph.initializer if t.data_type in _NARROW}
    for name, dtype in narrow.items():
        interpreter.constants[name] = torch.from_numpy(graph.get_array(model, name).astype(dtype))
    inits = {t.name for t in model.graph.initializer}
    inputs = [v.name for v in model.graph.input if v.name not in inits]
    outputs = [v.name for v in model.graph.output]

    class ExportedGraph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.interpreter = interpreter
            taken: set[str] = set()
            self.onnx_names: dict[str, str] = {}
            for name, tensor in interpreter.constants.items():
                if name in inits:
                    # the same tensor object: the trace reads it as this buffer, so it is saved once
                    key = _buffer_name(name, taken)
                    self.register_buffer(key, tensor)
                    self.onnx_names[key] = name

        def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
            results = self.interpreter(dict(zip(inputs, args)))
            return tuple(results[name] for name in outputs)

    return ExportedGraph(), inputs, outputs


def convert(ctx: ExportContext) -> dict:
    """Trace the interpreter on the first sample of the measure data; write the module and state dict."""
    import torch

    from worker.pipeline.export.inline_if import inline_constant_ifs

    model = graph.load_model(ctx.model_path)
    sample = next(ctx.measure_data.head(1).batches(1))
    inlined = inline_constant_ifs(model, sample)     # the trace fixes the shapes: so are such Ifs
    module, inputs, _ = _module(model)
    module.eval()
    example = tuple(torch.from_numpy(np.ascontiguousarray(sample[name])) for name in inputs)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")    # TracerWarning: shapes read as constants, which is the point
        traced = torch.jit.trace(module, example, check_trace=False)
    traced.save(str(ctx.workdir / FILES[0]))
    state = {module.onnx_names[key]: tensor.clone() for key, tensor in module.named_buffers() if key in module.onnx_names}
    torch.save(state, str(ctx.workdir / FILES[1]))
    return {"converter": f"featherweight ONNX-to-PyTorch interpreter, torch.jit.trace ({_runtime()})",
            "input_shapes": {name: list(sample[name].shape) for name in inputs}, "ifs_inlined": inlined,
            "stored_dtypes": {str(dtype).removeprefix("torch."): count for dtype, count in
                        _dtype_counts(state).items()}}


def _dtype_counts(state: dict) -> dict:
    counts: dict = {}
    for tensor in state.values():
        counts[tensor.dtype] = counts.get(tensor.dtype, 0) + int(tensor.numel())
    return counts


def load(path):
    import torch

    return torch.jit.load(str(path), map_location="cpu")


def runner(ctx: ExportContext) -> Runner:
    """The saved TorchScript file, loaded back, one sample per call."""
    import torch

    module = load(ctx.workdir / FILES[0])
    model = onnx.load(str(ctx.model_path), load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    inputs = [v.name for v in model.graph.input if v.name not in inits]
    outputs = [v.name for v in model.graph.output]

    def call(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            results = module(*(torch.from_numpy(np.ascontiguousarray(feeds[name])) for name in inputs))
        return {name: value.numpy() for name, value in zip(outputs, results)}

    return Runner(outputs, call, per_sample=True)
