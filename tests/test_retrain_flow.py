"""End to end: the retrain flow on the sample, under a real (test) Prefect server, real DVC, real GX."""

import json
import time

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)

from scoft.io import sha256_file
from scoft.lineage import dvc_out_hashes, latest_record, verify
from tests.conftest import make_workspace, scoft
from tests.helpers import kill_stage_command, scoft_here

# Two cultures to train, one configured without records (CHN), one in the sample but not configured
# (MEX): every case of the per-culture chains, at two fifths of the default's stage processes.
CULTURES = ["CHN", "KOR", "NGA"]
TRAINED = ["KOR", "NGA"]
# 16 steps with a checkpoint every 4: long enough that the update test can kill a train stage mid-run.
FAST = {"train.max_steps": 16, "train.checkpoint_every": 4, "negatives.per_image": 1, "evaluate.bootstrap": 100,
        "evaluate.samples_per_prompt": 2,
        "orchestration.stage_retry_delay_s": 0, "validate.cultures": CULTURES}
LORA = "models/lora/{}/pytorch_lora_weights.safetensors"
CHAIN = ("negatives", "train", "evaluate")


def _stages(validate: bool, chains: dict[str, bool] | bool, base: bool = False, ingest: bool = True) -> dict[str, bool]:
    """The flow's stages_run: ingest, validate, base and each culture's chain."""
    chains = chains if isinstance(chains, dict) else dict.fromkeys(CULTURES, chains)
    return {"ingest": ingest, "validate": validate, "base": base,
            **{f"{stage}@{c}": chains[c] for c in CULTURES for stage in CHAIN}}


def _flow_run_logs(flow_run_id, expect: str, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
            text = "\n".join(log.message for log in logs)
            if expect in text or time.monotonic() > deadline:
                return text
            time.sleep(0.5)


@pytest.fixture(scope="module")
def first_run(prefect_server, sample_dir, tmp_path_factory):
    from flows.retrain import retrain

    ws = make_workspace(tmp_path_factory.mktemp("e2e") / "ws", sample_dir, FAST)
    state = retrain(workdir=str(ws), return_state=True)
    return ws, state


def test_all_stages_ran_and_outputs_exist(first_run):
    ws, state = first_run
    assert state.is_completed(), state.message
    result = state.result()
    assert result["stages_run"] == _stages(True, True, base=True)
    assert (ws / "models/base/NOT_USED").is_file()  # the tests' base is tiny-random: no planted base to build
    assert all((ws / LORA.format(c)).is_file() for c in TRAINED)
    from scoft.ccub import TRAIN, read_manifest

    for culture in TRAINED:  # each LoRA learned its own culture's training records, and only those
        trained_on = json.loads((ws / f"models/lora/{culture}/training.json").read_text())
        own = [r for r in read_manifest(ws / "data/ccub", culture) if r.split == TRAIN]
        assert trained_on["culture"] == culture and trained_on["train_records"] == len(own) > 0
    # configured cultures without records: named and skipped, never trained
    assert set(result["skipped"]) == {"CHN"} and "no record" in result["skipped"]["CHN"]
    ingested = json.loads((ws / "data/ingest/summary.json").read_text())
    assert {row["culture"] for row in ingested["skipped"]} == {"MEX"}  # named at ingest, never trained
    assert not (ws / "models/lora/MEX").exists()
    assert not (ws / LORA.format("CHN")).exists() and (ws / "models/lora/CHN/skipped.json").is_file()
    for culture in TRAINED:
        report = (ws / f"reports/eval/{culture}/report.md").read_text()
        assert f"| {culture} |" in report and "grid.png" in report
        assert result["reports"][culture] == ws / f"reports/eval/{culture}/report.html"
        assert f"grid-{culture}.png" in result["reports"][culture].read_text()
        metrics = json.loads((ws / f"reports/metrics/{culture}.json").read_text())
        assert set(metrics["kid"]) == set(metrics["diversity"]) == set(metrics["memorisation"]) == {"base", "scoft"}
        assert "ci95_low" in metrics["diversity"]["scoft"]["overall"]  # 2 seeds per prompt: with its interval
        assert set(metrics["per_culture"]) == {culture}  # its own prompts only
        m = metrics["per_culture"][culture]
        assert set(m["models"]) == {"base", "scoft"} and set(m["improvement"]) == {"scoft"} and m["n"] >= 1
        retrieval = metrics["retrieval_accuracy"]  # among every culture's held-out images
        assert retrieval["chance"] == pytest.approx(1 / 2) and set(retrieval["per_culture"]) == {culture}
        assert all(0 <= v["mean"] <= 1 for v in retrieval["per_culture"][culture].values())
        assert "Culture retrieval accuracy" in report and "Prompts naming no culture" in report
        generic = metrics["generic_prompts"]
        assert set(generic["models"]) == {"base", "scoft"} and "a house with a roof" in generic["prompts"]
        assert all(sum(m["shares"].values()) == pytest.approx(1.0) for m in generic["models"].values())
    assert "Not evaluated" in (ws / "reports/eval/CHN/report.md").read_text()


def test_each_lora_is_judged_and_only_one_passing_every_rule_reaches_production(first_run):
    """4 steps from random weights: whatever the verdict, it follows the rules, and it is on record."""
    from scoft import registry

    ws, state = first_run
    promoted = state.result()["promoted"]
    assert set(promoted) == set(TRAINED)
    for culture in TRAINED:
        decision = json.loads((ws / f"reports/promotion/{culture}.json").read_text())
        assert decision["promote"] == promoted[culture] == all(rule["passed"] for rule in decision["rules"])
        assert len(decision["rules"]) == 6 and decision["family"] == sorted(TRAINED)  # Holm over the retrain
        assert decision["lora_sha256"] == sha256_file(ws / LORA.format(culture))
        entry = registry.read(ws, culture)
        assert entry["history"][-1]["action"] == ("promote" if promoted[culture] else "reject")
        assert (entry["production"] is not None) == promoted[culture]
        _, record = latest_record(ws, culture)
        assert record["promotion"]["promote"] == promoted[culture]  # the verdict is in the lineage too


def test_a_change_to_the_training_code_reruns_train_and_evaluate_only(first_run):
    import subprocess
    import sys

    ws, _ = first_run
    losses = ws / "scoft/losses.py"
    original = losses.read_text()
    losses.write_text(original + "\n# changed\n")
    try:
        status = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=ws, capture_output=True,
                                text=True, check=True)
    finally:
        losses.write_text(original)
    # ingest is always_changed (it polls its sources); evaluate follows once train's output changes
    assert set(json.loads(status.stdout)) - {"ingest"} == {f"train@{c}" for c in CULTURES} | {"train_joint"}


def test_a_held_out_record_added_re_evaluates_and_never_retrains(first_run):
    """A community adds one held-out KOR image: the ingest and checks that would run before any stage
    (cheap), then DVC says which stages that new version reruns."""
    import shutil
    import subprocess
    import sys

    from scoft.sample import add_sample_image

    ws, _ = first_run
    touched = ["data/sample", "data/ccub", "data/validation", "data/ingest"]
    backup = ws.parent / "held-out-backup"
    for folder in touched:
        shutil.copytree(ws / folder, backup / folder, symlinks=True)
    try:
        add_sample_image(ws / "data/sample", "KOR", split="heldout")
        for step in (["ingest", "--out", "data/ccub", "--summary", "data/ingest/summary.json"],
                     ["validate", "--ccub", "data/ccub", "--out", "data/validation"]):
            done = scoft(*step, cwd=ws)
            assert done.returncode == 0, done.stderr
        status = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=ws, capture_output=True,
                                text=True, check=True)
    finally:
        for folder in touched:
            shutil.rmtree(ws / folder)
            shutil.move(backup / folder, ws / folder)
    changed = set(json.loads(status.stdout))
    # every culture's evaluation retrieves among all held-out images: each one re-evaluates
    assert {f"evaluate@{c}" for c in TRAINED} <= changed
    assert not {s for s in changed if s.split("@")[0] in ("negatives", "train", "train_joint")}, changed


def test_lineage_ties_the_lora_to_data_checks_negatives_and_the_run(first_run):
    ws, state = first_run
    assert sorted(state.result()["lineage"]) == TRAINED  # one record per culture's LoRA
    path, record = latest_record(ws, "KOR")
    assert record["culture"] == "KOR" and record["lora"]["sha256"] == sha256_file(ws / LORA.format("KOR"))
    outs = dvc_out_hashes(ws)
    assert record["ccub"]["dvc_hash"] == outs["data/ccub"] and record["ccub"]["dvc_hash"].endswith(".dir")
    assert record["negatives"]["dvc_hash"] == outs["data/negatives/KOR"]
    # the version `scoft ingest` reports is DVC's own hash of data/ccub
    assert json.loads((ws / "data/ingest/summary.json").read_text())["version"] == outs["data/ccub"]
    assert record["validation"]["success"] is True
    assert record["git_commit"] == "unversioned"
    assert record["prefect_flow_run_id"] == str(state.state_details.flow_run_id)
    assert record["params"]["train"]["max_steps"] == 16
    assert record["packages"]["torch"] and set(record["metrics"]["per_culture"]) == {"KOR"}
    shown = scoft("lineage", "show", "--json", "--culture", "KOR", cwd=ws)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == record


def test_stage_output_and_artifacts_reach_prefect(first_run):
    ws, state = first_run
    run_id = state.state_details.flow_run_id
    logs = _flow_run_logs(run_id, "step 16/16")
    assert "train@KOR | step 1/16 ldm=" in logs and "step 16/16" in logs
    assert "validate | validate:" in logs
    assert "dvc push` to send" not in logs and "core.autostage" not in logs  # DVC's advice: the flow pushes itself
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
        )
    by_key = {a.key: a for a in artifacts}
    assert by_key["ccub-validation"].type == "table"
    assert by_key["scoft-metrics"].type == "table"
    assert all(by_key[f"scoft-lineage-{c.lower()}"].type == "markdown" for c in TRAINED)
    assert all("| rule | outcome |" in by_key[f"scoft-promotion-{c.lower()}"].data for c in TRAINED)
    assert all(c in str(by_key["scoft-metrics"].data) for c in CULTURES)
    progress = by_key["train-kor-progress"]
    assert progress.type == "progress" and float(progress.data) == 100.0


def test_training_curves_are_dvc_plots(first_run):
    import subprocess
    import sys

    ws, _ = first_run
    out = subprocess.run(
        [sys.executable, "-m", "dvc", "plots", "show", "--json"], cwd=ws, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    plots = json.loads(out.stdout)["data"]
    assert "models/train_log/KOR/plots/metrics/train/ldm.tsv" in plots
    assert "models/train_log/NGA/plots/metrics/train/contrastive.tsv" in plots


def test_everything_was_pushed_to_the_dvc_remote(first_run):
    ws, _ = first_run
    remote = ws.parent / f"{ws.name}-remote"
    assert sum(1 for p in remote.rglob("*") if p.is_file()) > 63


def test_rerun_with_nothing_changed_recomputes_nothing(first_run):
    """Nothing downstream of ingest runs, the LoRA file is untouched, no new lineage record."""
    from flows.retrain import retrain

    ws, _ = first_run
    lora = ws / LORA.format("KOR")
    stamp, digest = lora.stat().st_mtime_ns, sha256_file(lora)
    records_before = sorted(p.name for p in (ws / "lineage").iterdir())
    state = retrain(workdir=str(ws), return_state=True)
    assert state.is_completed()
    # ingest always polls its sources; it found nothing new, so nothing downstream ran
    assert state.result()["stages_run"] == _stages(False, False)
    assert lora.stat().st_mtime_ns == stamp and sha256_file(lora) == digest
    assert sorted(p.name for p in (ws / "lineage").iterdir()) == records_before


def _first_file(ws, pattern: str) -> str:
    return str(sorted(ws.glob(pattern))[0].relative_to(ws))


# Each link of the chain from the CCUB data to the promotion decision: (link, a file of it).
CHAIN_LINKS = {
    "ccub manifest": lambda ws: "data/ccub/cultures/KOR.jsonl",
    "ccub images": lambda ws: _first_file(ws, "data/ccub/images/KOR/*"),
    "validation": lambda ws: "data/validation/cultures/KOR.json",
    "negatives": lambda ws: "data/negatives/KOR/index.jsonl",
    "negatives image": lambda ws: _first_file(ws, "data/negatives/KOR/*.png"),
    "lora": lambda ws: LORA.format("KOR"),
    "promotion": lambda ws: "reports/promotion/KOR.json",
    "metrics": lambda ws: "reports/metrics/KOR.json",  # what the gate read
    "evaluation report": lambda ws: "reports/eval/KOR/report.html",
    "base model": lambda ws: "models/base/NOT_USED",
}


def test_lineage_verify_names_a_one_byte_change_in_each_link(first_run):
    """One byte changed in a file of every link at once (each is hashed on its own, so none hides another):
    verify names each link and file; restored, the record verifies again."""
    ws, _ = first_run
    _, record = latest_record(ws, "KOR")
    assert verify(record, ws) == []
    paths = {link: ws / of(ws) for link, of in CHAIN_LINKS.items()}
    originals = {link: path.read_bytes() for link, path in paths.items()}
    try:
        for link, path in paths.items():
            path.write_bytes(originals[link][:-1] + bytes([originals[link][-1] ^ 1]))
        problems = verify(record, ws)
        for link, path in paths.items():
            named = link.removesuffix(" image")
            assert any(p.startswith(f"{named}: {path.relative_to(ws)}: sha256 differs") for p in problems), (link,
                                                                                                           problems)
        out = scoft("lineage", "verify", "--unsigned", "--culture", "KOR", cwd=ws)
        assert out.returncode == 1 and f"lora: {LORA.format('KOR')}: sha256 differs" in out.stdout
    finally:
        for link, path in paths.items():
            path.write_bytes(originals[link])
    assert verify(record, ws) == []


def test_lineage_verify_names_a_param_the_stages_did_not_use(first_run):
    ws, _ = first_run
    _, record = latest_record(ws, "KOR")
    original = _edited_lock(ws, lambda st: st["train@KOR"]["params"]["params.yaml"]["train"].update(
        lr=st["train@KOR"]["params"]["params.yaml"]["train"]["lr"] * 10))
    try:
        problems = verify(record, ws)
        assert [p for p in problems if p.startswith("params: train.lr is 0.02 in dvc.lock")], problems
    finally:
        (ws / "dvc.lock").write_bytes(original)
    assert scoft("lineage", "verify", "--unsigned", "--culture", "KOR", cwd=ws).returncode == 0


def test_lineage_verify_checks_every_current_record_and_what_the_chain_did_not_cover(first_run):
    ws, _ = first_run
    out = scoft_here("lineage", "verify", "--unsigned", "--json", cwd=ws)
    results = json.loads(out.stdout)
    assert out.returncode == 0 and {r["culture"] for r in results} == set(TRAINED) and all(r["ok"] for r in results)
    path, record = latest_record(ws, "KOR")
    index, planted, future = ws / "data/negatives/NGA/index.jsonl", ws / "data/negatives/KOR/extra.png", \
        ws / "lineage/future.json"
    originals = {index: index.read_bytes(), path: path.read_bytes()}
    try:
        index.write_bytes(originals[index] + b"\n")  # another culture than the one asked about before
        planted.write_bytes(b"planted")
        path.write_text(json.dumps({**record, "metrics": {**record["metrics"], "forged": 1.0}}))
        future.write_text(json.dumps({**record, "created_at": "2999-01-01T00:00:00+00:00"}))
        out = scoft_here("lineage", "verify", "--unsigned", cwd=ws)
        lines = out.stdout.splitlines()
        assert out.returncode == 1
        assert any(line.startswith("FAIL") and "(NGA: latest" in line for line in lines), out.stdout
        assert "negatives: data/negatives/NGA/index.jsonl: sha256 differs" in out.stdout
        assert "negatives: data/negatives/KOR/extra.png: not in the record" in out.stdout
        assert "record: its fields were changed after it was written" in out.stdout
        assert "future.json: 1 problem(s)" in out.stdout and "in the future" in out.stdout
        assert latest_record(ws, "KOR")[0] == path  # the record dated 2999 never became the latest
    finally:
        for p, data in originals.items():
            p.write_bytes(data)
        planted.unlink()
        future.unlink()
    assert scoft_here("lineage", "verify", "--unsigned", cwd=ws).returncode == 0


def _edited_lock(ws, edit) -> bytes:
    """dvc.lock edited by `edit(lock)` in round-trip YAML, as DVC writes it; returns the original."""
    import io

    from ruamel.yaml import YAML

    lock_file, yaml = ws / "dvc.lock", YAML()
    original = lock_file.read_bytes()
    lock = yaml.load(original)
    edit(lock["stages"])
    out = io.StringIO()
    yaml.dump(lock, out)
    lock_file.write_text(out.getvalue())
    return original


def test_lineage_verify_covers_the_outs_and_params_in_dvc_lock_of_the_whole_chain(first_run):
    """An edited dvc.lock makes `dvc pull` and `dvc checkout` bring other outputs than the record's: an
    output hash of negatives@KOR or train@KOR, or the seed evaluate@KOR ran with."""
    ws, _ = first_run
    _, record = latest_record(ws, "KOR")
    edits = {
        "negatives": (lambda st: st["negatives@KOR"]["outs"][0].update(md5="0" * 32 + ".dir"),
                      "dvc.lock: negatives@KOR: output data/negatives/KOR "),  # "not in cache": no such version
        "train": (lambda st: st["train@KOR"]["outs"][0].update(md5="1" * 32 + ".dir"),
                  "dvc.lock: train@KOR: output models/lora/KOR "),
        "seed": (lambda st: st["evaluate@KOR"]["params"]["params.yaml"]["evaluate"].update(seed=12345),
                 "params: evaluate.seed is 12345 in dvc.lock"),  # and DVC's "param evaluate modified"
    }
    for what, (edit, expected) in edits.items():
        original = _edited_lock(ws, edit)
        try:
            problems = verify(record, ws)
            assert any(p.startswith(expected) for p in problems), (what, problems)
        finally:
            (ws / "dvc.lock").write_bytes(original)
    assert verify(record, ws) == []


def test_lineage_verify_names_an_unsealed_record_an_unrecorded_production_and_an_unchecked_signature(first_run):
    """Each was "ok" or a traceback before: a record whose seal was deleted with the edit, a production
    pointer naming no lineage record, and a workspace that checks no signature."""
    ws, _ = first_run
    path, record = latest_record(ws, "KOR")
    registry_file = ws / "registry/KOR.json"
    originals = {p: p.read_bytes() for p in (path, registry_file) if p.is_file()}
    unsigned = scoft_here("lineage", "verify", "--culture", "KOR", cwd=ws)
    assert unsigned.returncode == 1 and "lineage.verify_key is null" in unsigned.stdout
    try:
        unsealed = {k: v for k, v in record.items() if k != "record_sha256"}
        path.write_text(json.dumps({**unsealed, "metrics": {**record["metrics"], "forged": 1.0}}))
        entry = json.loads(registry_file.read_text()) if registry_file.is_file() else \
            {"culture": "KOR", "production": None, "history": []}
        event = {"action": "promote", "at": "2026-12-07T00:00:00+00:00", "lora_sha256": record["lora"]["sha256"],
                 "lora_dir": "registry/loras/KOR/x", "lineage": "", "by": "insiders", "reason": "preferred"}
        registry_file.write_text(json.dumps({**entry, "production": event, "history": [*entry["history"], event]}))
        out = scoft_here("lineage", "verify", "--unsigned", "--culture", "KOR", cwd=ws)
        assert out.returncode == 1 and "Traceback" not in out.stdout + out.stderr
        assert "record: not sealed" in out.stdout
        assert "names no lineage record ('')" in out.stdout and "reached production unrecorded" in out.stdout
        assert "registry/KOR.json: event" in out.stdout  # the event added by hand is not chained
    finally:
        for p, data in originals.items():
            p.write_bytes(data)
        if registry_file not in originals:
            registry_file.unlink()
    assert scoft_here("lineage", "verify", "--unsigned", "--culture", "KOR", cwd=ws).returncode == 0


def test_lineage_diff_of_malformed_or_crafted_records_is_one_safe_line(first_run, tmp_path):
    ws, _ = first_run
    path, record = latest_record(ws, "KOR")
    (tmp_path / "cut.json").write_text('{"created_at": "20')
    (tmp_path / "list.json").write_text("[1, 2]")
    for other in ("cut.json", "list.json"):
        out = scoft_here("lineage", "diff", str(path), str(tmp_path / other), cwd=ws)
        assert out.returncode == 1 and "not a lineage record" in out.stderr and len(out.stderr.splitlines()) == 1
    crafted = {**record, "params": {"train": {"lr\x1b[2J": "\x1b]0;owned\x07"}},
               "ccub": {**record["ccub"], "records": ["\x1b[31mred"]}}
    (tmp_path / "crafted.json").write_text(json.dumps(crafted))
    out = scoft_here("lineage", "diff", str(path), str(tmp_path / "crafted.json"), cwd=ws)
    assert out.returncode == 0 and "\x1b" not in out.stdout
    assert "\\x1b[2J" in out.stdout and "\\x1b[31mred" in out.stdout


def test_every_file_the_stages_and_the_registry_write_follows_the_umask(first_run):
    import os

    ws, _ = first_run
    mask = os.umask(0o022)
    os.umask(mask)
    folders = ["data/ccub", "data/validation", "data/negatives", "models/lora", "models/train_log", "reports",
               "lineage", "registry"]
    private = [str(p.relative_to(ws)) for folder in folders for p in (ws / folder).rglob("*")
               if p.is_file() and p.stat().st_mode & 0o666 & ~mask != 0o666 & ~mask]
    assert private == []  # the LoRA files were 0600 (safetensors creates them so)


def test_the_lineage_artifact_is_a_summary_linked_to_the_full_record(first_run):
    ws, state = first_run
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    by_key = {a.key: a for a in artifacts}
    summary, full = by_key["scoft-lineage-kor"].data, by_key["scoft-lineage-kor-record"].data
    _, record = latest_record(ws, "KOR")
    assert f"| CCUB version | `{record['ccub']['dvc_hash']}`" in summary
    assert "| train.max_steps | `16` | `300` |" in summary  # FAST's override, against the default
    assert "| decision | **" in summary and "overall.models.scoft" in summary
    assert '"sha256"' not in summary and record["lora"]["sha256"] in full


def test_bad_data_stops_the_flow_before_any_sampling(prefect_server, sample_dir, tmp_path):
    from flows.retrain import retrain

    ws = make_workspace(tmp_path / "ws", sample_dir, FAST)
    meta = ws / "data/sample/train/metadata.jsonl"
    rows = [json.loads(line) for line in meta.read_text().splitlines()]
    rows[2]["category_code"] = "SPORT"  # not one of validate.categories
    meta.write_text("".join(json.dumps(r) + "\n" for r in rows))
    state = retrain(workdir=str(ws), return_state=True)
    assert state.is_failed()
    assert not (ws / "data/negatives").exists() and not (ws / "models").exists()
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
    validate = [r for r in runs if r.name == "validate"]
    assert len(validate) == 1 and validate[0].run_count == 1  # data errors are not retried
    logs = _flow_run_logs(state.state_details.flow_run_id, "on category: id=")
    assert "expect_column_values_to_be_in_set on category: id=" in logs  # names the record
    assert "file=images/KOR/" in logs
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    table = [a for a in artifacts if a.key == "ccub-validation"]
    assert table and "file=images/KOR/" in str(table[0].data)  # the operator sees the failing record in the UI


def test_generate_draws_with_the_trained_lora(first_run):
    from PIL import Image

    ws, _ = first_run
    out = scoft_here("generate", "--prompt", "a traditional Korean house", "--out", "gen/house.png", "--seed", "3",
                "--culture", "KOR", "--candidate", cwd=ws)
    assert out.returncode == 0, out.stderr
    skipped = scoft_here("generate", "--prompt", "x", "--out", "y.png", "--culture", "CHN", "--candidate", cwd=ws)
    assert skipped.returncode == 1 and "no record of it" in skipped.stderr  # says why CHN has no LoRA
    with Image.open(ws / "gen/house.png") as im:
        assert im.size == (32, 32) and im.mode == "RGB"
    missing = scoft_here("generate", "--prompt", "x", "--out", "y.png", "--lora", "nowhere", cwd=ws)
    assert missing.returncode == 1 and "no trained LoRA" in missing.stderr
    base = scoft_here("generate", "--prompt", "a traditional Korean house", "--out", "gen/base.png", "--seed", "3",
                      "--base", "--lora", "nowhere", cwd=ws)
    assert base.returncode == 0, base.stderr
    with Image.open(ws / "gen/base.png") as b, Image.open(ws / "gen/house.png") as tuned:
        assert b.size == (32, 32) and b.tobytes() != tuned.tobytes()  # without the LoRA, another picture
    # --culture alone draws with production: promoted by hand here, whatever the rules said
    key = latest_record(ws, "KOR")[0].stem
    assert scoft_here("models", "promote", "KOR", key, "--reason", "reviewed", cwd=ws).returncode == 0
    assert (ws / "registry/loras.dvc").is_file()  # tracked by DVC: the next push sends it to the remote
    production = scoft_here("generate", "--prompt", "a traditional Korean house", "--out", "gen/prod.png",
                            "--seed", "3", "--culture", "KOR", cwd=ws)
    assert production.returncode == 0, production.stderr
    assert (ws / "gen/prod.png").read_bytes() == (ws / "gen/house.png").read_bytes()
    nga = scoft_here("generate", "--prompt", "x", "--out", "y.png", "--culture", "NGA", cwd=ws)
    from scoft import registry

    if registry.read(ws, "NGA")["production"] is None:
        assert nga.returncode == 1 and "no production LoRA yet" in nga.stderr


def test_an_update_of_one_culture_retrains_only_it_and_a_killed_train_resumes(first_run):
    """As in production: one new KOR image; the ingest flow checks, versions and announces it; the
    retrain pinned to the announced version (as `retrain-on-update` runs) reruns KOR's chain only,
    with exactly k new negatives, and leaves every other culture's LoRA untouched. Its train stage,
    killed after a checkpoint, is retried by Prefect and resumes from it. Last but one in this module."""
    import threading

    import yaml

    from flows.ingest import ingest
    from flows.retrain import retrain
    from scoft.negatives import read_negative_index
    from scoft.sample import add_sample_image

    ws, _ = first_run
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["orchestration"].update(stage_retries=1, stage_retry_delay_s=0)  # no stage's dependency
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    nga = ws / LORA.format("NGA")
    nga_before = (nga.stat().st_mtime_ns, sha256_file(nga))
    negatives_before = {row["file"] for row in read_negative_index(ws / "data/negatives/KOR")}
    kor_before = sha256_file(ws / LORA.format("KOR"))
    add_sample_image(ws / "data/sample", "KOR")  # a training record: a held-out one changes every evaluation
    version = ingest(workdir=str(ws))["version"]
    outcome = {}
    runner = threading.Thread(target=lambda: outcome.update(
        state=retrain(workdir=str(ws), ccub_version=version, return_state=True)))
    runner.start()
    deadline = time.monotonic() + 400
    while not list(ws.glob("models/lora/KOR/checkpoints/*/step-000000004.pt")):
        assert runner.is_alive() and time.monotonic() < deadline, "the train stage never checkpointed"
        time.sleep(0.05)
    assert kill_stage_command(ws, "train") >= 1
    runner.join(600)
    state = outcome["state"]
    assert state.is_completed(), state.message
    # the data came from the DVC remote's record of the announced version; validate ran in the ingest flow
    assert state.result()["stages_run"] == _stages(False, {c: c == "KOR" for c in CULTURES}, ingest=False)
    added = {row["file"] for row in read_negative_index(ws / "data/negatives/KOR")} - negatives_before
    assert len(added) == FAST["negatives.per_image"]  # k for the one new record, the rest reused
    assert sha256_file(ws / LORA.format("KOR")) != kor_before
    assert (nga.stat().st_mtime_ns, sha256_file(nga)) == nga_before
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
    assert [r.run_count for r in runs if r.name == "train@KOR"] == [2]  # failed once, retried once
    assert "train: resumed from step" in _flow_run_logs(state.state_details.flow_run_id, "resumed from step")
    summary = json.loads((ws / "models/lora/KOR/training.json").read_text())
    assert summary["steps"] == FAST["train.max_steps"] and summary["resumed_from"] >= 4
    shown = json.loads(scoft("lineage", "show", "--json", "--culture", "KOR", cwd=ws).stdout)
    assert shown["ccub"]["dvc_hash"] == version


def test_lineage_diff_shows_the_added_record_and_the_metrics_side_by_side(first_run):
    """After the module's runs (a new KOR image): the first KOR record against the last."""
    from scoft.lineage import LINEAGE_DIR

    ws, _ = first_run
    records = [(json.loads(p.read_text()), p.stem) for p in (ws / LINEAGE_DIR).glob("*.json")]
    kor = sorted((r["created_at"], key) for r, key in records if r["culture"] == "KOR")
    (_, first), (_, last) = kor[0], kor[-1]
    out = scoft("lineage", "diff", first, last, "--json", cwd=ws)
    assert out.returncode == 0, out.stderr
    change = json.loads(out.stdout)
    assert len(change["records_added"]) == 1 and change["records_removed"] == []
    assert change["params_changed"] == {} and change["data_version"][0] != change["data_version"][1]
    assert set(change["metrics"]) >= {"overall.models.base", "overall.models.scoft"}
    assert all(len(pair) == 2 for pair in change["metrics"].values())
    text = scoft("lineage", "diff", first, last, cwd=ws)
    assert "1 added" in text.stdout and "params       0 changed" in text.stdout
    assert scoft("lineage", "diff", first, "nowhere", cwd=ws).returncode == 1


def test_lineage_diff_names_each_changed_param_by_its_dotted_key():
    from scoft.lineage import diff

    def record(lr, steps, records, distance):
        return {"ccub": {"dvc_hash": "v", "records": records}, "lora": {"sha256": "ab" * 32},
                "params": {"train": {"lr": lr, "max_steps": steps, "loss_weights": {"ldm": 0.7}}},
                "metrics": {"overall": {"models": {"scoft": {"mean": distance}}}}}

    change = diff(record(1e-3, 4, ["a", "b"], 0.5), record(2e-3, 4, ["b", "c"], 0.4))
    assert change["params_changed"] == {"train.lr": [1e-3, 2e-3]}
    assert change["records_added"] == ["c"] and change["records_removed"] == ["a"]
    assert change["metrics"] == {"overall.models.scoft": [0.5, 0.4]}


def test_a_joint_lora_serves_every_culture_when_configured(first_run):
    """train.lora_per_culture false: one LoRA on every culture's records and negatives serves each
    culture's evaluation (with where its images land: the bleed) and promotion, and its lineage covers
    every culture's data. Last in this module: the per-culture LoRA folders become markers."""
    import subprocess
    import sys

    import yaml

    from flows.retrain import retrain
    from scoft.ccub import TRAIN, read_manifest

    ws, _ = first_run
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["train"]["lora_per_culture"] = False
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    state = retrain(workdir=str(ws), return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    ran = result["stages_run"]
    assert ran["train_joint"] and all(ran[f"evaluate_joint@{c}"] for c in TRAINED)
    assert not any(ran[f"negatives@{c}"] for c in CULTURES)  # the same negatives serve both layouts
    joint = ws / "models/lora/joint/pytorch_lora_weights.safetensors"
    training = json.loads((ws / "models/lora/joint/training.json").read_text())
    train_records = [r for r in read_manifest(ws / "data/ccub") if r.split == TRAIN]
    assert training["culture"] is None and training["train_records"] == len(train_records)
    assert {r.culture for r in train_records} == set(TRAINED)
    assert result["loras"] == {c: ws / "models/lora/joint" for c in TRAINED} and "CHN" in result["skipped"]
    for culture in TRAINED:
        marker = json.loads((ws / f"models/lora/{culture}/skipped.json").read_text())["skipped"]
        assert "joint LoRA (models/lora/joint) serves " + culture in marker
        decision = json.loads((ws / f"reports/promotion/{culture}.json").read_text())
        assert decision["lora_dir"] == "models/lora/joint" and decision["lora_sha256"] == sha256_file(joint)
        landed = json.loads((ws / f"reports/metrics_joint/{culture}.json").read_text())["retrieved_as"]
        assert set(landed) == {"base", "scoft"} and set(landed["scoft"]) == {culture}
        assert sum(landed["scoft"][culture].values()) == pytest.approx(1.0, abs=1e-3)
        assert "Where each culture's images land" in (ws / f"reports/eval_joint/{culture}/report.md").read_text()
        shown = json.loads(scoft("lineage", "show", "--json", "--culture", culture, cwd=ws).stdout)
        assert shown["joint"] and shown["lora"]["sha256"] == sha256_file(joint)
        assert set(shown["ccub"]["records"]) == {r.id for r in read_manifest(ws / "data/ccub")}  # every culture's
        assert {p.split("/")[2] for p in shown["files"]["negatives"]} >= set(TRAINED)
        assert set(shown["negatives"]["dvc_hashes"]) == {f"data/negatives/{c}" for c in CULTURES}
        out = scoft("lineage", "verify", "--unsigned", "--culture", culture, cwd=ws)
        assert out.returncode == 0, out.stdout + out.stderr
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=ws, capture_output=True, text=True,
                            check=True)
    assert set(json.loads(status.stdout)) <= {"ingest"}  # every stage recorded in dvc.lock as it ran
