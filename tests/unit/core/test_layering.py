"""Imports point one way: core imports neither api nor worker nor featherweight; api never
imports worker or kernels. Checked on the source with ast, so lazy imports inside functions count too."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
# onnxruntime too: an uploaded model is opened by ONNX Runtime only in a worker's pool process
# (uploads are untrusted; an InferenceSession can exhaust memory before its first run), never in the API.
FORBIDDEN = {
    "core": {"api", "worker", "kernels", "featherweight", "onnxruntime"},
    "api": {"worker", "kernels", "featherweight", "onnxruntime"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_does_not_import_upward(package):
    offenders = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        bad = _imports(path) & FORBIDDEN[package]
        if bad:
            offenders[str(path.relative_to(ROOT))] = sorted(bad)
    assert offenders == {}


def test_pipeline_never_imports_service_libraries():
    offenders = {}
    for path in sorted((ROOT / "worker" / "pipeline").rglob("*.py")):
        bad = _imports(path) & {"celery", "sqlalchemy", "fastapi", "api", "starlette"}
        if bad:
            offenders[str(path.relative_to(ROOT))] = sorted(bad)
    assert offenders == {}
