"""Every ONNX Runtime session the pipeline builds, built here: the providers a target gets, the
intra-op threads, prepacking, graph optimizations, and models of any size.

Sessions on in-memory models go through ``payload``: the model's structure is serialized alone
and its weights handed to ONNX Runtime as values over their bytes (no protobuf of the weights
written or parsed); a model whose weights near protobuf's limit (2 GiB) has them written once to a
scratch file that ONNX Runtime reads as external data. Sessions on saved models read the file
(``file_session``), or a structure-only proto whose external data lives in a directory
(``session_from_proto``).
"""
from __future__ import annotations

import ctypes
import gc
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from worker.pipeline import graph, host

EXTERNAL_ALIGNMENT = 4096      # page-aligned offsets let ONNX Runtime map the file


# initializer types handed to ONNX Runtime as OrtValues over their raw bytes (numpy has these; the
# packed sub-byte and bfloat / float8 types stay inline in the structure)
_ORT_VALUE_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.INT8,
                    onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT16, onnx.TensorProto.INT32,
                    onnx.TensorProto.UINT32, onnx.TensorProto.INT64, onnx.TensorProto.UINT64, onnx.TensorProto.BOOL)
IN_MEMORY_LOCATION = "featherweight-in-memory"     # the marker a handed-over initializer carries


def payload(model: onnx.ModelProto, options: ort.SessionOptions) -> tuple[bytes, object]:
    """The bytes to build a session from, and what must outlive the session.

    Every initializer of 1 KiB or more that holds raw bytes goes to ONNX Runtime as an OrtValue over
    a copy of those bytes (``add_external_initializers``), marked external in a structure-only copy
    of the model, and only that copy is serialized: ONNX Runtime parses no weights out of a
    protobuf. Serializing a BERT's 90 MB and parsing them back was 0.3 of its 0.43 s session build
    (static int8 builds five); so, 0.2 s, most of it reading the bytes out of the proto. The model
    itself is not touched. A model whose weights pass half of protobuf's limit (or a structure
    still past it: weights in typed fields) goes through a scratch file instead
    (``_scratch_payload``), which ONNX Runtime reads from disk rather than from a second copy in
    memory."""
    weights = weight_bytes(model)
    if weights is not None and weights < graph.EXTERNAL_DATA_THRESHOLD // 2:
        structure, names, values = _structure_and_values(model)
        if structure.ByteSize() < graph.EXTERNAL_DATA_THRESHOLD:
            if names:
                options.add_external_initializers(names, [ort.OrtValue.ortvalue_from_numpy(v) for v in values])
            return structure.SerializeToString(), values
        del structure, names, values
    return _scratch_payload(model, options)


def _structure_and_values(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str], list[np.ndarray]]:
    """A copy of ``model`` whose big raw-data initializers are external markers, with their names
    and their values (read-only arrays over the raw bytes)."""
    structure = onnx.ModelProto()
    _copy_fields(model, structure, skip="graph")
    source, target = model.graph, structure.graph
    _copy_fields(source, target, skip="initializer")
    names, values = [], []
    for tensor in source.initializer:
        if tensor.data_type in _ORT_VALUE_TYPES and tensor.data_location != onnx.TensorProto.EXTERNAL:
            raw = tensor.raw_data
            dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
            if len(raw) >= 1024 and len(raw) == int(np.prod(tensor.dims, dtype=np.int64)) * dtype.itemsize:
                marker = target.initializer.add()
                marker.name, marker.data_type = tensor.name, tensor.data_type
                marker.dims.extend(tensor.dims)
                _point_to(marker, IN_MEMORY_LOCATION, 0, len(raw))
                names.append(tensor.name)
                values.append(np.frombuffer(raw, dtype=dtype).reshape(tuple(tensor.dims)))
                continue
        target.initializer.append(tensor)
    return structure, names, values


def _copy_fields(source, target, *, skip: str) -> None:
    """Every field of the protobuf message ``source`` that is set, but ``skip``, into ``target``."""
    for descriptor, value in source.ListFields():
        if descriptor.name == skip:
            continue
        repeated = (descriptor.is_repeated if hasattr(descriptor, "is_repeated")      # protobuf >= 5.29
                    else descriptor.label == descriptor.LABEL_REPEATED)
        if repeated:
            getattr(target, descriptor.name).extend(value)
        elif descriptor.type == descriptor.TYPE_MESSAGE:
            getattr(target, descriptor.name).CopyFrom(value)
        else:
            setattr(target, descriptor.name, value)


def _scratch_payload(model: onnx.ModelProto, options: ort.SessionOptions) -> tuple[bytes, tempfile.TemporaryDirectory]:
    """Every raw-data initializer of 1 KiB or more written to ``weights.bin`` and cleared, the
    structure serialized, then each read back: memory never holds more than the model plus one
    tensor. Returns the structure and the scratch directory ONNX Runtime reads the weights from."""
    scratch = tempfile.TemporaryDirectory(prefix="fw-session-")
    data_path = Path(scratch.name) / "weights.bin"
    moved: list[tuple[onnx.TensorProto, int, int]] = []
    with open(data_path, "wb") as sink:
        for tensor in model.graph.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.raw_data) < 1024:
                continue
            sink.seek(-sink.tell() % EXTERNAL_ALIGNMENT, 1)
            offset, length = sink.tell(), sink.write(tensor.raw_data)
            tensor.ClearField("raw_data")
            _point_to(tensor, data_path.name, offset, length)
            moved.append((tensor, offset, length))
    try:
        structure = model.SerializeToString()
    finally:
        with open(data_path, "rb") as source:
            for tensor, offset, length in moved:
                del tensor.external_data[:]
                tensor.ClearField("data_location")
                source.seek(offset)
                tensor.raw_data = source.read(length)
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", scratch.name)
    return structure, scratch


def weight_bytes(model: onnx.ModelProto) -> int | None:
    """The main graph's initializers' bytes from their shapes and types (no tensor data read), or
    None where a type has no fixed size (strings)."""
    total = 0
    for tensor in model.graph.initializer:
        try:
            size = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        except (KeyError, TypeError, ValueError):
            return None
        if size == 0 or tensor.data_type == onnx.TensorProto.STRING:
            return None
        total += int(np.prod(tensor.dims, dtype=np.int64)) * size
    return total


def _point_to(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def providers_for(provider: str) -> list[str]:
    """``provider`` with the CPU provider behind it to take the ops it lacks."""
    return [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]


def _options(threads: int = 0, *, prepack: bool = True, optimize: bool = True,
             log_severity: int = 3, arena: bool = True, spin: bool = True) -> ort.SessionOptions:
    options = ort.SessionOptions()
    if not spin:
        # a thread waiting for work sleeps instead of spinning: on a worker other jobs share (more
        # threads than cores) the spinning is CPU time taken from them, ~35 % more CPU for one
        # BERT pass at load 20 on 2 cores; sessions that time latency keep spinning
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if not arena:
        options.enable_cpu_mem_arena = False
    options.log_severity_level = log_severity
    if threads:
        options.intra_op_num_threads = threads
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return options


def build_session(model: onnx.ModelProto, options: ort.SessionOptions, providers: Sequence[str]) -> ort.InferenceSession:
    """An ONNX Runtime session on the in-memory ``model``, whatever its size (see ``payload``)."""
    data, held = payload(model, options)
    run = ort.InferenceSession(data, options, providers=list(providers))
    run._featherweight_weights = held     # the weights ONNX Runtime reads live as long as the session
    return run


def session(model: onnx.ModelProto, providers: Sequence[str] = ("CPUExecutionProvider",),
            threads: int = 0, *, outputs: Iterable[str] = (), prepack: bool = True, optimize: bool = True,
            log_severity: int = 3, arena: bool = True, spin: bool = True,
            optimized_to: str | Path | None = None) -> ort.InferenceSession:
    """A session on the in-memory ``model``; ``outputs`` are added as extra graph outputs for the
    serialization and taken off again (the model is not copied). ``prepack=False`` spares the
    pre-packed second copy of the weights that only speed needs; ``optimize=False`` runs the graph
    as written (no fusions); ``arena=False`` hands a run's intermediates back to the OS after each
    run instead of keeping the session's high-water mark of buffers; ``spin=False`` for sessions
    that work rather than time (their idle threads sleep). ``optimized_to``: ONNX Runtime writes
    the graph it will run (after its fusions) to this file, every initializer of 1 KiB or more in
    ``<file>.data`` beside it, so that the file itself holds the structure only."""
    options = _options(threads, prepack=prepack, optimize=optimize, log_severity=log_severity, arena=arena,
                       spin=spin)
    if optimized_to is not None:
        options.optimized_model_filepath = str(optimized_to)
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                         Path(optimized_to).name + ".data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    count = len(model.graph.output)
    present = {output.name for output in model.graph.output}
    model.graph.output.extend(helper.make_empty_tensor_value_info(name)
                              for name in dict.fromkeys(outputs) if name not in present)
    try:
        return build_session(model, options, providers)
    finally:
        del model.graph.output[count:]


def probe_session(model: onnx.ModelProto) -> ort.InferenceSession:
    """The sensitivity probe's session (``sensitivity.build_probe``): its weights are graph inputs
    that each run overrides, so pre-packing them is wasted work and memory, and only the basic
    graph optimizations run (the fusions of the higher levels are for speed, which the probe does
    not measure)."""
    options = _options(prepack=False, spin=False)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return build_session(model, options, ["CPUExecutionProvider"])


M_MMAP_THRESHOLD = -3              # glibc's mallopt parameter (malloc.h)
MMAP_THRESHOLD_BYTES = 1 << 20


def return_big_buffers() -> bool:
    """Have glibc serve every allocation of 1 MiB or more with its own mapping, returned to the OS
    when freed. By default glibc raises that threshold (up to 32 MiB) each time such a block is
    freed, after which activation-sized buffers (a 32-sample batch of a BERT layer's 1536-wide
    activations: 20 MB) come from the heap, where a mix of sizes fragments it and the RSS only
    grows: SparseGPT on MiniLM with 1024 calibration samples peaked at 1.67 GB (bound 1.2 GB),
    with the threshold fixed at 1 MiB at 1.12 GB. Whether glibc took it (False elsewhere)."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):   # not glibc (macOS, musl): their allocators differ
        return False


def release_memory() -> None:
    """Hand freed heap back to the OS (glibc keeps it otherwise), so that the sessions built next
    do not stack on top of the models and sessions just dropped."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):   # not glibc (macOS, musl): nothing to trim
        pass


def provider_for(target: str) -> str:
    """The target's provider where it proved to run here (``host.provider_for``), else the CPU's."""
    return host.provider_for(target)


def file_session(path: str | Path, provider: str = "CPUExecutionProvider", threads: int = 0, *,
                 spin: bool = True) -> ort.InferenceSession:
    """A session on the saved model at ``path`` (its external data read beside it)."""
    return ort.InferenceSession(str(path), _options(threads, spin=spin), providers=providers_for(provider))


def session_from_proto(model: onnx.ModelProto, base_dir: str | Path, provider: str = "CPUExecutionProvider",
                       threads: int = 0, *, spin: bool = True) -> ort.InferenceSession:
    """A session on an in-memory model whose external data (if any) lives in ``base_dir``."""
    options = _options(threads, spin=spin)
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(base_dir))
    return ort.InferenceSession(model.SerializeToString(), options, providers=providers_for(provider))


def exposed_session(model: onnx.ModelProto, names: Sequence[str], provider: str = "CPUExecutionProvider"
                    ) -> ort.InferenceSession:
    """A session on the in-memory ``model`` (any size) with ``names`` as extra outputs, for looking
    at intermediate tensors; weights are not prepacked (a second copy that only speed needs)."""
    return session(model, providers_for(provider), outputs=names, prepack=False, spin=False)


def _has_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def exposed_file_session(path: str | Path, names: list[str], provider: str, scratch: Path) -> ort.InferenceSession:
    """A session on the model at ``path`` with ``names`` as extra outputs. A model with external
    data gets them as a structure-only copy reading the weights beside the original; one without is
    re-written under ``scratch`` with its weights as external data, which ONNX Runtime maps rather
    than copies (building it from bytes would hold the weights three or four times at once)."""
    model = onnx.load(str(path), load_external_data=False)
    _add_outputs(model, names)
    if _has_external_data(model):
        return session_from_proto(model, Path(path).parent, provider, spin=False)
    scratch.mkdir(parents=True, exist_ok=True)
    exposed = scratch / f"{Path(path).stem}.exposed.onnx"
    onnx.save_model(model, str(exposed), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=exposed.name + ".data", size_threshold=1024)
    del model
    return file_session(exposed, provider, spin=False)


def _add_outputs(model: onnx.ModelProto, names: Iterable[str]) -> None:
    present = {output.name for output in model.graph.output}
    for name in names:
        if name not in present:
            model.graph.output.append(helper.make_empty_tensor_value_info(name))
            present.add(name)
