"""The deploy formats a recipe's ``export`` list may name (docs/recipes.md), and whether this
installation can produce each.

Owns the format names, the optional extra (``pip install 'featherweight[<extra>]'``) each heavy
converter comes from, and ``check_formats``, which refuses, with the field's path, a recipe that
asks for a format whose extra is not installed. The API calls it at submit (it never imports the
worker or the converters: it only asks whether their modules can be found), ``featherweight
compress`` and the worker through the pipeline's checks.
"""
from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import Any

from core.errors import RecipeError

FORMATS = ("onnx", "ort", "tflite", "pytorch")

# format -> (extra, modules its converter and runtime import)
EXTRAS: dict[str, tuple[str, tuple[str, ...]]] = {
    "pytorch": ("torch", ("torch",)),
    "tflite": ("tflite", ("onnx2tf", "tensorflow", "ai_edge_litert")),
}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):   # a parent package that fails to import counts as absent
        return False


def missing_extra(fmt: str) -> str | None:
    """Why ``fmt`` cannot be produced here (the extra to install), or None when it can."""
    if fmt not in EXTRAS:
        return None
    extra, modules = EXTRAS[fmt]
    absent = [module for module in modules if not _installed(module)]
    if not absent:
        return None
    return (f"export {fmt!r} needs the optional extra 'featherweight[{extra}]' "
            f"(not installed here: {', '.join(absent)})")


def check_formats(formats: Sequence[str], prefix: Sequence[Any] = ()) -> None:
    """Raise RecipeError at ``[*prefix, "export", i]`` for the first format this installation lacks."""
    errors = [{"loc": [*prefix, "export", index], "msg": reason}
              for index, fmt in enumerate(formats) if (reason := missing_extra(fmt)) is not None]
    if errors:
        where = ".".join(str(part) for part in errors[0]["loc"][len(prefix):])
        raise RecipeError(f"invalid recipe: {where}: {errors[0]['msg']}", errors)
