"""The reference under docs/ stays complete and every page a file points to exists.

- every field of the recipe models (core.recipe, walked recursively through the step union and
  nested specs) and every value its Literal fields allow are in docs/recipes.md;
- every key of report.json, collected from tiny compress runs that use every op, is in docs/report.md;
- every setting of core.settings.Settings is in docs/settings.md;
- every command and long option of the ``featherweight`` parser is in docs/cli.md or docs/datasets.md;
- no file in the repository names a Markdown page that is not in the repository, and a link's
  ``#anchor`` names a heading of that page.
"""
from __future__ import annotations

import argparse
import os
import re
import tempfile
import typing
from pathlib import Path

import numpy as np
import onnx
import pytest
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[2]
_BACKTICKED = re.compile(r"`([^`\n]+)`")


def _names_in(*pages: str) -> set[str]:
    """Names the pages (paths from the repository root) document: each backticked token, and the last part of each backticked path
    (``layers[].sqnr_db`` documents ``sqnr_db``; ``.node`` documents ``node``)."""
    names: set[str] = set()
    for page in pages:
        for token in _BACKTICKED.findall((ROOT / page).read_text(encoding="utf-8")):
            names.add(token)
            for part in re.split(r"[.\s,=:]+", token):
                part = part.replace("[]", "").strip("*`'\"()")
                if part:
                    names.add(part)
    return names


# ---------------------------------------------------------------------------- recipes


def _models_and_literals(annotation, models: dict[str, type[BaseModel]], literals: set[str]) -> None:
    origin = typing.get_origin(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        if annotation.__name__ not in models:
            models[annotation.__name__] = annotation
            for info in annotation.model_fields.values():
                _models_and_literals(info.annotation, models, literals)
        return
    if origin is typing.Literal:
        literals.update(str(value) for value in typing.get_args(annotation))
        return
    for arg in typing.get_args(annotation):
        _models_and_literals(arg, models, literals)


def test_every_recipe_field_and_choice_is_documented():
    from core.recipe import Recipe

    models: dict[str, type[BaseModel]] = {}
    literals: set[str] = set()
    _models_and_literals(Recipe, models, literals)
    assert {"PruneStep", "QuantizeStep", "WeightQuantSpec", "ActivationQuantSpec", "Fp16Step"} <= set(models)
    documented = _names_in("docs/recipes.md")
    missing = sorted(f"{model}.{field}" for model, cls in models.items() for field in cls.model_fields
                     if field not in documented)
    assert missing == [], f"recipe fields missing from docs/recipes.md: {missing}"
    text = (ROOT / "docs/recipes.md").read_text(encoding="utf-8")
    missing_values = sorted(value for value in literals if value not in text)
    assert missing_values == [], f"recipe choices missing from docs/recipes.md: {missing_values}"


# ---------------------------------------------------------------------------- report

# Maps keyed by tensor names: their keys are data, their values' keys are fields.
NAME_KEYED = {"sparse_storage", "formats", "format_latency_ms", "float_activations", "rtn_fallback",
              "input_shapes", "stored_dtypes", "candidate_bytes",
              "weights"}   # higher_precision.weights: weight name -> its level; elsewhere a list

RUNS = [
    ("mlp", [{"op": "cleanup"}, {"op": "prune", "sparsity": 0.5},
             {"op": "quantize", "weights": {"bits": 8}, "activations": {"bits": 8}}]),
    ("mlp", [{"op": "lowrank", "rank_ratio": 0.5, "min_params": 16}, {"op": "cluster", "bits": 4, "min_params": 16}]),
    ("mlp", [{"op": "prune", "sparsity": 0.5, "method": "sparsegpt"},
             {"op": "quantize", "weights": {"bits": 4, "granularity": "block"}, "method": "gptq"},
             {"op": "distill"}]),
    ("mlp", [{"op": "quantize", "weights": {"bits": 8}, "activations": {"calibration": "dynamic"}}]),
    ("mlp", [{"op": "quantize", "weights": {"bits": 1}}, {"op": "fp16"}]),
    ("cnn_bn", [{"op": "cleanup"}, {"op": "prune", "sparsity": 0.3, "structure": "channel", "min_params": 16},
                {"op": "distill"}]),
    # a whole recipe: the export formats' report (tflite's converter fields are listed in its own docs)
    ("mlp", {"steps": [{"op": "quantize", "weights": {"bits": 8}}], "export": ["onnx", "ort", "pytorch"]}),
    # a whole recipe where the top level matters: sensitivity, an error bound, a goal
    ("mlp", {"sensitivity": {"samples": 8},
             "steps": [{"op": "quantize", "weights": {"bits": 4, "granularity": "block", "block_size": 32},
                        "min_params": 16, "max_output_error": 0.001}]}),
    ("mlp", {"goal": {"metric": "cosine", "max_drop": 0.001, "time_budget_s": 60},
             "steps": [{"op": "quantize", "weights": {"bits": 8}, "activations": {"bits": 8}, "min_params": 16}]}),
]


def _keys(value, path: str, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            child = f"{path}.{key}" if path else key
            out[child] = key
            if key in NAME_KEYED and isinstance(item, dict):
                for inner in item.values():
                    _keys(inner, child + ".*", out)
            else:
                _keys(item, child, out)
    elif isinstance(value, list):
        for item in value:
            _keys(item, path + "[]", out)


@pytest.fixture(scope="module")
def report_keys() -> dict[str, str]:
    from core.recipe import parse_recipe
    from tests.unit.pipeline import builders
    from worker.pipeline import runner

    keys: dict[str, str] = {}
    options = {"latency_runs": 2, "latency_budget_s": 0.2, "fidelity_samples": 16, "layer_error_samples": 8}
    for builder, steps in RUNS:
        model = builders.mlp(inputs=32, hidden=64, classes=4) if builder == "mlp" else getattr(builders, builder)()
        data = builders.random_inputs(model, 16)
        data["_labels"] = np.arange(16) % 4
        with tempfile.TemporaryDirectory() as scratch:
            path = Path(scratch) / "model.onnx"
            onnx.save(model, str(path))
            recipe = parse_recipe(steps if isinstance(steps, dict) else {"steps": steps})
            result = runner.run(path, recipe, calibration=data, evaluation=data,
                                workdir=Path(scratch) / "work", options=dict(options))
        _keys(result.report, "", keys)
    return keys


def test_every_report_field_is_documented(report_keys):
    # the runs reach what the page must cover: both models, ratios, accuracy, layers and every op's record
    for expected in ("size_ratio", "accuracy.compressed", "layers[].sqnr_db", "steps[].sparse_storage.*.fill",
                     "steps[].kept_float32", "steps[].layers[].rel_l2_after", "steps[].param_ratio",
                     "sensitivity[].entries[].error", "steps[].mixed_precision.met", "goal.chosen", "candidates[].pareto"):
        assert expected in report_keys
    documented = _names_in("docs/report.md")
    missing = sorted(path for path, name in report_keys.items() if name not in documented)
    assert missing == [], f"report.json fields missing from docs/report.md: {missing}"


# ---------------------------------------------------------------------------- settings and CLI


def test_every_setting_is_documented():
    from core.settings import Settings

    documented = _names_in("docs/settings.md")
    missing = sorted(name for name in Settings.model_fields if name not in documented)
    assert missing == [], f"settings missing from docs/settings.md: {missing}"


def _commands(parser: argparse.ArgumentParser, prefix: str, out: dict[str, list[str]]) -> None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out[f"{prefix} {name}".strip()] = [option for a in sub._actions for option in a.option_strings
                                                   if option.startswith("--") and option != "--help"]
                _commands(sub, f"{prefix} {name}", out)


def test_every_cli_command_and_option_is_documented():
    from featherweight.cli import build_parser

    commands: dict[str, list[str]] = {}
    _commands(build_parser(), "", commands)
    assert "dataset images" in commands and "compress" in commands
    text = (ROOT / "docs/cli.md").read_text(encoding="utf-8") + (ROOT / "docs/datasets.md").read_text(encoding="utf-8")
    missing = sorted(f"featherweight {command}" for command in commands if f"featherweight {command}" not in text
                     and not any(f"featherweight {command} " in line or line.endswith(f"featherweight {command}")
                                 for line in text.splitlines()))
    missing += sorted(f"featherweight {command} {option}" for command, options in commands.items()
                      for option in options if option not in text)
    assert missing == [], f"missing from docs/cli.md: {missing}"


# ---------------------------------------------------------------------------- links

SKIP_DIRS = {".git", ".venv", "venv", "build", "dist", "node_modules", "__pycache__", ".pytest_cache", "out",
             ".hypothesis", ".mypy_cache", ".ruff_cache"}
TEXT_SUFFIXES = {".py", ".md", ".toml", ".yml", ".yaml", ".cfg", ".ini", ".txt", ".sh", ".c", ".h", ".html",
                 ".mako", ".json"}
TEXT_NAMES = {"Makefile", "Dockerfile", ".dockerignore", ".gitignore", "run"}
_MD_REFERENCE = re.compile(r"(?<![\w/.:-])((?:\.{1,2}/)?[\w./-]*[\w-]\.md)(#[\w-]+)?(?![\w])")


def _repo_files():
    for directory, subdirs, files in os.walk(ROOT):
        subdirs[:] = [d for d in subdirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        for name in files:
            path = Path(directory) / name
            if path.suffix in TEXT_SUFFIXES or name in TEXT_NAMES:
                yield path


def _slug(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    return {_slug(line.lstrip("#")) for line in page.read_text(encoding="utf-8").splitlines() if line.startswith("#")}


def test_no_file_points_to_a_page_the_repository_lacks():
    broken = []
    checked = 0
    for path in _repo_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            for match in _MD_REFERENCE.finditer(line):
                if "://" in line[max(0, match.start() - 80):match.start()] and "](" not in line:
                    continue    # part of a URL
                reference, anchor = match.group(1), match.group(2)
                checked += 1
                target = next((base / reference for base in (path.parent, ROOT) if (base / reference).is_file()), None)
                where = f"{path.relative_to(ROOT)}:{number}: {reference}{anchor or ''}"
                if target is None:
                    broken.append(where)
                elif anchor and anchor[1:] not in _anchors(target):
                    broken.append(where + " (no such heading)")
    assert checked > 20     # the scan sees the README's and the docstrings' references
    assert broken == [], f"references to Markdown pages the repository lacks: {broken}"
