"""Offline rendering of deploy/k8s (kustomize) and validation of every rendered manifest.

No kustomize binary is installable from this project's registries, so `render()` renders the
kustomizations itself, for exactly the features they use (resources, namespace, images,
replicas, strategic-merge patches) and refuses any other. Where `kubectl` is on the PATH, its
own `kubectl kustomize` output must equal ours. Every rendered object is validated offline:
the Kubernetes kinds against the official schemas (kubernetes-validate, strict: unknown
fields are errors), the Prometheus operator kinds against the subset schemas below.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
BASE = K8S / "base"
OVERLAY = K8S / "overlays" / "example"
KUBERNETES_VERSION = "1.30"  # the oldest minor still commonly supported by cloud providers
CLUSTER_SCOPED = {"Namespace"}
KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources", "namespace", "images", "replicas",
                      "patches"}

Doc = dict[str, Any]


# -- the renderer ------------------------------------------------------------------------------
def load_docs(path: Path) -> list[Doc]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def key(doc: Doc) -> tuple[str, str, str]:
    meta = doc.get("metadata") or {}
    return doc["kind"], str(meta.get("namespace", "")), meta["name"]


def merge(base: Any, patch: Any) -> Any:
    """Strategic merge, for what the overlays patch: maps merge key by key; lists of named
    objects (containers, env, ports, volumes) merge by name, the patch's items first (in its
    order, as kustomize's kyaml does), then the others; any other list is replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            if k.startswith("$"):
                raise AssertionError(f"strategic-merge directive {k} is not supported here")
            out[k] = merge(base[k], v) if k in base else copy.deepcopy(v)
        return out
    if (isinstance(base, list) and isinstance(patch, list) and patch
            and all(isinstance(i, dict) and "name" in i for i in base + patch)):
        by_name = {i["name"]: i for i in base}
        patched = [merge(by_name[i["name"]], i) if i["name"] in by_name else copy.deepcopy(i)
                   for i in patch]
        names = {i["name"] for i in patch}
        return patched + [copy.deepcopy(i) for i in base if i["name"] not in names]
    return copy.deepcopy(patch)


def _set_image(container: Doc, images: list[Doc]) -> None:
    name = container["image"].split("@")[0].rsplit(":", 1)[0]
    for image in images:
        if image["name"] == name:
            assert set(image) <= {"name", "newName", "newTag"}, image
            container["image"] = f"{image.get('newName', name)}:{image['newTag']}"


def render(directory: Path) -> list[Doc]:
    """What `kubectl apply -k DIRECTORY` would apply (for the features used here)."""
    kz = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kz) - KUSTOMIZATION_KEYS
    assert not unknown, f"{directory}: kustomization keys this renderer does not do: {unknown}"
    assert kz["kind"] == "Kustomization"
    docs: list[Doc] = []
    for entry in kz.get("resources", []):
        path = (directory / entry).resolve()
        docs += render(path) if path.is_dir() else load_docs(path)
    by_key = {(d["apiVersion"], d["kind"], d["metadata"]["name"]): i for i, d in enumerate(docs)}
    assert len(by_key) == len(docs), f"{directory}: duplicate resources"
    for patch_entry in kz.get("patches", []):
        assert set(patch_entry) == {"path"}, f"only file patches are supported: {patch_entry}"
        for patch in load_docs(directory / patch_entry["path"]):
            at = by_key[(patch["apiVersion"], patch["kind"], patch["metadata"]["name"])]
            docs[at] = merge(docs[at], patch)
    for rep in kz.get("replicas", []):
        targets = [d for d in docs if d["metadata"]["name"] == rep["name"]
                   and d["kind"] in ("Deployment", "StatefulSet")]
        assert len(targets) == 1, f"replicas: no single workload named {rep['name']}"
        targets[0]["spec"]["replicas"] = rep["count"]
    for doc in docs:
        pod = doc.get("spec", {}).get("template", {}).get("spec", {})
        for container in pod.get("containers", []) + pod.get("initContainers", []):
            _set_image(container, kz.get("images", []))
    if "namespace" in kz:
        for doc in docs:
            if doc["kind"] not in CLUSTER_SCOPED:
                doc["metadata"]["namespace"] = kz["namespace"]
    return docs


def rendered(directory: Path) -> dict[tuple[str, str, str], Doc]:
    docs = render(directory)
    return {key(d): d for d in docs}


def find(docs: list[Doc], kind: str, name: str | None = None) -> Doc:
    found = [d for d in docs if d["kind"] == kind
             and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


# -- schemas for the Prometheus operator's kinds (the fields this project uses, strictly) -------
_LABEL_SELECTOR = {
    "type": "object", "additionalProperties": False,
    "properties": {"matchLabels": {"type": "object",
                                   "additionalProperties": {"type": "string"}},
                   "matchExpressions": {"type": "array"}},
}
_METADATA = {
    "type": "object", "required": ["name"],
    "properties": {"name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                   "namespace": {"type": "string"},
                   "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                   "annotations": {"type": "object",
                                   "additionalProperties": {"type": "string"}}},
    "additionalProperties": False,
}
_DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?"
                                          r"(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
CRD_SCHEMAS: dict[tuple[str, str], Doc] = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": "ServiceMonitor"},
            "metadata": _METADATA,
            "spec": {
                "type": "object", "required": ["selector", "endpoints"],
                "additionalProperties": False,
                "properties": {
                    "jobLabel": {"type": "string"},
                    "selector": _LABEL_SELECTOR,
                    "namespaceSelector": {"type": "object"},
                    "endpoints": {"type": "array", "minItems": 1, "items": {
                        "type": "object", "additionalProperties": False,
                        "properties": {"port": {"type": "string"}, "path": {"type": "string"},
                                       "scheme": {"enum": ["http", "https"]},
                                       "interval": _DURATION, "scrapeTimeout": _DURATION},
                    }},
                },
            },
        },
    },
    ("monitoring.coreos.com/v1", "PrometheusRule"): {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": "PrometheusRule"},
            "metadata": _METADATA,
            "spec": {
                "type": "object", "required": ["groups"], "additionalProperties": False,
                "properties": {"groups": {"type": "array", "items": {
                    "type": "object", "required": ["name", "rules"],
                    "additionalProperties": False,
                    "properties": {
                        "name": {"type": "string", "minLength": 1},
                        "interval": _DURATION,
                        "rules": {"type": "array", "items": {
                            "type": "object", "required": ["expr"],
                            "additionalProperties": False,
                            "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                            "properties": {
                                "alert": {"type": "string"}, "record": {"type": "string"},
                                "expr": {"type": "string", "minLength": 1}, "for": _DURATION,
                                "labels": {"type": "object",
                                           "additionalProperties": {"type": "string"}},
                                "annotations": {"type": "object",
                                                "additionalProperties": {"type": "string"}},
                            },
                        }},
                    },
                }}},
            },
        },
    },
}


def validate(doc: Doc) -> None:
    schema = CRD_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
    if schema is not None:
        jsonschema.validate(doc, schema)
        return
    # Raises ValidationError for a bad object, SchemaNotFoundError for an unknown kind.
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


# -- tests ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("directory", [BASE, OVERLAY], ids=["base", "overlay"])
def test_every_rendered_manifest_is_valid(directory: Path) -> None:
    docs = render(directory)
    kinds = {d["kind"] for d in docs}
    assert kinds >= {"Deployment", "Service", "ConfigMap", "Secret", "PodDisruptionBudget",
                     "HorizontalPodAutoscaler", "NetworkPolicy", "StatefulSet",
                     "ServiceMonitor", "PrometheusRule", "ServiceAccount"}
    for doc in docs:
        try:
            validate(doc)
        except (jsonschema.ValidationError, kubernetes_validate.ValidationError) as exc:
            path = ".".join(str(p) for p in exc.absolute_path)
            pytest.fail(f"{directory.name}: {doc['kind']}/{doc['metadata']['name']}: "
                        f"{path}: {exc.message}")


def test_validation_rejects_what_a_cluster_would() -> None:
    """The validators are strict: an unknown field or a wrong type fails, an unknown kind too."""
    deployment = copy.deepcopy(find(render(BASE), "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)
    deployment = copy.deepcopy(find(render(BASE), "Deployment"))
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)
    rule = copy.deepcopy(find(render(BASE), "PrometheusRule"))
    rule["spec"]["groups"][0]["rules"][0]["for"] = "five minutes"
    with pytest.raises(jsonschema.ValidationError):
        validate(rule)
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        validate({"apiVersion": "example.com/v1", "kind": "Gadget", "metadata": {"name": "x"}})


def test_overlay_changes_what_it_says() -> None:
    base = render(BASE)
    overlay = render(OVERLAY)
    assert {key(d)[0::2] for d in overlay} == {key(d)[0::2] for d in base} | {
        ("Namespace", "modelgate")}
    assert all(d["metadata"].get("namespace") == "modelgate"
               for d in overlay if d["kind"] != "Namespace")
    deployment = find(overlay, "Deployment")
    assert deployment["spec"]["replicas"] == 3
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "registry.example.com/ml/modelgate:0.1.0"
    env = {e["name"]: e for e in container["env"]}
    assert env["MODELGATE_BLUE_URL"]["value"].startswith("http://iris-v1.")
    assert "valueFrom" in env["MODELGATE_ADMIN_TOKEN"]          # merged by name, not replaced
    assert container["resources"]["requests"]["cpu"] == "1"
    assert container["resources"]["limits"]["memory"] == "512Mi"
    assert find(overlay, "HorizontalPodAutoscaler")["spec"]["minReplicas"] == 3
    assert find(overlay, "ServiceMonitor")["metadata"]["labels"]["release"] == "prometheus"


@pytest.mark.parametrize("directory", [BASE, OVERLAY], ids=["base", "overlay"])
def test_renderer_matches_kubectl_kustomize_where_installed(directory: Path) -> None:
    """kubectl is not installable from this project's registries; where a machine has it,
    its rendering must be ours (this catches a renderer that drifts from kustomize)."""
    kubectl = shutil.which("kubectl")
    ours = rendered(directory)
    assert ours, "nothing rendered"
    if kubectl is None:
        return
    out = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    theirs = {key(d): d for d in yaml.safe_load_all(out) if d}
    assert sorted(theirs) == sorted(ours)
    for k, doc in ours.items():
        assert theirs[k] == doc, f"{k} differs from kubectl kustomize"
