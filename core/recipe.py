"""The recipe: an ordered list of compression steps (docs/recipes.md), validated before any work.

Owns the schema of every step's fields (pydantic, discriminated on ``op``, ``extra="forbid"``) and
``parse_recipe``, which turns JSON / YAML / a dict into a ``Recipe`` or raises ``RecipeError`` with
each bad field's path (``["steps", 0, "sparsity"]``). The pipeline's steps take their ``Params`` from
here, so the API (which never imports the worker) validates exactly what the worker will run.
"""
from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic import ValidationInfo

from core.errors import RecipeError

MAX_STEPS = 32
MAX_PATTERNS = 256
MAX_PATTERN_LENGTH = 256
MAX_RECIPE_BYTES = 64 * 1024

Pattern = Annotated[str, Field(min_length=1, max_length=MAX_PATTERN_LENGTH)]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)


class _WeightStep(_Spec):
    """Fields every step that rewrites weights takes: which tensors it may touch."""

    include: list[Pattern] = Field(default_factory=list, max_length=MAX_PATTERNS,
                                   description="glob patterns over initializer and node names; empty = all")
    exclude: list[Pattern] = Field(default_factory=list, max_length=MAX_PATTERNS)
    min_params: int = Field(1024, ge=0, description="tensors with fewer elements are left alone")


class CleanupStep(_Spec):
    op: Literal["cleanup"]
    fuse_matmul_add: bool = Field(True, description="fuse MatMul + Add into Gemm where it runs faster")


_NM = re.compile(r"^(\d{1,2}):(\d{1,2})$")


class PruneStep(_WeightStep):
    op: Literal["prune"]
    method: Literal["magnitude", "sparsegpt"] = "magnitude"
    sparsity: float = Field(..., ge=0.0, lt=1.0)
    structure: str = Field("unstructured", description='unstructured | "N:M" (e.g. "2:4") | channel')
    scope: Literal["global", "layer"] = "global"

    @field_validator("structure")
    @classmethod
    def _structure(cls, value: str) -> str:
        if value in ("unstructured", "channel"):
            return value
        match = _NM.match(value)
        if not match:
            raise ValueError('must be "unstructured", "channel" or "N:M" such as "2:4"')
        n, m = int(match.group(1)), int(match.group(2))
        if not (0 < n < m <= 32):
            raise ValueError("N:M needs 0 < N < M <= 32")
        return value

    @property
    def n_m(self) -> tuple[int, int] | None:
        match = _NM.match(self.structure)
        return (int(match.group(1)), int(match.group(2))) if match else None

    @model_validator(mode="after")
    def _combination(self) -> "PruneStep":
        if self.method == "sparsegpt" and self.structure == "channel":
            raise ValueError("sparsegpt prunes single weights or N:M groups, not whole channels")
        n_m = self.n_m
        if n_m is not None:
            # the pattern sets the sparsity: a different one given was silently ignored
            pattern = 1 - n_m[0] / n_m[1]
            if self.sparsity != 0 and abs(self.sparsity - pattern) > 1e-9:
                raise ValueError(f"sparsity {self.sparsity:g} with structure \"{self.structure}\" (at most N nonzero in "
                                 f"every M): that pattern's sparsity is {pattern:g}; give that, or 0 for the pattern's")
        return self

    @model_validator(mode="before")
    @classmethod
    def _pattern_sparsity(cls, data: Any) -> Any:
        """``sparsity: 0`` with an N:M pattern reads as the pattern's own (1 - N/M), so the report
        says what was pruned."""
        if isinstance(data, dict) and data.get("sparsity") == 0 and isinstance(data.get("structure"), str):
            match = _NM.match(data["structure"])
            if match and 0 < int(match.group(1)) < int(match.group(2)):
                return {**data, "sparsity": 1 - int(match.group(1)) / int(match.group(2))}
        return data


class LowrankStep(_WeightStep):
    op: Literal["lowrank"]
    rank_ratio: float | None = Field(None, gt=0.0, le=1.0,
                                     description="keep this fraction of each layer's parameters")
    energy: float | None = Field(None, gt=0.0, le=1.0,
                                 description="keep this fraction of the squared singular values")
    conv: Literal["channel", "spatial", "none"] = Field(
        "channel", description="Conv factorization: k x k with r outputs then 1 x 1 (channel), "
                               "k x 1 then 1 x k (spatial), or leave Conv alone")

    @model_validator(mode="after")
    def _one_budget(self) -> "LowrankStep":
        if (self.rank_ratio is None) == (self.energy is None):
            raise ValueError("give exactly one of rank_ratio or energy")
        return self


class ClusterStep(_WeightStep):
    op: Literal["cluster"]
    bits: int = Field(4, ge=1, le=8, description="2**bits shared values per tensor")
    init: Literal["kmeans++", "quantile"] = "kmeans++"


class WeightQuantSpec(_Spec):
    bits: Literal[1, 2, 4, 8] = 8
    symmetric: bool = True
    granularity: Literal["tensor", "channel", "block"] = "channel"
    block_size: int | None = Field(None, ge=16, le=256)
    scale_search: Literal["absmax", "minmax", "mse", "output"] | None = Field(
        None, description="how scales are chosen; default mse for method gptq at 4 or 2 bits, else absmax when "
                          "symmetric, minmax otherwise; output: the clip minimising the layer's output error on "
                          "calibration data (weight-only)")
    rounding: Literal["nearest", "adaround"] = Field(
        "nearest", description="round to nearest, or adaround: each weight rounded up or down as learned for the "
                               "layer's output error on calibration data (method rtn; weight-only or static int8)")

    @field_validator("block_size")
    @classmethod
    def _block_size(cls, value: int | None, info: ValidationInfo) -> int | None:
        # a field check, so a refusal names weights.block_size, not weights
        if value is not None and info.data.get("granularity", "channel") != "block":
            raise ValueError("block_size applies only to granularity: block")
        if value is not None and value & (value - 1):
            raise ValueError("block_size must be a power of two between 16 and 256")
        return value

    @model_validator(mode="after")
    def _block(self) -> "WeightQuantSpec":
        if self.granularity == "block" and self.block_size is None:
            object.__setattr__(self, "block_size", 32)
        if self.bits == 1 and (self.granularity != "channel" or not self.symmetric):
            raise ValueError("bits 1 (sign) is symmetric with one alpha per output channel")
        if self.bits == 1 and self.rounding != "nearest":
            raise ValueError("rounding adaround needs bits 2, 4 or 8 (bits 1 has one sign per weight)")
        return self


class ActivationQuantSpec(_Spec):
    bits: Literal[8] = 8
    # percentile by measurement: PP-OCRv4 det IoU 0.981 vs 0.970 (minmax) / 0.978 (mse), MiniLM equal
    calibration: Literal["minmax", "percentile", "entropy", "mse", "dynamic"] = "percentile"
    percentile: float = Field(99.999, gt=50.0, le=100.0)
    symmetric: bool = False
    int16: list[Pattern] = Field(default_factory=list, max_length=MAX_PATTERNS,
                                 description="static: glob patterns over tensor names quantized to 16 bits "
                                             "(uint16 / int16 QDQ, opset 21) instead of 8")


class QuantizeStep(_WeightStep):
    op: Literal["quantize"]
    weights: WeightQuantSpec | None = None
    activations: ActivationQuantSpec | None = None
    method: Literal["rtn", "gptq"] = "rtn"
    format: Literal["auto", "qdq", "matmulnbits"] = Field(
        "auto", description="weight-only MatMul as DequantizeLinear+MatMul (qdq) or MatMulNBits; "
                            "auto measures both on the target and keeps the faster")
    float_ops: list[Annotated[str, Field(max_length=64)]] = Field(
        default_factory=lambda: ["Softmax", "LayerNormalization", "InstanceNormalization",
                                 "GroupNormalization", "Erf", "Exp", "Log", "Pow", "Sqrt", "ReduceMean"],
        max_length=64, description="op types kept in float under static activation quantization")
    bias_correction: bool = True
    equalize: bool = Field(False, description="static int8: cross-layer equalization of Conv -> [ReLU ->] Conv "
                                              "chains (exact in float), and through Clip(0, m) where exact on the "
                                              "calibration data, before calibration")
    high_bias_absorption: bool = Field(
        False, description="static int8: for Conv -> Relu / Clip(0, m) -> Conv chains, the part of each channel that "
                           "stays in the activation's linear range on the calibration data moves from the first "
                           "Conv's bias into the second's (exact on that data; second Conv unpadded)")
    smoothquant: float | None = Field(
        0.5, ge=0.0, le=1.0, description="static int8: SmoothQuant alpha, activation outliers of MatMul / Gemm "
                                          "inputs moved into the weights (exact in float); null = off")
    # off by default: on all-MiniLM-L6-v2 int4 GPTQ it raised the output rel_l2 (0.195 -> 0.202), and it needs calibration data that RTN does not
    awq: bool = Field(
        False, description="weight-only 4 / 2 bits: activation-aware per-input-channel scales (AWQ), searched on "
                           "calibration data")
    embeddings: bool = Field(True, description="quantize Gather tables (embeddings) too")
    min_products: int = Field(
        64, ge=0, le=1 << 20,
        description="static int8: a Conv with fewer multiply-adds per output than this (a 3x3 depthwise conv has 9) "
                    "keeps float activations, its weight int8 (weight-only); 0 = none")
    float_gelu_inputs: bool = Field(
        True, description="static int8: a MatMul / Gemm whose input is a GELU output keeps float activations, "
                          "its weight int8 (weight-only)")
    max_output_error: float | None = Field(
        None, gt=0.0, le=10.0,
        description="bound on the model output's rel_l2 on the calibration data: the most sensitive weights and "
                    "activations move to higher precision (int8 instead of int4 / int2, float) until it holds")
    integer_weights: Literal["auto", "int8", "uint8"] = Field(
        "auto", description="static / dynamic int8: storage of the weights ONNX Runtime's integer kernels read. "
                            "auto on x86 CPUs without VNNI, where the fast int8 (u8s8) kernel saturates: static "
                            "int8 measures per layer and stores the 8-bit grid int8, a 7-bit grid int8, or the "
                            "8-bit grid uint8 + 128 (exact u8u8), whichever adds least error; dynamic int8 "
                            "stores uint8 + 128. auto is int8 elsewhere; int8 / uint8 force that storage of the "
                            "8-bit grid")

    @model_validator(mode="after")
    def _something(self) -> "QuantizeStep":
        if self.weights is None and self.activations is None:
            raise ValueError("give weights, activations or both")
        if self.method == "gptq" and (self.weights is None or self.weights.bits == 1):
            raise ValueError("gptq needs weights with bits 2, 4 or 8")
        if self.method == "gptq" and self.weights.rounding != "nearest":
            raise ValueError("weights.rounding adaround is for method rtn (gptq chooses its own rounding)")
        if (self.weights is not None and self.weights.rounding != "nearest" and self.activations is not None
                and self.activations.calibration == "dynamic"):
            raise ValueError("weights.rounding adaround is for weight-only or static int8 (dynamic int8 takes no "
                             "calibration data to learn it on)")
        if self.activations is not None and self.weights is not None and self.weights.bits != 8:
            raise ValueError("activation quantization needs 8-bit weights")
        return self

    @field_validator("awq")
    @classmethod
    def _awq(cls, value: bool, info: ValidationInfo) -> bool:
        weights, activations = info.data.get("weights"), info.data.get("activations")
        if value and (activations is not None or weights is None or weights.bits not in (2, 4)):
            raise ValueError("awq applies to weight-only quantization with weights.bits 4 or 2")
        return value

    @field_validator("weights")
    @classmethod
    def _output_scales(cls, value: "WeightQuantSpec | None") -> "WeightQuantSpec | None":
        if value is not None and value.scale_search == "output" and value.bits == 1:
            raise ValueError("scale_search output needs bits 2, 4 or 8 (bits 1 has its alpha)")
        return value

    @field_validator("activations")
    @classmethod
    def _weight_only_search(cls, value: "ActivationQuantSpec | None", info: ValidationInfo):
        weights = info.data.get("weights")
        if value is not None and weights is not None and weights.scale_search == "output":
            raise ValueError("weights.scale_search output is for weight-only quantization: omit activations "
                             "or choose absmax / minmax / mse")
        return value



class DistillStep(_WeightStep):
    op: Literal["distill"]
    method: Literal["layerwise", "kd"] = "layerwise"
    temperature: float = Field(4.0, gt=0.0, le=100.0)
    epochs: int = Field(3, ge=1, le=1000)
    learning_rate: float = Field(1e-3, gt=0.0, le=1.0)
    batch_size: int = Field(32, ge=1, le=65536)
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="kd: weight of the soft-label loss vs labels")
    damping: float = Field(1e-2, ge=0.0, le=10.0, description="layerwise: ridge term, relative")
    student_model_id: str | None = Field(None, max_length=64,
                                         description="distill into this uploaded model instead")


class Fp16Step(_Spec):
    op: Literal["fp16"]
    keep_io_types: bool = True
    op_block_list: list[Annotated[str, Field(max_length=64)]] = Field(default_factory=list, max_length=64)


Step = Annotated[
    Union[CleanupStep, PruneStep, LowrankStep, ClusterStep, QuantizeStep, DistillStep, Fp16Step],
    Field(discriminator="op"),
]

STEP_OPS = ("cleanup", "prune", "lowrank", "cluster", "quantize", "distill", "fp16")


class SensitivitySpec(_Spec):
    """Measure, before each quantize / prune step, every layer (and static activation) alone at the
    step's setting: report.json ``sensitivity``, the sensitivity.json artifact."""

    samples: int = Field(32, ge=1, le=4096, description="calibration samples the measurement runs on")
    top: int = Field(50, ge=1, le=100000, description="entries per step listed in report.json")


GOAL_METRICS = ("accuracy", "top1_agreement", "cosine", "rel_l2", "iou", "decision_agreement", "spearman",
                "ctc_agreement")
THRESHOLD_METRICS = ("iou", "decision_agreement")


class GoalSpec(_Spec):
    """An accuracy budget instead of (or besides) fixed steps: the service searches per-layer settings
    for the smallest / fastest model whose ``metric`` on the evaluation data stays within ``max_drop``
    of the original's. Whether ``output`` / ``metric`` fit the model is checked at submit (core.goal)."""

    metric: Literal["accuracy", "top1_agreement", "cosine", "rel_l2", "iou", "decision_agreement", "spearman",
                    "ctc_agreement"]
    output: str | None = Field(None, min_length=1, max_length=256, description="which model output (default: the first)")
    threshold: float | None = Field(None, validate_default=True,
                                    description="iou / decision_agreement: elements above it count")
    blank: int | None = Field(None, ge=0, validate_default=True,
                              description="ctc_agreement: the blank class's index on the last axis (default 0)")
    trim: list[Annotated[int, Field(ge=0)]] = Field(
        default_factory=list, max_length=64, validate_default=True,
        description="ctc_agreement: classes dropped from both ends of each decoded text before comparing "
                    "(a line recognizer's space class: a line's leading / trailing space is no content)")
    max_drop: float = Field(0.01, ge=0.0, le=1e6,
                            description="absolute drop from the original's score (rel_l2: the largest rel_l2)")
    minimize: Literal["size", "transport_size", "latency"] = "size"
    time_budget_s: float = Field(1200.0, gt=0.0, le=7 * 24 * 3600.0)
    holdout: float = Field(0.25, gt=0.0, lt=1.0, description="with calibration data only: the fraction held out "
                                                             "as evaluation data")
    carry: dict[Annotated[str, Field(min_length=1, max_length=256)], Annotated[str, Field(min_length=1, max_length=256)]] = Field(
        default_factory=dict, max_length=64,
        description="streaming models: output -> input fed back. The evaluation samples are then consecutive "
                    "steps of a stream, run one at a time in order, each after the first with these inputs "
                    "taken from the outputs the same model gave on the step before (a recurrent state), so the "
                    "score sees the drift a compressed model's state accumulates")

    @field_validator("carry")
    @classmethod
    def _carry_one_way(cls, value: dict[str, str]) -> dict[str, str]:
        inputs = list(value.values())
        if len(set(inputs)) != len(inputs):
            raise ValueError("each input is fed back from one output only")
        return value

    @field_validator("threshold")
    @classmethod
    def _threshold(cls, value: float | None, info: ValidationInfo) -> float | None:
        metric = info.data.get("metric")
        if metric in THRESHOLD_METRICS and value is None:
            raise ValueError(f"{metric} needs a threshold")
        if metric is not None and metric not in THRESHOLD_METRICS and value is not None:
            raise ValueError("threshold applies only to iou and decision_agreement")
        return value

    @field_validator("blank")
    @classmethod
    def _blank(cls, value: int | None, info: ValidationInfo) -> int | None:
        metric = info.data.get("metric")
        if metric == "ctc_agreement":
            return 0 if value is None else value
        if metric is not None and value is not None:
            raise ValueError("blank applies only to ctc_agreement")
        return value

    @field_validator("trim")
    @classmethod
    def _trim(cls, value: list[int], info: ValidationInfo) -> list[int]:
        metric = info.data.get("metric")
        if value and metric is not None and metric != "ctc_agreement":
            raise ValueError("trim applies only to ctc_agreement")
        return value


ExportFormat = Literal["onnx", "ort", "tflite", "pytorch"]


class Recipe(_Spec):
    steps: list[Step] = Field(default_factory=list, max_length=MAX_STEPS)
    sensitivity: SensitivitySpec | None = None
    goal: GoalSpec | None = None

    @field_validator("sensitivity", mode="before")
    @classmethod
    def _sensitivity_flag(cls, value: Any) -> Any:
        if value is True:
            return {}
        return None if value is False else value

    export: list[ExportFormat] = Field(
        default_factory=lambda: ["onnx"], min_length=1, max_length=8,
        description="deploy formats to hand back beside model.onnx (always produced): ort, tflite, pytorch")
    export_min_cosine: float = Field(
        0.99, ge=0.0, le=1.0, description="an exported format whose outputs' cosine with the compressed "
                                          "ONNX model's falls below this fails (that artifact only)")
    export_min_top1_agreement: float = Field(
        0.95, ge=0.0, le=1.0, description="the same bound on top-1 agreement, for classifier outputs")

    @field_validator("export")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("each format once")
        return value

    def extra_formats(self) -> list[str]:
        """The formats converted from model.onnx, in the order given."""
        return [fmt for fmt in self.export if fmt != "onnx"]

    def needs_calibration(self) -> list[str]:
        """Field paths of steps that cannot run without calibration data."""
        paths = []
        for index, step in enumerate(self.steps):
            if isinstance(step, PruneStep) and step.method == "sparsegpt":
                paths.append(f"steps.{index}.method")
            elif isinstance(step, QuantizeStep) and step.method == "gptq":
                paths.append(f"steps.{index}.method")
            elif isinstance(step, QuantizeStep) and step.activations and step.activations.calibration != "dynamic":
                paths.append(f"steps.{index}.activations.calibration")
            elif isinstance(step, DistillStep):
                paths.append(f"steps.{index}.method")
            if isinstance(step, QuantizeStep) and step.method != "gptq" and step.awq:
                paths.append(f"steps.{index}.awq")
            if (isinstance(step, QuantizeStep) and step.method != "gptq" and step.weights is not None
                    and step.weights.scale_search == "output"):
                paths.append(f"steps.{index}.weights.scale_search")
            if (isinstance(step, QuantizeStep) and step.weights is not None and step.weights.rounding != "nearest"
                    and step.activations is None):
                paths.append(f"steps.{index}.weights.rounding")
            if isinstance(step, QuantizeStep) and step.max_output_error is not None:
                paths.append(f"steps.{index}.max_output_error")
        return paths


def _error_path(loc: tuple[Any, ...], steps: list[Any]) -> list[Any]:
    """Drop pydantic's union tag from a location so paths read steps.0.sparsity, not steps.0.prune.sparsity."""
    path = list(loc)
    if len(path) >= 3 and path[0] == "steps" and isinstance(path[1], int) and path[2] in STEP_OPS:
        del path[2]
    return path


def parse_recipe(source: dict[str, Any] | str | bytes) -> Recipe:
    """Validate a recipe given as a dict, or as JSON / YAML text; raise RecipeError with field paths."""
    if isinstance(source, (str, bytes)):
        if len(source) > MAX_RECIPE_BYTES:
            raise RecipeError(f"recipe is larger than {MAX_RECIPE_BYTES} bytes", [{"loc": [], "msg": "too large"}])
        try:
            data = yaml.safe_load(source)
        except yaml.YAMLError as exc:
            raise RecipeError(f"recipe is neither JSON nor YAML: {exc}".splitlines()[0],
                              [{"loc": [], "msg": "not JSON or YAML"}]) from None
    else:
        data = source
    if not isinstance(data, dict):
        raise RecipeError("a recipe is a mapping with a 'steps' list", [{"loc": [], "msg": "expected a mapping"}])
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        steps = data.get("steps") if isinstance(data.get("steps"), list) else []
        errors = []
        for error in exc.errors(include_url=False):
            loc = _error_path(error["loc"], steps)
            msg = error["msg"].removeprefix("Value error, ")
            if error["type"] == "union_tag_invalid":
                loc, msg = loc + ["op"], f"unknown op {error['input'].get('op')!r}; expected one of {', '.join(STEP_OPS)}"
            elif error["type"] == "union_tag_not_found":
                loc, msg = loc + ["op"], f"every step needs an 'op', one of {', '.join(STEP_OPS)}"
            errors.append({"loc": loc, "msg": msg})
        first = errors[0]
        where = ".".join(str(part) for part in first["loc"]) or "recipe"
        raise RecipeError(f"invalid recipe: {where}: {first['msg']}", errors) from None
    if not recipe.steps and recipe.goal is None:
        why = "give steps (at least one), a goal, or both"
        raise RecipeError(f"invalid recipe: steps: {why}", [{"loc": ["steps"], "msg": why}])
    converted = next((index for index, step in enumerate(recipe.steps) if isinstance(step, Fp16Step)), None)
    for index, step in enumerate(recipe.steps):
        if converted is not None and index > converted and isinstance(step, QuantizeStep) \
                and step.activations is not None and step.activations.calibration != "dynamic":
            # ONNX Runtime's static int8 reads float32 around each layer: after fp16 the build failed
            # mid-job ("Type parameter (T) of Optype (Conv) bound to different types")
            why = (f"static int8 after steps.{converted} (fp16) would quantize float16 layers, which ONNX Runtime's "
                   "int8 kernels do not take: quantize first (int8 alone is the smaller model), or drop fp16")
            raise RecipeError(f"invalid recipe: steps.{index}.activations: {why}",
                              [{"loc": ["steps", index, "activations"], "msg": why}])
        if converted is not None and index > converted and isinstance(step, DistillStep) and step.method == "kd":
            # the trainer's float32 layers met float16 weights mid-job ("expected m1 and m2 to have
            # the same dtype")
            why = (f"kd after steps.{converted} (fp16) would train float16 layers, which the trainer does not: "
                   "distill first, then fp16")
            raise RecipeError(f"invalid recipe: steps.{index}.method: {why}",
                              [{"loc": ["steps", index, "method"], "msg": why}])
    if recipe.goal is not None:
        for index, step in enumerate(recipe.steps[:-1]):
            if isinstance(step, QuantizeStep):
                why = "with a goal, quantize is the last step (the search varies it per layer)"
                raise RecipeError(f"invalid recipe: steps.{index}.op: {why}", [{"loc": ["steps", index, "op"], "msg": why}])
        if sum(isinstance(step, QuantizeStep) for step in recipe.steps) > 1:
            why = "with a goal, at most one quantize step"
            raise RecipeError(f"invalid recipe: steps: {why}", [{"loc": ["steps"], "msg": why}])
    return recipe


def recipe_to_json(recipe: Recipe) -> str:
    return json.dumps(recipe.model_dump(mode="json", exclude_none=True), sort_keys=True)

