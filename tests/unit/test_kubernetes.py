"""The Kubernetes manifests against what reads them: the training-operator v1.9 PyTorchJob CRD and
the Kubeflow Trainer v2.3 TrainJob CRD (tests/data/kubernetes, verbatim from the projects' release
tags), read as kubectl's strict field validation does (an unknown field is an error, not silently
dropped); and the PyTorchJob through the real kubeflow-training SDK, which refuses a job without a
runPolicy.  Every golden in generated/, and specs that reach the other branches (elastic, GPUs, a
volume claim, a namespace, nproc_per_node gpu); then the wrong manifests each check must refuse."""

from __future__ import annotations

import copy
import gzip
import json
from functools import cache

import jsonschema
import pytest
import yaml

from tests.conftest import REPO
from tests.unit.test_render_injection import render_all, spec_with

CRDS = REPO / "tests" / "data" / "kubernetes"
MANIFESTS = {"pytorchjob.yaml": "kubeflow.org_pytorchjobs.yaml.gz", "trainjob.yaml": "trainer.kubeflow.org_trainjobs.yaml.gz"}
GOLDENS = sorted(p for p in (REPO / "generated").glob("*/*.yaml"))


def strict(schema):
    """An openAPIV3Schema as strict field validation reads it: an object's unknown fields are errors
    where the schema does not preserve them; Kubernetes' own x- keys (CEL rules, list types) left out."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict(value) for key, value in schema.items() if not key.startswith("x-kubernetes-")}
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@cache
def validator(manifest: str) -> jsonschema.Draft7Validator:
    crd = yaml.safe_load(gzip.decompress((CRDS / MANIFESTS[manifest]).read_bytes()))
    (version,) = [v for v in crd["spec"]["versions"] if v["served"] and v["storage"]]
    schema = strict(version["schema"]["openAPIV3Schema"])
    kind = crd["spec"]["names"]["kind"]
    api_version = f"{crd['spec']['group']}/{version['name']}"
    schema["properties"]["kind"]["const"] = kind
    schema["properties"]["apiVersion"]["const"] = api_version
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    return jsonschema.Draft7Validator(schema)


def errors(manifest: str, job: dict) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator(manifest).iter_errors(job)]


def sdk_reads(job: dict):
    """The PyTorchJob as the training-operator SDK reads it (what TrainingClient.get_job returns)."""
    from kubeflow.training import ApiClient

    class Response:
        data = json.dumps(job)

    return ApiClient().deserialize(Response(), "KubeflowOrgV1PyTorchJob")


def variants() -> dict[str, dict[str, dict]]:
    specs = {
        "gpu-3-nodes": spec_with(mesh__device="cuda", launch__nproc_per_node=8, launch__nnodes="3",
                                 launch__kubernetes={"namespace": "ml", "volume_claim": "runs", "image": "me/img:1"}),
        "elastic-gpu": spec_with(mesh__device="auto", launch__nnodes="2:4", launch__nproc_per_node="gpu",
                                 launch__max_restarts=3),
        "cpu-nproc": spec_with(launch__nproc_per_node="cpu", launch__kubernetes={"runtime": "my-torch"}),
    }
    return {name: {k: yaml.safe_load(v) for k, v in render_all(spec, REPO / "generated" / "t").items()
                   if k.endswith(".yaml")} for name, spec in specs.items()}


def test_the_crd_files_are_the_released_ones():
    for manifest in MANIFESTS:
        assert validator(manifest).schema["properties"]["spec"]["properties"]  # parsed, with a spec schema
    assert GOLDENS and {p.name for p in GOLDENS} == set(MANIFESTS)


@pytest.mark.parametrize("path", GOLDENS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_golden_manifest_validates(path):
    job = yaml.safe_load(path.read_text())
    assert errors(path.name, job) == []
    if path.name == "pytorchjob.yaml":
        assert sdk_reads(job).spec.run_policy.clean_pod_policy == "None"


def test_manifests_of_every_branch_validate():
    rendered = variants()
    for name, files in rendered.items():
        for manifest, job in files.items():
            assert errors(manifest, job) == [], (name, manifest)
        sdk_reads(files["pytorchjob.yaml"])
    gpu = rendered["gpu-3-nodes"]["trainjob.yaml"]
    assert gpu["metadata"] == {"name": "t", "namespace": "ml"}
    assert gpu["spec"]["trainer"]["numNodes"] == 3 and gpu["spec"]["trainer"]["numProcPerNode"] == 8
    assert gpu["spec"]["trainer"]["resourcesPerNode"] == {"limits": {"nvidia.com/gpu": 8}}
    (patch,) = gpu["spec"]["runtimePatches"]
    pod = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    assert {v["name"]: v for v in pod["volumes"]}["runs"] == {"name": "runs", "persistentVolumeClaim": {"claimName": "runs"}}
    elastic = rendered["elastic-gpu"]
    assert elastic["trainjob.yaml"]["spec"]["trainer"]["numNodes"] == 4  # a TrainJob runs a fixed count: the most
    assert "numProcPerNode" not in elastic["trainjob.yaml"]["spec"]["trainer"]  # the runtime's auto
    assert elastic["pytorchjob.yaml"]["spec"]["elasticPolicy"]["maxReplicas"] == 4
    cpu = rendered["cpu-nproc"]["trainjob.yaml"]
    assert cpu["spec"]["runtimeRef"] == {"name": "my-torch"} and "resourcesPerNode" not in cpu["spec"]["trainer"]


def test_each_check_refuses_a_wrong_manifest():
    job = yaml.safe_load((REPO / "generated" / "tiny-llama" / "pytorchjob.yaml").read_text())
    no_policy = copy.deepcopy(job)
    del no_policy["spec"]["runPolicy"]
    assert errors("pytorchjob.yaml", no_policy) == []  # the CRD allows it; the SDK does not
    with pytest.raises(ValueError, match="run_policy"):
        sdk_reads(no_policy)
    typo = copy.deepcopy(job)
    typo["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["volumeMount"] = []
    assert any("'volumeMount' was unexpected" in e for e in errors("pytorchjob.yaml", typo))

    train = yaml.safe_load((REPO / "generated" / "tiny-llama" / "trainjob.yaml").read_text())
    for change, message in (
        (lambda j: j["spec"]["trainer"].update(numProcPerNode="auto"), "'auto' is not of type 'integer'"),
        (lambda j: j["spec"]["trainer"].update(numProcsPerNode=2), "'numProcsPerNode' was unexpected"),
        (lambda j: j["spec"]["runtimeRef"].pop("name"), "'name' is a required property"),
        (lambda j: j.update(kind="PyTorchJob"), "'TrainJob' was expected"),
    ):
        wrong = copy.deepcopy(train)
        change(wrong)
        assert any(message in e for e in errors("trainjob.yaml", wrong)), (message, errors("trainjob.yaml", wrong))
