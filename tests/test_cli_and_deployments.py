"""The command line reads params.yaml and explains bad values; deployments name loadable flows, and
the GPU work pool templates render."""

import asyncio
import json
from pathlib import Path

import pytest
import yaml
from prefect import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.flows import load_flow_from_entrypoint
from prefect.utilities.templating import apply_values
from prefect.workers.base import BaseJobConfiguration
from prefect.workers.process import ProcessJobConfiguration

from scoft.config import ConfigError, load_params
from tests.conftest import ROOT, scoft


def _params_with(tmp_path: Path, section: str, key: str, value) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params[section][key] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_default_params_load():
    p = load_params(ROOT / "params.yaml")
    assert p.model.base == "tiny" and p.train.loss_weights.contrastive == 0.05
    assert p.features.evaluation != p.features.contrastive  # +MPC is not judged by the network it trains on


def test_params_yaml_ships_the_codes_defaults():
    """The lineage summary lists the params that differ from the defaults: a default that drifted
    from params.yaml would be listed on every run."""
    from scoft.lineage import params_changed_from_defaults

    p = load_params(ROOT / "params.yaml").model_dump(by_alias=True)
    sections = [name for name in p if name != "validate"]  # validate.cultures has no default
    assert params_changed_from_defaults({name: p[name] for name in sections}) == {}


@pytest.mark.parametrize("section,key,value,expected", [
    ("train", "lr", -1, "train.lr: Input should be greater than 0"),
    ("train", "contrastive_form", "triplet", "train.contrastive_form"),
    ("model", "resolution", 33, "model.resolution: Value error, must be a multiple of 8"),
    ("ingest", "heldout_fraction", 1.5, "ingest.heldout_fraction"),
    ("train", "lora_rnk", 4, "train.lora_rnk: Extra inputs are not permitted"),
    ("model", "base", "/no/such/model-folder", "model.base: Value error, '/no/such/model-folder' is neither 'tiny'"),
    ("model", "base", "not a hub id!", "model.base: Value error"),
    ("negatives", "controlnet", "lllyasviel//depth", "negatives.controlnet: Value error"),
    ("negatives", "depth_estimator", "./missing-dpt", "negatives.depth_estimator: Value error"),
    ("features", "weights", {"dinov2": "../nope/", "clip": "tiny"}, "features.weights.dinov2: Value error"),
    ("ingest", "captioner", "Salesforce/blip--base", "ingest.captioner: Value error"),
    ("validate", "cultures", ["KOR", "XYZ"], "validate.cultures.1: Value error, 'XYZ' is not an ISO 3166-1 alpha-3"),
    ("validate", "categories", ["ARCH", "SPORTS"], "validate.categories.1: Value error, 'SPORTS' is not a known"),
    ("validate", "min_side", 9000, "min_side (9000) is above max_side (8192)"),
    ("validate", "min_aspect", 5.0, "min_aspect (5.0) is above max_aspect (4.0)"),
    ("validate", "caption_min_chars", 500, "caption_min_chars (500) is above caption_max_chars (400)"),
    ("train", "seed", 2**64, "train.seed: Input should be less than 4294967296"),
    ("negatives", "seed", -1, "negatives.seed: Input should be greater than or equal to 0"),
    ("review", "database_url", "postgresql+psycopg://u:pw@db/reviews", "review.database_url: Value error, holds a "
     "password"),
])
def test_bad_value_is_named_with_its_key(tmp_path, section, key, value, expected):
    with pytest.raises(ConfigError) as err:
        load_params(_params_with(tmp_path, section, key, value))
    assert expected in str(err.value)


def test_good_locations_are_accepted(tmp_path):
    folder = tmp_path / "my-base"
    folder.mkdir()
    real_backbones = yaml.safe_load((ROOT / "profiles/reference.yaml").read_text())["features"]
    for value in (str(folder), "stable-diffusion-v1-5/stable-diffusion-v1-5", "gpt2"):
        _params_with(tmp_path, "model", "base", value)
        params = yaml.safe_load((tmp_path / "params.yaml").read_text())
        params["features"] = real_backbones  # the planted world's backbones need the planted base
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
        assert load_params(tmp_path / "params.yaml").model.base == value


def test_a_joint_lora_cannot_be_fanned_out_per_culture(tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"]["lora_per_culture"] = False
    params.setdefault("orchestration", {})["culture_deployment"] = "retrain-culture/retrain-culture"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match="with train.lora_per_culture false the one joint LoRA"):
        load_params(tmp_path / "params.yaml")


def test_a_params_file_that_is_not_utf8_exits_2(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_bytes((ROOT / "params.yaml").read_bytes().replace(b"base: tiny", b"base: t\xffny"))
    out = scoft("validate", "--params", str(bad), cwd=tmp_path)
    assert out.returncode == 2 and "not UTF-8 text" in out.stderr, out.stderr


@pytest.mark.parametrize("name,edit", [
    ("alias bomb", lambda text: "\n".join(["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"] + [
        f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]) + "\n"
        + text.replace("sources: [data/sample]", "sources: *a9")),
    ("5,000-digit integer", lambda text: text.replace("seed: 0 ", "seed: " + "9" * 5000 + " ")),
])
def test_a_monstrous_value_gets_a_short_message_and_exit_2(tmp_path, name, edit):
    from tests.helpers import scoft_here

    bad = tmp_path / "params.yaml"
    bad.write_text(edit((ROOT / "params.yaml").read_text()))
    out = scoft_here("validate", "--params", str(bad), cwd=tmp_path)
    assert out.returncode == 2 and len(out.stderr) < 5000, (name, len(out.stderr))
    assert ("ingest.sources.0: Input should be a valid string" if name == "alias bomb" else
            "a value cannot be read") in out.stderr


def test_credentials_in_a_url_are_refused_and_never_printed(tmp_path):
    params = _params_with(tmp_path, "remote", "url", "s3://bucket/prefix")
    out = scoft("remote", "--endpoint-url", "http://AKIDKEY:s3cr3t-value@127.0.0.1:9000", "--params", str(params),
                cwd=tmp_path)
    assert out.returncode == 2 and "holds credentials" in out.stderr
    assert "s3cr3t-value" not in out.stdout + out.stderr and "AKIDKEY" not in out.stdout + out.stderr
    for section, key, value in (("remote", "endpoint_url", "https://k:s3cr3t-value@minio.local"),
                                ("ingest", "sources", ["https://u:s3cr3t-value@sheets.example/ccub.csv"])):
        with pytest.raises(ConfigError) as err:
            load_params(_params_with(tmp_path, section, key, value))
        assert "holds credentials" in str(err.value) and "s3cr3t-value" not in str(err.value)


def test_every_command_refuses_a_bad_params_file_with_exit_2(tmp_path):
    bad = _params_with(tmp_path, "train", "lr", "fast")
    for command in (["ingest"], ["validate"], ["negatives"], ["train"], ["evaluate"], ["run"]):
        out = scoft(*command, "--params", str(bad), cwd=tmp_path)
        assert out.returncode == 2, (command, out.stderr)
        assert "train.lr" in out.stderr


def test_ingest_command_names_a_bad_row_and_exits_3(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "metadata.jsonl").write_text('{"file_name": "../secret.png", "text": "a house", '
                                        '"country_code": "KOR", "category_code": "ARCH"}\n')
    out = scoft("ingest", "--source", str(src), "--out", str(tmp_path / "ccub"),
                "--params", str(ROOT / "params.yaml"), cwd=tmp_path)
    assert out.returncode == 3
    assert "metadata.jsonl:1" in out.stderr and "../secret.png" in out.stderr
    assert not (tmp_path / "ccub").exists()


def test_every_deployment_entrypoint_loads_a_flow():
    spec = yaml.safe_load((ROOT / "deployments/prefect.yaml").read_text())
    deployments = spec["deployments"]
    assert any(d["entrypoint"].endswith(":retrain") and d["work_pool"]["name"] == "gpu" and d.get("schedules")
               for d in deployments)
    assert any(d["entrypoint"].endswith(":ingest") and d["work_pool"]["name"] == "cpu" and d.get("schedules")
               for d in deployments)
    triggered = [d for d in deployments if d.get("triggers")]
    assert triggered and triggered[0]["triggers"][0]["expect"] == ["ccub.updated"]
    # the triggered run trains on the announced version, pulled from the DVC remote
    assert triggered[0]["triggers"][0]["parameters"]["ccub_version"] == "{{ event.payload.version }}"
    # the retrain run's announcement of a candidate awaiting approval starts an approval run on the cpu pool
    from tasks.promote import AWAITING_APPROVAL

    approval = next(d for d in deployments if d["name"] == "approve-candidate")
    assert approval["work_pool"]["name"] == "cpu" and approval["triggers"][0]["expect"] == [AWAITING_APPROVAL]
    assert approval["triggers"][0]["parameters"]["lora_sha256"] == "{{ event.payload.lora_sha256 }}"
    for d in deployments:
        flow = load_flow_from_entrypoint(str(ROOT / d["entrypoint"]))
        assert flow.name.replace("-", "_") == d["entrypoint"].rsplit(":", 1)[1]


def _job_template(kind: str) -> dict:
    return json.loads((ROOT / f"deployments/gpu-{kind}-job-template.json").read_text())


@pytest.mark.parametrize("kind", ["process", "kubernetes"])
def test_gpu_work_pool_templates_are_accepted_by_a_prefect_server(prefect_server, kind):
    """`prefect work-pool create gpu --type KIND --base-job-template ...` as docs/reference.md says."""
    template = _job_template(kind)
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=f"gpu-{kind}", type=kind, base_job_template=template))
        assert client.read_work_pool(f"gpu-{kind}").base_job_template == template


def test_the_process_gpu_job_pins_its_gpu_and_keeps_telemetry_off():
    config = asyncio.run(ProcessJobConfiguration.from_template_and_values(
        _job_template("process"), {"env": {"CUDA_VISIBLE_DEVICES": "1"}}))
    assert config.env["CUDA_VISIBLE_DEVICES"] == "1"  # a deployment's job variables choose the GPU
    assert config.env["GX_ANALYTICS_ENABLED"] == "false" and config.env["DO_NOT_TRACK"] == "1"


def test_the_kubernetes_gpu_job_asks_for_the_gpus_the_run_wants_and_mounts_the_workspace():
    template = _job_template("kubernetes")
    values = BaseJobConfiguration._get_base_config_defaults(template["variables"]["properties"])
    job = apply_values(template["job_configuration"], values | {"gpus": 2, "image": "registry.example/scoft:1.2"})
    pod = job["job_manifest"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "registry.example/scoft:1.2"
    assert (
        container["resources"]["limits"]["nvidia.com/gpu"] == 2 == container["resources"]["requests"]["nvidia.com/gpu"]
    )
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/workspace", "/dev/shm"}
    claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert claims == ["scoft-workspace"]
    assert job["env"]["SCOFT_WORKSPACE"] == "/workspace"  # where the deployments' pull step runs the flow
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert "{{" not in json.dumps(job)  # every placeholder has a value


def test_the_reference_profile_and_the_readmes_real_run_keys_validate(tmp_path):
    import re

    reference = load_params(ROOT / "profiles/reference.yaml")
    assert (reference.model.resolution, reference.train.lora_rank, reference.train.gradient_accumulation_steps,
            reference.train.pixel_loss_every, reference.train.sampler_steps, reference.negatives.per_image) == \
        (512, 64, 4, 10, 20, 5)
    assert reference.negatives.depth_guided and reference.train.mixed_precision == "bf16"
    fast = load_params(ROOT / "profiles/sd15-fast.yaml")  # the reference but for the pixel losses' sampler
    assert (fast.train.sampler, fast.train.sampler_steps) == ("dpm-solver++", 3)
    assert fast.model_copy(update={"train": fast.train.model_copy(update={"sampler": "ddpm", "sampler_steps": 20})}) \
        == reference
    readme = (ROOT / "docs/reference.md").read_text()  # its "Real runs"
    weights = re.search(r"`features\.weights: (\{[^`]*\})`", readme)[1]
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["features"]["weights"] = yaml.safe_load(weights)
    for role in ("perceptual", "contrastive", "evaluation"):
        params["features"][role] = re.search(rf"`features\.{role}: ([^`]+)`", readme)[1]
    params["model"]["base"] = re.search(r"`model\.base` to a Hugging Face id \(e\.g\. `([^`]+)`", readme)[1]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert load_params(tmp_path / "params.yaml").features.weights["dinov2"] == "facebook/dinov2-small"


def test_python_dash_m_reaches_every_command(tmp_path):
    """`python -m scoft.cli models list` works as `scoft models list` does (issue 25: the module's
    __main__ guard ran before the models commands were defined)."""
    import subprocess
    import sys

    from tests.conftest import write_params

    write_params(tmp_path / "params.yaml", {})
    out = subprocess.run([sys.executable, "-m", "scoft.cli", "models", "list", "--json"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert {row["culture"] for row in json.loads(out.stdout)} >= {"KOR", "MEX", "NGA"}


def test_generate_without_a_culture_says_which_cultures_have_a_lora(tmp_path):
    from scoft.paths import LORA_FILE
    from tests.conftest import write_params

    write_params(tmp_path / "params.yaml", {})
    for culture in ("KOR", "NGA"):
        (tmp_path / "models/lora" / culture).mkdir(parents=True)
        (tmp_path / "models/lora" / culture / LORA_FILE).write_bytes(b"not read")
    out = scoft("generate", "--prompt", "a house", "--out", "x.png", cwd=tmp_path)
    assert out.returncode != 0 and "pass --culture (trained: KOR, NGA)" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
