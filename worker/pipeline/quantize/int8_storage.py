"""How int8 weights that feed ONNX Runtime's integer kernels are stored, per target CPU.

ONNX Runtime multiplies uint8 activations by int8 weights on x86 with its u8s8 GEMM. On AVX2
without VNNI that kernel uses ``vpmaddubsw``, which adds two u8 x s8 products into a *saturating*
int16: 255 * 127 * 2 overflows, and outputs drift (a 512 x 512 MatMul on random data: rel_l2
0.019 against 0.012 computed exactly). Its u8u8 kernel widens both operands to 16 bits first and
is exact (about 20% slower there, still faster than float). VNNI (``vpdpbusd``) and ARM's dot
products accumulate in 32 bits, so int8 is exact and fastest there.

So on an x86 worker without VNNI the same symmetric grid is stored shifted: ``q_u8 = q + 128`` with
zero point 128, ``(q_u8 - 128) * s == q * s`` exactly; docs/recipes.md's numbers (s = absmax / 127,
q = clamp(rne(w / s), -128, 127)) are unchanged, only the storage type differs. The report's
layer records say which (``weight_storage``).

Static int8 refines the automatic choice per layer (``pair_saturation``): from errors measured on
the calibration data, a layer takes the faster u8s8 kernel, with its 8-bit grid stored int8 or a
7-bit grid that cannot saturate, where that costs little accuracy, and keeps uint8 + 128 elsewhere.

The recipe's ``integer_weights`` ("int8" | "uint8" | "auto", default auto) forces one form for every
layer, for users who compress on one machine and deploy on another; ``ctx.options["integer_weights"]``
overrides it (tests).
"""
from __future__ import annotations

import numpy as np

from worker.pipeline import host


def cpu_has_vnni() -> bool:
    return host.cpu_info().has("vnni") or host.cpu_info().has("amx_int8")


def unsigned_weights(target: str, options: dict | None = None, requested: str = "auto") -> bool:
    """True where int8 weights for integer kernels must be stored as uint8 + 128 (see module doc).
    The automatic choice reads this host's CPU and is recorded in ``options`` (host.note_choice)."""
    forced = _requested(options, requested)
    if forced in ("int8", "uint8"):
        return forced == "uint8"
    cpu = host.cpu_info()
    unsigned = target == "cpu-x86" and cpu.arch == "x86_64" and not cpu_has_vnni()
    if target == "cpu-x86" and cpu.arch == "x86_64":
        read = host.feature_text(cpu, "vnni", "amx_int8")
    else:
        read = f"target {target} and this host's architecture ({cpu.arch}); no CPU feature decides it there"
    host.note_choice(options, "int8 weight storage", storage_name(unsigned), read)
    return unsigned


def chosen_by_host(options: dict | None = None, requested: str = "auto") -> bool:
    """True where neither the recipe nor the options force a storage form."""
    return _requested(options, requested) == "auto"


def _requested(options: dict | None, requested: str) -> str:
    """The recipe's ``integer_weights``, unless ``options`` (tests) override it."""
    return (options or {}).get("integer_weights", requested)


def note_measured(options: dict | None, eight_bit: int, seven_bit: int, unsigned: int) -> None:
    """Record static int8's per-layer refinement beside the host choice (``pair_saturation``)."""
    host.note_choice(options, "int8 weight storage per layer",
                     f"int8 on {eight_bit} integer layers, int8 on a 7-bit grid on {seven_bit}, "
                     f"uint8 + 128 on {unsigned}",
                     "u8s8 pair saturation and weight rounding measured on the calibration data")


def stored(q: np.ndarray, unsigned: bool) -> tuple[np.ndarray, int]:
    """(the array to store, its zero point) for symmetric int8 values ``q``."""
    if unsigned:
        return (q.astype(np.int16) + 128).astype(np.uint8), 128
    return q.astype(np.int8), 0


def storage_name(unsigned: bool) -> str:
    return "uint8 + 128 (u8u8: exact on AVX2 without VNNI)" if unsigned else "int8"
