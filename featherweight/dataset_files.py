"""Builds the .npz data set a model needs (docs/datasets.md) from the files people have: a folder of
images, a folder of audio files, or a text file with one sample per line and a tokenizer file.

Owns reading those files, fitting them to one model input (size, layout, channel order, dtype,
length) and writing the .npz in the layout jobs accept: one array per input, keyed by the input's
name, samples concatenated along the first axis, optional ``_labels``. What the model's inputs say
(shape, dtype, names) is read from the .onnx where one is given; flags fill in the rest. A file that
cannot be read raises ``DatasetBuildError`` naming it; nothing is left at the output path then.

The readers are optional dependencies (the ``dataset`` extra): Pillow for images, soundfile and scipy
for audio, tokenizers for text. Each is imported only by the builder that needs it.
"""
from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

LABELS = "_labels"
EXTRA_HINT = "pip install 'featherweight[dataset]'"
# A text input's role, told by its name: the first rule whose word appears in the name wins.
TEXT_ROLES = (("attention_mask", ("mask",)), ("token_type_ids", ("type", "segment")),
              ("position_ids", ("position",)), ("input_ids", ("ids", "input", "token")))


class DatasetBuildError(ValueError):
    """Input that cannot become a data set; ``file`` names the file (or folder) at fault."""

    def __init__(self, file: str | os.PathLike[str], message: str) -> None:
        super().__init__(f"{file}: {message}")
        self.file, self.message = str(file), message


@dataclass(frozen=True)
class ModelInput:
    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...]   # None for a dynamic dim


@dataclass
class ArraySummary:
    name: str
    shape: tuple[int, ...]
    dtype: str
    minimum: float
    maximum: float


@dataclass
class BuiltDataset:
    """What was written: the file, each array, and how the inputs were fitted (``notes``)."""

    path: Path
    samples: int
    arrays: list[ArraySummary]
    notes: list[str] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        lines = [f"wrote {self.path}: {self.samples} samples"]
        for note in self.notes:
            lines.append(f"  {note}")
        for a in self.arrays:
            value_range = (f"{a.minimum:g} .. {a.maximum:g}" if a.dtype.startswith(("float", "bfloat"))
                           else f"{int(a.minimum)} .. {int(a.maximum)}")
            lines.append(f"  {a.name:<24} {a.dtype:<8} {list(a.shape)!s:<22} range {value_range}")
        if self.classes:
            lines.append(f"  classes (label = position): {', '.join(self.classes)}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------- the model's inputs


_ONNX_DTYPES = {1: np.float32, 2: np.uint8, 3: np.int8, 6: np.int32, 7: np.int64, 9: np.bool_,
                10: np.float16, 11: np.float64}


def model_inputs(model_path: str | os.PathLike[str]) -> list[ModelInput]:
    """The inputs a caller feeds (initializers listed as inputs are not), without loading weights."""
    import onnx

    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:  # any parse failure is the file's fault
        raise DatasetBuildError(model_path, f"not a readable ONNX model: {_first_line(exc)}") from None
    initializers = {t.name for t in model.graph.initializer}
    inputs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tensor.shape.dim)
        inputs.append(ModelInput(value.name, np.dtype(_ONNX_DTYPES.get(tensor.elem_type, np.float32)), shape))
    return inputs


def _pick_input(inputs: list[ModelInput], model_path: Any, name: str | None, ranks: Sequence[int],
                kinds: str, what: str) -> ModelInput:
    """The model's one input, checked to take ``what`` (a data set needs an array for every input)."""
    listed = ", ".join(f"{i.name} {_shape_text(i.shape)}" for i in inputs)
    if len(inputs) != 1:
        raise DatasetBuildError(model_path, f"the model has {len(inputs)} inputs ({listed}); this builder fills "
                                            f"one input with {what}: build the others with numpy")
    spec = inputs[0]
    if name is not None and name != spec.name:
        raise DatasetBuildError(model_path, f"no input named {name!r} (inputs: {listed})")
    if len(spec.shape) not in ranks or spec.dtype.kind not in kinds:
        raise DatasetBuildError(model_path, f"input {spec.name!r} {_shape_text(spec.shape)} {spec.dtype} does not "
                                            f"take {what} (rank {' or '.join(map(str, ranks))}, "
                                            f"{'float or uint8' if 'u' in kinds else 'float'})")
    return spec


def _shape_text(shape: Sequence[int | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


# ---------------------------------------------------------------------------- images


@dataclass(frozen=True)
class ImageOptions:
    size: tuple[int, int] | None = None      # (height, width)
    layout: str | None = None                # "nchw" | "nhwc"
    channels: str | None = None              # "rgb" | "bgr" | "gray"
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    scale: float = 1.0 / 255.0
    resize: str = "crop"                     # "crop": shorter side to size, centre crop; "stretch"
    input_name: str | None = None
    labels: bool = True
    limit: int | None = None


def build_from_images(folder: str | os.PathLike[str], output: str | os.PathLike[str], *,
                      model: str | os.PathLike[str] | None = None, options: ImageOptions = ImageOptions()) -> BuiltDataset:
    """Every image under ``folder`` (sorted; in class sub-folders for ``_labels``) resized to the
    input's height and width, laid out NCHW or NHWC, value = (pixel * scale - mean) / std."""
    Image, ImageOps = _import_pillow()
    _check_output(output)
    folder = Path(folder)
    spec, layout, channels, (height, width), notes = _image_geometry(model, options)
    extensions = {ext for ext, _ in Image.registered_extensions().items()}
    files, ignored = _files(folder, extensions, options.limit)
    mean, std = _per_channel(options.mean, channels, "--mean"), _per_channel(options.std, channels, "--std")
    if np.any(std == 0):
        raise DatasetBuildError(folder, "--std must not be 0")
    raw = spec.dtype == np.uint8
    samples = []
    for path in files:
        try:
            with Image.open(path) as opened:
                image = ImageOps.exif_transpose(opened)
                image = image.convert("L" if channels == "gray" else "RGB")
                image = _fit(image, width, height, options.resize, Image)
        except Exception as exc:  # Pillow raises many types for a bad file; the file is at fault
            raise DatasetBuildError(path, f"cannot read as an image: {_first_line(exc)}") from None
        pixels = np.asarray(image, dtype=np.float32)
        pixels = pixels[:, :, None] if pixels.ndim == 2 else pixels
        if channels == "bgr":
            pixels = pixels[:, :, ::-1]
        if not raw:
            pixels = (pixels * options.scale - mean) / std
        samples.append(pixels.transpose(2, 0, 1) if layout == "nchw" else pixels)
    array = np.stack(samples).astype(spec.dtype)
    notes.append(f"{channels.upper()} pixels, {'raw 0..255' if raw else f'(pixel * {options.scale:g} - mean) / std, mean {_list(mean)}, std {_list(std)}'}; "
                 f"resize: {options.resize}")
    return _write(output, {spec.name: array}, files, folder, options.labels, notes, ignored)


def _import_pillow():
    try:
        from PIL import Image, ImageOps
    except ImportError:
        raise DatasetBuildError("images", f"reading images needs Pillow: {EXTRA_HINT}") from None
    return Image, ImageOps


def _image_geometry(model: Any, options: ImageOptions):
    """(input, layout, channels, (height, width), notes) from the model's input, flags filling gaps."""
    notes: list[str] = []
    if model is None:
        if options.input_name is None or options.size is None:
            raise DatasetBuildError("images", "without --model, give --input NAME and --size HxW")
        spec = ModelInput(options.input_name, np.dtype(np.float32), (None, None, None, None))
        layout, channels = options.layout or "nchw", options.channels or "rgb"
        return spec, layout, channels, options.size, [f"input {spec.name!r}: {layout.upper()} from the flags"]
    spec = _pick_input(model_inputs(model), model, options.input_name, (4,), "fu", "images")
    _, d1, d2, d3 = spec.shape
    layout = options.layout
    if layout is None:
        first, last = d1 in (1, 3), d3 in (1, 3)
        if first == last:
            raise DatasetBuildError(model, f"cannot tell the layout of input {spec.name!r} {_shape_text(spec.shape)}; "
                                           "give --layout nchw or nhwc")
        layout = "nchw" if first else "nhwc"
    c_dim, (h_dim, w_dim) = (d1, (d2, d3)) if layout == "nchw" else (d3, (d1, d2))
    if c_dim not in (None, 1, 3):
        raise DatasetBuildError(model, f"input {spec.name!r} {_shape_text(spec.shape)} as {layout.upper()} has "
                                       f"{c_dim} channels; images give 1 or 3")
    channels = options.channels or ("gray" if c_dim == 1 else "rgb")
    if (channels == "gray") != (c_dim == 1) and c_dim is not None:
        raise DatasetBuildError(model, f"input {spec.name!r} takes {c_dim} channel(s); --channels {channels} gives "
                                       f"{1 if channels == 'gray' else 3}")
    size = (h_dim, w_dim)
    if None in size:
        if options.size is None:
            raise DatasetBuildError(model, f"input {spec.name!r} {_shape_text(spec.shape)} has no fixed height and "
                                           "width; give --size HxW")
        size = options.size
    elif options.size is not None and tuple(options.size) != size:
        raise DatasetBuildError(model, f"input {spec.name!r} takes {size[0]}x{size[1]} images, not "
                                       f"{options.size[0]}x{options.size[1]}")
    notes.append(f"input {spec.name!r} {_shape_text(spec.shape)} {spec.dtype}: {layout.upper()}, "
                 f"{size[0]}x{size[1]}, {3 if channels != 'gray' else 1} channel(s)")
    return spec, layout, channels, size, notes


def _fit(image, width: int, height: int, mode: str, Image):
    resample = Image.Resampling.BILINEAR
    if mode == "stretch":
        return image.resize((width, height), resample)
    # shorter side to the target, then the centre: the aspect ratio is kept
    factor = max(width / image.width, height / image.height)
    scaled = image.resize((max(width, math.ceil(image.width * factor)), max(height, math.ceil(image.height * factor))),
                          resample)
    left, top = (scaled.width - width) // 2, (scaled.height - height) // 2
    return scaled.crop((left, top, left + width, top + height))


def _per_channel(values: Sequence[float], channels: str, flag: str) -> np.ndarray:
    count = 1 if channels == "gray" else 3
    values = tuple(float(v) for v in values)
    if len(values) == 1:
        values = values * count
    if len(values) != count:
        raise DatasetBuildError(flag, f"give 1 or {count} values for {count} channel(s), not {len(values)}")
    return np.asarray(values, dtype=np.float32)


# ---------------------------------------------------------------------------- audio


@dataclass(frozen=True)
class AudioOptions:
    sample_rate: int = 16000
    length: int | None = None     # samples per frame
    hop: int | None = None        # samples between frame starts; default: length (no overlap)
    input_name: str | None = None
    labels: bool = True
    limit: int | None = None


def build_from_audio(folder: str | os.PathLike[str], output: str | os.PathLike[str], *,
                     model: str | os.PathLike[str] | None = None, options: AudioOptions = AudioOptions()) -> BuiltDataset:
    """Every audio file under ``folder``, mixed to mono, resampled to ``sample_rate`` and cut into
    frames of the input's length (the last one zero-padded): each frame is one sample."""
    soundfile, resample_poly = _import_audio()
    _check_output(output)
    folder = Path(folder)
    spec, length, axis_shape, notes = _audio_geometry(model, options)
    hop = options.hop or length
    if hop <= 0:
        raise DatasetBuildError("--hop", "must be positive")
    extensions = {"." + ext.lower() for ext in soundfile.available_formats()}
    files, ignored = _files(folder, extensions, options.limit)
    frames, owners = [], []
    for path in files:
        try:
            signal, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
        except Exception as exc:  # libsndfile's errors name no file; ours does
            raise DatasetBuildError(path, f"cannot read as audio: {_first_line(exc)}") from None
        if signal.shape[0] == 0:
            raise DatasetBuildError(path, "holds no audio samples")
        mono = signal.mean(axis=1)
        if rate != options.sample_rate:
            divisor = math.gcd(int(rate), int(options.sample_rate))
            mono = resample_poly(mono, options.sample_rate // divisor, int(rate) // divisor).astype(np.float32)
        count = max(1, math.ceil(max(len(mono) - length, 0) / hop) + 1)
        padded = np.zeros((count - 1) * hop + length, dtype=np.float32)
        padded[:len(mono)] = mono[:len(padded)]
        for index in range(count):
            frames.append(padded[index * hop:index * hop + length])
            owners.append(path)
    array = np.stack(frames).reshape((len(frames), *axis_shape)).astype(spec.dtype)
    notes.append(f"mono at {options.sample_rate} Hz, frames of {length} samples every {hop} "
                 f"({length / options.sample_rate:g} s), the last one of each file zero-padded")
    return _write(output, {spec.name: array}, owners, folder, options.labels, notes, ignored)


def _import_audio():
    try:
        import soundfile
        from scipy.signal import resample_poly
    except ImportError:
        raise DatasetBuildError("audio", f"reading audio needs soundfile and scipy: {EXTRA_HINT}") from None
    return soundfile, resample_poly


def _audio_geometry(model: Any, options: AudioOptions):
    """(input, frame length, shape of one sample, notes)."""
    if model is None:
        if options.input_name is None or options.length is None:
            raise DatasetBuildError("audio", "without --model, give --input NAME and --length SAMPLES")
        spec = ModelInput(options.input_name, np.dtype(np.float32), (None, None))
        return spec, options.length, (options.length,), [f"input {spec.name!r}: [N, {options.length}] from the flags"]
    spec = _pick_input(model_inputs(model), model, options.input_name, (2, 3), "f", "audio frames")
    if len(spec.shape) == 2:
        length_dim, place = spec.shape[1], lambda n: (n,)
    elif spec.shape[1] == 1:
        length_dim, place = spec.shape[2], lambda n: (1, n)
    elif spec.shape[2] == 1:
        length_dim, place = spec.shape[1], lambda n: (n, 1)
    else:
        raise DatasetBuildError(model, f"input {spec.name!r} {_shape_text(spec.shape)} is not mono audio "
                                       "([N, samples], [N, 1, samples] or [N, samples, 1])")
    length = length_dim or options.length
    if length is None:
        raise DatasetBuildError(model, f"input {spec.name!r} {_shape_text(spec.shape)} has no fixed length; "
                                       "give --length SAMPLES")
    if options.length is not None and options.length != length:
        raise DatasetBuildError(model, f"input {spec.name!r} takes {length} samples, not {options.length}")
    return spec, length, place(length), [f"input {spec.name!r} {_shape_text(spec.shape)} {spec.dtype}"]


# ---------------------------------------------------------------------------- text


@dataclass(frozen=True)
class TextOptions:
    max_length: int | None = None
    inputs: tuple[str, ...] = ("input_ids", "attention_mask")   # without a model: the arrays written
    limit: int | None = None


def text_role(name: str) -> str | None:
    """input_ids / attention_mask / token_type_ids / position_ids, told by the input's name."""
    lowered = name.lower()
    for role, words in TEXT_ROLES:
        if any(word in lowered for word in words):
            return role
    return None


def build_from_text(text_file: str | os.PathLike[str], tokenizer_file: str | os.PathLike[str],
                    output: str | os.PathLike[str], *, model: str | os.PathLike[str] | None = None,
                    options: TextOptions = TextOptions()) -> BuiltDataset:
    """One sample per non-empty line of ``text_file``, tokenized with ``tokenizer_file`` (a
    tokenizers JSON file), truncated / padded to the input's sequence length (or the longest line)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise DatasetBuildError("text", f"tokenizing text needs tokenizers: {EXTRA_HINT}") from None
    _check_output(output)
    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
    except Exception as exc:  # the Rust side raises plain Exception for a bad file
        raise DatasetBuildError(tokenizer_file, f"not a tokenizers JSON file: {_first_line(exc)}") from None
    try:
        lines = [line.strip() for line in Path(text_file).read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetBuildError(text_file, f"cannot read as UTF-8 text: {_first_line(exc)}") from None
    lines = [line for line in lines if line][:options.limit]
    if not lines:
        raise DatasetBuildError(text_file, "holds no non-empty line")
    targets, length, notes = _text_geometry(model, options)
    if length is not None:
        tokenizer.enable_truncation(max_length=length)
    pad_id, pad_token = _pad(tokenizer)
    tokenizer.enable_padding(pad_id=pad_id, pad_token=pad_token, length=length)
    encodings = tokenizer.encode_batch(lines)
    columns = {"input_ids": [e.ids for e in encodings], "attention_mask": [e.attention_mask for e in encodings],
               "token_type_ids": [e.type_ids for e in encodings]}
    width = len(encodings[0].ids)
    columns["position_ids"] = [list(range(width))] * len(encodings)
    arrays = {name: np.asarray(columns[role], dtype=dtype) for name, role, dtype in targets}
    truncated = sum(1 for e in encodings if e.overflowing)
    notes.append(f"{len(lines)} lines, {width} tokens each (pad id {pad_id}"
                 + (f"; {truncated} line(s) truncated" if truncated else "") + ")")
    return _write(output, arrays, [], Path(text_file), False, notes, [])


def _text_geometry(model: Any, options: TextOptions):
    """([(array name, role, dtype)], fixed sequence length or None, notes)."""
    if model is None:
        targets = []
        for name in options.inputs:
            role = text_role(name)
            if role is None:
                raise DatasetBuildError("--inputs", f"cannot tell what {name!r} holds; name it input_ids, "
                                                    "attention_mask, token_type_ids or position_ids")
            targets.append((name, role, np.dtype(np.int64)))
        return targets, options.max_length, [f"arrays {', '.join(options.inputs)} (int64) from the flags"]
    targets, lengths, notes = [], set(), []
    for spec in model_inputs(model):
        role = text_role(spec.name)
        if role is None or len(spec.shape) != 2:
            raise DatasetBuildError(model, f"cannot tell what input {spec.name!r} {_shape_text(spec.shape)} takes "
                                           "from text (expected [batch, sequence] inputs named like input_ids, "
                                           "attention_mask, token_type_ids, position_ids)")
        targets.append((spec.name, role, spec.dtype))
        if spec.shape[1] is not None:
            lengths.add(spec.shape[1])
        notes.append(f"input {spec.name!r} {_shape_text(spec.shape)} {spec.dtype}: {role}")
    if "input_ids" not in {role for _, role, _ in targets}:
        raise DatasetBuildError(model, "no input takes token ids (a name with 'ids' or 'input')")
    if len(lengths) > 1:
        raise DatasetBuildError(model, f"the inputs fix different sequence lengths: {sorted(lengths)}")
    length = next(iter(lengths), None)
    if length is not None and options.max_length is not None and options.max_length != length:
        raise DatasetBuildError(model, f"the inputs take {length} tokens, not --max-length {options.max_length}")
    return targets, length or options.max_length, notes


def _pad(tokenizer) -> tuple[int, str]:
    padding = tokenizer.padding
    if padding:
        return int(padding["pad_id"]), str(padding["pad_token"])
    for token in ("[PAD]", "<pad>", "<|pad|>", "<PAD>"):
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id, token
    return 0, "[PAD]"


# ---------------------------------------------------------------------------- shared


def _check_output(output: str | os.PathLike[str]) -> None:
    """Before any work: the output's folder must exist (the file is written beside it, then renamed)."""
    parent = Path(output).parent
    if not parent.is_dir():
        raise DatasetBuildError(output, f"the folder {parent} does not exist")


def _files(folder: Path, extensions: set[str], limit: int | None) -> tuple[list[Path], list[Path]]:
    """(files to read, sorted; other files ignored). Refuses a folder that holds none."""
    if not folder.is_dir():
        raise DatasetBuildError(folder, "not a folder")
    found, ignored = [], []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        (found if path.suffix.lower() in extensions else ignored).append(path)
    if not found:
        raise DatasetBuildError(folder, f"holds no file with a known extension ({', '.join(sorted(extensions)[:12])} ...)")
    return found[:limit] if limit else found, ignored


def _labels(files: Sequence[Path], folder: Path) -> tuple[np.ndarray, list[str]] | None:
    """Class ids from the first-level sub-folder of each file, where every file has one."""
    parents = [path.relative_to(folder).parts for path in files]
    if not parents or any(len(parts) < 2 for parts in parents):
        return None
    classes = sorted({parts[0] for parts in parents})
    if len(classes) < 2:
        return None
    index = {name: i for i, name in enumerate(classes)}
    return np.asarray([index[parts[0]] for parts in parents], dtype=np.int64), classes


def _write(output: str | os.PathLike[str], arrays: dict[str, np.ndarray], owners: Sequence[Path], folder: Path,
           labels: bool, notes: list[str], ignored: Iterable[Path]) -> BuiltDataset:
    classes: list[str] = []
    if labels:
        found = _labels(owners, folder)
        if found is not None:
            arrays[LABELS], classes = found
    output = Path(output)
    ignored = list(ignored)
    if ignored:
        notes.append(f"ignored {len(ignored)} file(s) of other types, e.g. {ignored[0]}")
    # written beside the target and renamed: a failed run leaves nothing at ``output``
    handle = tempfile.NamedTemporaryFile(dir=output.parent or Path("."), prefix=f".{output.name}.", suffix=".partial",
                                         delete=False)
    try:
        with handle:
            np.savez(handle, **arrays)
        os.replace(handle.name, output)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
    samples = next(iter(arrays.values())).shape[0]
    summaries = [ArraySummary(name, tuple(a.shape), str(a.dtype), float(a.min()), float(a.max()))
                 for name, a in arrays.items()]
    return BuiltDataset(output, samples, summaries, notes, classes)


def _list(values: np.ndarray) -> str:
    return "[" + ", ".join(f"{v:g}" for v in values) + "]"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
