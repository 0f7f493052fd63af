"""Render a kustomization directory to one YAML stream, without kubectl or kustomize.

    python deploy/k8s/render.py [deploy/k8s/base] > featherweight.yaml

Implements exactly the kustomization fields deploy/k8s uses, and refuses any other (so a field
added to kustomization.yaml that this renderer would silently ignore fails loudly instead):
``resources`` (YAML files, several documents each), ``namespace`` (set on every namespaced object),
``labels`` (``pairs`` added to every object's metadata.labels; ``includeSelectors: false`` only)
and ``images`` (``name`` -> ``newName``:``newTag`` in every container's image). ``kubectl apply -k``
renders the same directory the same way.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import yaml

KNOWN = {"apiVersion", "kind", "namespace", "labels", "resources", "images"}
# kinds in deploy/k8s that live outside any namespace
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "StorageClass"}


class RenderError(ValueError):
    pass


def _pod_specs(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = obj.get("spec") or {}
    if obj.get("kind") == "Pod":
        return [spec]
    template = (spec.get("jobTemplate", {}).get("spec", {}) if obj.get("kind") == "CronJob" else spec).get("template")
    return [template.get("spec") or {}] if isinstance(template, dict) else []


def render(directory: str | Path) -> list[dict[str, Any]]:
    directory = Path(directory)
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - KNOWN
    if unknown:
        raise RenderError(f"kustomization.yaml: fields this renderer does not implement: {sorted(unknown)}")
    objects: list[dict[str, Any]] = []
    for resource in kustomization.get("resources", []):
        path = directory / resource
        if not path.is_file():
            raise RenderError(f"kustomization.yaml: resource {resource!r} is not a file here")
        objects += [copy.deepcopy(doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    namespace = kustomization.get("namespace")
    images = {image["name"]: image for image in kustomization.get("images", [])}
    for obj in objects:
        metadata = obj.setdefault("metadata", {})
        if namespace and obj.get("kind") not in CLUSTER_SCOPED:
            metadata["namespace"] = namespace
        for entry in kustomization.get("labels", []):
            if entry.get("includeSelectors", False) or entry.get("includeTemplates", False):
                raise RenderError("kustomization.yaml: labels with includeSelectors / includeTemplates are not implemented")
            metadata.setdefault("labels", {}).update(entry.get("pairs", {}))
        for pod in _pod_specs(obj):
            for container in pod.get("containers", []) + pod.get("initContainers", []):
                name, _, tag = container["image"].partition(":")
                if name in images:
                    image = images[name]
                    container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag or 'latest')}"
    return objects


def main(argv: list[str]) -> int:
    directory = argv[0] if argv else str(Path(__file__).resolve().parent / "base")
    sys.stdout.write(yaml.safe_dump_all(render(directory), sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
