"""Scale-out: the GPU worker image (Dockerfile) and the gpu pool's Kubernetes job, rendered for a real
flow run by prefect-kubernetes' own worker code and validated against the Kubernetes API schema."""

import asyncio
import json
import shlex

import kubernetes_validate
import pytest
import yaml
from dockerfile_parse import DockerfileParser
from prefect import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.flows import load_flow_from_entrypoint
from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

from tests.conftest import ROOT

# A Kubernetes release a cluster runs today; the schema of every object of the Job, strict (no field
# the API does not know).
KUBERNETES_VERSION = "1.33.0"


def _template() -> dict:
    return json.loads((ROOT / "deployments/gpu-kubernetes-job-template.json").read_text())


def _deployment(name: str) -> dict:
    spec = yaml.safe_load((ROOT / "deployments/prefect.yaml").read_text())
    return next(d for d in spec["deployments"] if d["name"] == name)


def _render_for_a_flow_run(job_variables: dict) -> dict:
    """What the gpu pool's worker submits for a retrain-on-update run: the pool, the deployment and its
    run on a real Prefect server, the Job manifest built by prefect-kubernetes from them."""
    spec = _deployment("retrain-on-update")
    with get_client(sync_client=True) as client:
        pool = client.create_work_pool(WorkPoolCreate(name="gpu-k8s", type="kubernetes",
                                                      base_job_template=_template()), overwrite=True)
        flow_id = client.create_flow(load_flow_from_entrypoint(str(ROOT / spec["entrypoint"])))
        deployment_id = client.create_deployment(flow_id, spec["name"], entrypoint=spec["entrypoint"],
                                                 parameters=spec["parameters"], work_pool_name=pool.name,
                                                 job_variables=job_variables)
        flow_run = client.create_flow_run_from_deployment(deployment_id)
        deployment = client.read_deployment(deployment_id)
        flow = client.read_flow(flow_id)
    config = asyncio.run(KubernetesWorkerJobConfiguration.from_template_and_values(
        pool.base_job_template, deployment.job_variables or {}))
    config.prepare_for_flow_run(flow_run, deployment, flow, pool, worker_name="gpu-worker")
    return config.job_manifest


@pytest.fixture(scope="module")
def job(prefect_server) -> dict:
    return _render_for_a_flow_run({"gpus": 2, "image": "registry.example/scoft-flows:1.2"})


# prefect-kubernetes' worker refuses a template whose pod spec lacks these two (a Job's fields, which
# the template also sets on the Job spec, where Kubernetes reads them); the API server drops them from
# the pod spec with a warning. They are the only fields of the rendered Job the API does not know.
WORKER_DEMANDS_IN_POD_SPEC = ("parallelism", "completions")


def assert_valid_job(job: dict) -> None:
    """Raises, naming the field, on anything the API server would refuse or ignore: a null where a
    string goes, a wrong type, a field the Job's API does not have."""
    kubernetes_validate.validate(job, KUBERNETES_VERSION, strict=False)
    strict = json.loads(json.dumps(job))
    for key in WORKER_DEMANDS_IN_POD_SPEC:
        del strict["spec"]["template"]["spec"][key]
    kubernetes_validate.validate(strict, KUBERNETES_VERSION, strict=True)


def test_the_rendered_job_is_valid_for_the_kubernetes_api(job):
    assert_valid_job(job)
    assert job["spec"]["parallelism"] == job["spec"]["completions"] == 1 and job["spec"]["backoffLimit"] == 0


def test_the_job_runs_the_flow_run_on_the_gpus_it_asked_for(job):
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "registry.example/scoft-flows:1.2"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["PREFECT__FLOW_RUN_ID"] and env["SCOFT_WORKSPACE"] == "/workspace"
    assert shlex.join(container["args"]).startswith("prefect flow-run execute")


def test_the_image_and_the_job_agree_on_user_and_workspace(job):
    """The pod runs as the image's own non-root user, which owns the workspace claim (fsGroup), mounted
    where the image keeps its workspace volume."""
    image = DockerfileParser(path=str(ROOT / "Dockerfile"))
    instructions = [(i["instruction"], i["value"]) for i in image.structure]
    assert "cuda" in image.baseimage and "runtime" in image.baseimage  # a CUDA runtime, not a devel image
    user = [v for k, v in instructions if k == "USER"][-1]
    assert user.isdigit() and int(user) != 0  # numeric: Kubernetes can check runAsNonRoot against it
    pod = job["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == pod["securityContext"]["fsGroup"] == int(user)
    volume = [v for k, v in instructions if k == "VOLUME"][-1]
    (mount,) = [m["mountPath"] for m in pod["containers"][0]["volumeMounts"] if m["name"] == "workspace"]
    assert json.loads(volume) == [mount] and image.envs["SCOFT_WORKSPACE"] == mount
    # the project is installed from what the build context holds
    copied = [v.split()[0] for k, v in instructions if k == "COPY"]
    assert all((ROOT / path).exists() for path in copied), copied
    assert {"scoft", "flows", "tasks", "pyproject.toml"} <= set(copied)


def test_a_deployment_that_names_no_image_still_gets_a_valid_job(prefect_server):
    job = _render_for_a_flow_run({})
    assert_valid_job(job)
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] == "scoft-flows:latest"
