"""The `scoft` command: one subcommand per pipeline stage (the cmd of each dvc.yaml stage), plus
`run` (the retrain flow), `generate`, `sample` and `lineage`. Every command reads params.yaml first.

This is the one module of scoft/ that may reach into flows/ (to start them).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from scoft.config import ConfigError, Params, load_params
from scoft.paths import (
    BASE_DIR,
    CCUB_DIR,
    CONFIG_ERROR,
    DATA_REJECTED,
    EVAL_DIR,
    INGEST_SUMMARY,
    JOINT,
    LORA_DIR,
    LORA_FILE,
    METRICS_FILE,
    NEGATIVES_DIR,
    SKIPPED_FILE,
    TRAIN_LOG_DIR,
    VALIDATION_DIR,
    culture_paths,
)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="SCoFT retraining on CCUB: stages, the retrain flow, generation and lineage.")
lineage_app = typer.Typer(no_args_is_help=True, help="Lineage records of trained LoRAs.")
app.add_typer(lineage_app, name="lineage")
models_app = typer.Typer(no_args_is_help=True, help="The registry: each culture's production LoRA and its history.")
app.add_typer(models_app, name="models")
review_app = typer.Typer(no_args_is_help=True, help="Cultural insiders' blind review of candidate LoRAs.")
app.add_typer(review_app, name="review")

ParamsOpt = Annotated[Path, typer.Option("--params", help="Parameters file.")]
CultureOpt = Annotated[
    str | None, typer.Option(help="One culture's records only (one LoRA per culture, as the paper).")
]


def _say(message: str) -> None:
    print(message, flush=True)


def _fail(message: str, code: int = 1):
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise typer.Exit(code)


def _params(path: Path) -> Params:
    try:
        params = load_params(path)
    except ConfigError as e:
        _fail(str(e), code=CONFIG_ERROR)
    from scoft.hub import limit_hub_stalls

    limit_hub_stalls(params.model.hub_stall_timeout_s)
    return params


@app.command()
def sample(
    out: Annotated[Path, typer.Option(help="Folder to write the built-in sample imagefolder to.")] = Path(
        "data/sample"
    ),
    per_category: Annotated[int, typer.Option(min=1, help="Training images per culture and category.")] = 4,
    heldout_per_category: Annotated[int, typer.Option(min=0, help="Held-out images per culture and category.")] = 3,
):
    """Write the built-in synthetic CCUB sample (SCoFT imagefolder format)."""
    from scoft.sample import write_sample

    _say(f"sample CCUB written to {write_sample(out, per_category, heldout_per_category)}")


@app.command()
def base(out: Annotated[Path, typer.Option(help="Folder for the planted-bias base (save_pretrained).")] = BASE_DIR,
         params: ParamsOpt = Path("params.yaml")):
    """Pretrain the offline planted-bias base model (model.base: tiny); other bases need nothing here."""
    p = _params(params)
    from scoft.io import atomic_dir

    if p.model.base != "tiny":
        with atomic_dir(out) as tmp:  # the stage's output, saying why it is empty
            (tmp / "NOT_USED").write_text(
                f"model.base is {p.model.base!r}: no planted base is built\n", encoding="utf-8"
            )
        _say(f"base: model.base is {p.model.base!r}, nothing to build")
        return
    from scoft.planted import build_planted_base

    build_planted_base(out, p.planted, p.model.resolution, p.model.seed, progress=_say)


@app.command()
def ingest(
    source: Annotated[list[str] | None, typer.Option(
        help="A SCoFT imagefolder, a CCUB sheet CSV (path or http(s) URL) or s3://bucket/prefix; "
             "repeat for several (default: ingest.sources).")] = None,
    out: Path = CCUB_DIR,
    summary: Annotated[Path, typer.Option(help="Where to write the summary JSON.")] = INGEST_SUMMARY,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout.")] = False,
    params: ParamsOpt = Path("params.yaml"),
):
    """Bring data/ccub up to date with the sources: fetch new or changed rows, drop removed ones."""
    p = _params(params)
    from scoft.captions import make_captioner
    from scoft.ccub import IngestError
    from scoft.ccub import ingest as run_ingest
    from scoft.io import write_json

    say = (lambda m: print(m, file=sys.stderr, flush=True)) if as_json else _say
    i = p.ingest
    try:
        result = run_ingest(source or i.sources, out, heldout_fraction=i.heldout_fraction,
                            max_pixels=i.max_image_pixels, max_rejected_fraction=i.max_rejected_fraction,
                            captioner=make_captioner(i.captioner), policy=i.fetch_policy(), workers=i.workers,
                            s3_endpoint_url=i.s3_endpoint_url, bounds=p.validate_, progress=say,
                            max_decoded_bytes=i.max_decoded_bytes)
    except IngestError as e:
        _fail(f"ingest failed:\n{e}", code=DATA_REJECTED)
    write_json(summary, result)
    for r in result["rejected"]:
        say(f"rejected {r['row']}: {r['reason']}")
    if as_json:
        print(json.dumps(result, sort_keys=True), flush=True)
    else:
        _say(f"ingest: version {result['version']}: {result['added']} added, {result['changed']} changed, "
             f"{result['removed']} removed, {result['unchanged']} unchanged, {len(result['rejected'])} rejected")


@app.command()
def validate(ccub: Path = CCUB_DIR, out: Path = VALIDATION_DIR, params: ParamsOpt = Path("params.yaml")):
    """Great Expectations checks on CCUB; writes the report and Data Docs, fails naming each bad record."""
    p = _params(params)
    from scoft.ccub import read_manifest
    from scoft.checks import check_into, failure_message

    summary = check_into(out, read_manifest(ccub), p.validate_, ccub)
    if not summary["success"]:
        _fail(f"{failure_message(summary)}\nreport: {out / 'data_docs' / 'index.html'}", code=DATA_REJECTED)
    s = summary["statistics"]
    _say(f"validate: {s['successful_expectations']}/{s['evaluated_expectations']} checks passed on "
         f"{s['records']} records; Data Docs: {out / 'data_docs' / 'index.html'}")


@app.command()
def negatives(ccub: Path = CCUB_DIR, out: Path = NEGATIVES_DIR, culture: CultureOpt = None,
              params: ParamsOpt = Path("params.yaml")):
    """Sample k negatives per training record from the base (not fine-tuned) model."""
    p = _params(params)
    from scoft.negatives import make_negatives

    counts = make_negatives(p, ccub, out, progress=_say, culture=culture)
    _say(f"negatives: {counts['planned']} planned, {counts['sampled']} sampled, {counts['reused']} reused, "
         f"{counts['removed']} removed, in {out}")


@app.command()
def train(
    ccub: Path = CCUB_DIR,
    negatives: Path = NEGATIVES_DIR,
    output: Annotated[
        Path, typer.Option(help="LoRA folder; checkpoints go in its checkpoints/ and a rerun resumes from them.")
    ] = LORA_DIR,
    log_dir: Path = TRAIN_LOG_DIR,
    max_steps: Annotated[int | None, typer.Option(min=1, help="Override train.max_steps.")] = None,
    checkpoint_every: Annotated[int | None, typer.Option(min=0, help="Override train.checkpoint_every.")] = None,
    culture: CultureOpt = None,
    as_stage: Annotated[bool, typer.Option(
        "--as-stage", help="As dvc.yaml's stage: train only the layout train.lora_per_culture configures (a LoRA "
                           "per culture with --culture, the joint one without); the other writes skipped.json "
                           "naming the LoRA that serves instead.")] = False,
    params: ParamsOpt = Path("params.yaml"),
):
    """SCoFT fine-tuning of LoRA adapters; writes the LoRA in diffusers' format. A --culture with no
    training records is skipped: its folder gets skipped.json saying why, and no LoRA."""
    p = _params(params)
    reason = _other_layout(p, culture) if as_stage else None
    if reason or (culture is not None and (reason := _nothing_to_train(ccub, culture))):
        _skip(reason, output, log_dir)
        return
    if p.train.num_processes > 1 and "SCOFT_LAUNCHED" not in os.environ:
        _relaunch_with_accelerate(p.train.num_processes, p.train.mixed_precision)
    from scoft.train import train as run_train

    summary = run_train(p, ccub, negatives, output, log_dir, progress=_say, max_steps=max_steps,
                        checkpoint_every=checkpoint_every, culture=culture)
    if summary is not None and int(os.environ.get("RANK", "0")) == 0:
        _say(f"train: {summary['steps']} steps in {summary['seconds']}s on {summary['processes']} process(es), "
             f"LoRA in {output}")


def _other_layout(p: Params, culture: str | None) -> str | None:
    """Why this train stage has nothing to do under params.yaml's layout (train.lora_per_culture)."""
    if culture is not None and not p.train.lora_per_culture:
        return f"train.lora_per_culture is false: the joint LoRA ({LORA_DIR / JOINT}) serves {culture}"
    if culture is None and p.train.lora_per_culture:
        return "train.lora_per_culture is true: each culture has a LoRA of its own (train@<culture>)"
    return None


def _nothing_to_train(ccub: Path, culture: str) -> str | None:
    from scoft.ccub import read_training

    # the training view alone (what the stage depends on): whether held-out records exist is not its business
    if not read_training(ccub, culture):
        return (f"culture {culture}: no record of it to train on (configured in validate.cultures; CCUB has "
                "none, or holds every one out)")
    return None


def _skip(reason: str, lora: Path, log_dir: Path) -> None:
    """A culture with nothing to train on: its LoRA folder holds skipped.json with the reason, and its
    log the metrics file and (empty) plots folder that dvc.yaml expects of every train stage."""
    from scoft.io import atomic_dir, write_json

    with atomic_dir(lora) as tmp:
        write_json(tmp / SKIPPED_FILE, {"skipped": reason})
    with atomic_dir(log_dir) as tmp:
        write_json(tmp / "metrics.json", {"skipped": reason})
        (tmp / "plots" / "metrics").mkdir(parents=True)
    _say(f"warning: skipped: {reason}")


def _relaunch_with_accelerate(processes: int, mixed_precision: str):
    """Run this same command as `accelerate launch` with several processes (GPUs, or gloo on CPU)."""
    import subprocess

    import torch

    # --multi_gpu starts one process per rank through torch.distributed; without CUDA they talk gloo.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", mixed_precision, "--dynamo_backend", "no",
               "--main_process_port", "0", "-m", "scoft.cli", *sys.argv[1:]]
    _say(
        f"train: {processes} processes through accelerate launch "
        f"({'GPUs' if torch.cuda.is_available() else 'CPU, gloo'})"
    )
    env = dict(os.environ, SCOFT_LAUNCHED="1")
    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "true"  # accelerate then joins the ranks with gloo (MULTI_CPU)
    raise typer.Exit(subprocess.call(command, env=env))


@app.command()
def evaluate(
    ccub: Path = CCUB_DIR,
    lora: Path = LORA_DIR,
    out: Path = EVAL_DIR,
    metrics: Path = METRICS_FILE,
    train_log: Annotated[
        Path, typer.Option(help="The training's dvclive folder, for the report's loss curves.")
    ] = TRAIN_LOG_DIR,
    culture: CultureOpt = None,
    params: ParamsOpt = Path("params.yaml"),
):
    """Base vs fine-tuned on held-out CCUB: per-culture metrics, report.md, report.html and image grids.
    With --culture, that culture's LoRA on its held-out prompts (retrieval among every culture's)."""
    p = _params(params)
    from scoft.render import write_skipped_evaluation

    reason = None
    if culture is not None:
        from scoft.ccub import HELDOUT, read_manifest

        if (lora / SKIPPED_FILE).is_file():
            reason = json.loads((lora / SKIPPED_FILE).read_text(encoding="utf-8"))["skipped"]
        elif not any(r.split == HELDOUT for r in read_manifest(ccub, culture)):
            reason = f"culture {culture}: no held-out record to evaluate against"
    if reason:
        write_skipped_evaluation(out, metrics, culture, reason)
        _say(f"warning: evaluate skipped: {reason}")
        return
    from scoft.evaluate import evaluate_loras

    result = evaluate_loras(p, {"scoft": lora}, ccub, out, metrics, train_log=train_log, progress=_say,
                            culture=culture)
    o = result["overall"]["models"]
    _say(
        f"evaluate: distance base {o['base']['mean']:.4f}, SCoFT {o['scoft']['mean']:.4f}; report {out / 'report.html'}"
    )


@app.command()
def ablate(
    ccub: Path = CCUB_DIR,
    negatives: Path = NEGATIVES_DIR,
    out: Annotated[Path, typer.Option(help="One LoRA per loss set, and report/ with the side-by-side metrics.")] = Path(
        "models/ablations"
    ),
    max_steps: Annotated[int | None, typer.Option(min=1, help="Override train.max_steps.")] = None,
    params: ParamsOpt = Path("params.yaml"),
):
    """Train LDM, +M, +MP and +MPC on the same data and seed and evaluate them side by side."""
    p = _params(params)
    from scoft.ablate import ablate as run_ablate

    metrics = run_ablate(p, ccub, negatives, out, progress=_say, max_steps=max_steps)
    o = metrics["overall"]["models"]
    _say(
        "ablate: mean distance to held-out CCUB (lower is closer): "
        + ", ".join(f"{k} {v['mean']:.4f}" for k, v in o.items())
    )
    _say(f"ablate: report {out / 'report' / 'report.md'}")


@app.command()
def generate(
    prompt: Annotated[str, typer.Option(help="Text prompt.")],
    out: Annotated[Path, typer.Option(help="PNG file to write.")],
    culture: Annotated[str | None, typer.Option(help="Use this culture's production LoRA (scoft models show).")] = None,
    candidate: Annotated[bool, typer.Option(
        "--candidate", help="With --culture: its latest trained LoRA (models/lora/CULTURE, or the joint one), promoted "
                            "or not.")] = False,
    lora: Annotated[Path | None, typer.Option(help="A LoRA folder (default: models/lora).")] = None,
    seed: Annotated[int, typer.Option(min=0, max=2**32 - 1)] = 0,
    base: Annotated[bool, typer.Option("--base", help="The base model alone, without the LoRA.")] = False,
    params: ParamsOpt = Path("params.yaml"),
):
    """One image from the base model plus a LoRA: a culture's production one, its latest candidate, or
    a folder (or, with --base, the base model alone)."""
    p = _params(params)
    named_lora = lora is not None
    if culture is not None and named_lora:
        _fail("--culture and --lora name two LoRAs: pass one")
    if culture is not None and not candidate and not base:
        from scoft.registry import production_lora

        lora = production_lora(Path("."), culture, p.lineage.verify_key)
        if lora is None:
            _fail(f"{culture}: no production LoRA yet (`scoft models show {culture}` says why); "
                  f"--candidate draws with its latest trained one")
    lora = lora or (culture_paths(culture, joint=not p.train.lora_per_culture)["lora"] if culture else LORA_DIR)
    if not base and (lora / SKIPPED_FILE).is_file():
        _fail(f"{lora}: no LoRA: {json.loads((lora / SKIPPED_FILE).read_text(encoding='utf-8'))['skipped']}")
    if not base and not (lora / LORA_FILE).is_file():
        trained = sorted(f.parent.name for f in LORA_DIR.glob(f"*/{LORA_FILE}"))
        if culture is None and not named_lora and trained:  # one LoRA per culture: which one is the question
            _fail(f"a LoRA is trained per culture: pass --culture (trained: {', '.join(trained)}), --lora or --base")
        _fail(f"{lora}: no trained LoRA (run `scoft run` or `scoft train` first, or pass --base)")
    from scoft.models import load_pipeline, pick_device
    from scoft.negatives import generate as sample_images

    pipe = load_pipeline(p.model).to(pick_device())
    if not base:
        pipe.load_lora_weights(str(lora))
    image = sample_images(pipe, [prompt], [seed], p.sampling("evaluate"))[0]
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    _say(f"generate: {out}")


@app.command()
def run(
    ccub_version: Annotated[str | None, typer.Option(
        help="Train on this CCUB version (a DVC hash, as `scoft ingest --json` and `ccub.updated` give it) "
             "pulled from the DVC remote, instead of ingesting from the sources.")] = None,
    params: ParamsOpt = Path("params.yaml"),
    in_process: Annotated[bool, typer.Option(hidden=True, help="Run the flow here (what the supervisor starts).")]
    = False,
):
    """Run the retrain flow (ingest, validate, negatives, train, evaluate, lineage) through Prefect.
    Ctrl-C or SIGTERM stop it and everything it started within seconds, saying what was left; so does
    a Prefect API that stops answering (orchestration.api_lost_after_s)."""
    p = _params(params)  # fail on a bad value before Prefect starts
    if not in_process:
        from flows.supervise import run_supervised

        child = ["run", "--in-process", "--params", str(params), *(["--ccub-version", ccub_version] if ccub_version
                                                                    else [])]
        raise typer.Exit(run_supervised(child, Path("."), p.orchestration.api_lost_after_s, _say))
    from flows.retrain import retrain
    from flows.supervise import SERVER_PID, watch_supervisor

    watch_supervisor()
    result = retrain(ccub_version=ccub_version)
    _say("")
    for culture, lora in result["loras"].items():
        verdict = "promoted to production" if result["promoted"][culture] else "not promoted"
        _say(f"{culture}: LoRA {lora} {verdict} (reports/promotion/{culture}.json), evaluation report "
             f"{result['reports'][culture]}, lineage record {result['lineage'][culture]}")
    for culture, reason in result["skipped"].items():
        _say(f"{culture}: not trained or not evaluated: {reason}")
    _say(_next_steps(temporary_server=bool(os.environ.get(SERVER_PID))))


def _next_steps(temporary_server: bool) -> str:
    where = ("this run's temporary Prefect server has stopped with it; " if temporary_server else "")
    return ("\nOpen next: the evaluation reports above in a browser (reports/eval/<culture>/report.html), "
            "`scoft lineage verify` to check every record, `scoft models list` for production. " + where +
            "`make serve` keeps a Prefect server with its UI (http://127.0.0.1:4200) and runs the whole loop.")


@app.command()
def alerts(webhook: Annotated[str, typer.Option(help="The http(s) URL the alerts are POSTed to (JSON).")],
           allow_private: Annotated[bool, typer.Option(
               help="Also a private, loopback or link-local address (refused otherwise).")] = False,
           params: ParamsOpt = Path("params.yaml")):
    """Install the Prefect automations that call WEBHOOK when a candidate LoRA is rejected or a
    retrain run fails or crashes (on the server PREFECT_API_URL names; again: replaced). The
    addresses in params.yaml's ingest.allow_networks are allowed, as for ingest."""
    from flows.alerts import BadWebhook, check_webhook, install_alerts

    allowed = tuple(_params(params).ingest.allow_networks) if params.exists() else ()
    try:
        check_webhook(webhook, allow_private, allowed)
    except BadWebhook as e:
        _fail(str(e), code=CONFIG_ERROR)
    for automation in install_alerts(webhook, allow_private, allowed):
        _say(f"automation {automation.name!r} ({automation.id}) calls the webhook block 'scoft-alerts'")


@app.command()
def recovery(heartbeat_timeout: Annotated[float, typer.Option(
        help="Seconds without a heartbeat after which a retrain run is crashed (the job templates beat every 30 s).",
        min=45)] = 90):
    """Install the Prefect automations that crash a retrain run whose process is gone (no heartbeat)
    and run a crashed one again, resuming where it stopped (on the server PREFECT_API_URL names)."""
    from flows.recovery import install_recovery

    for automation in install_recovery(heartbeat_timeout):
        _say(f"automation {automation.name!r} ({automation.id}): {automation.description}")


@app.command()
def remote(
    url: Annotated[str | None, typer.Option(help="s3://bucket/prefix (default: remote.url).")] = None,
    endpoint_url: Annotated[
        str | None, typer.Option(help="For S3-compatible stores (default: remote.endpoint_url).")
    ] = None,
    params: ParamsOpt = Path("params.yaml"),
):
    """Point DVC at the configured remote (S3 or S3-compatible); credentials stay in the environment."""
    p = _params(params)
    from scoft.config import RemoteParams
    from scoft.remote import configure_remote

    settings = p.remote
    if url or endpoint_url:
        try:
            settings = RemoteParams(url=url or p.remote.url, endpoint_url=endpoint_url or p.remote.endpoint_url,
                                    profile=p.remote.profile)
        except ValueError as e:
            from scoft.config import redact_credentials

            _fail(redact_credentials(str(e)), code=CONFIG_ERROR)
    _say(f"DVC remote: {configure_remote('.', settings)}")


def _found(load):
    """What `load()` reads; a lineage record that is not there is a one-line error (exit 1)."""
    try:
        return load()
    except FileNotFoundError as e:
        _fail(str(e))
        raise


@lineage_app.command("show")
def lineage_show(as_json: Annotated[bool, typer.Option("--json", help="Print the record as JSON.")] = False,
                 culture: Annotated[str | None, typer.Option(help="The latest of this culture's LoRA.")] = None):
    """Print the latest lineage record."""
    from scoft.lineage import latest_record

    path, record = _found(lambda: latest_record(culture=culture))
    if as_json:
        print(json.dumps(record, indent=2, sort_keys=True))
        return
    _say(f"{path}\n  culture   {record.get('culture') or 'all (joint LoRA)'}\n  created   {record['created_at']}\n"
         f"  git       {record['git_commit']}\n"
         f"  ccub      {record['ccub']['dvc_hash']}\n  checks    {record['validation']['statistics']}\n"
         f"  negatives {record['negatives']['dvc_hash']}\n  lora      {record['lora']['sha256']}\n"
         f"  flow run  {record['prefect_flow_run_id']}\n"
         f"  metrics   {json.dumps(record['metrics'].get('overall', record['metrics']))}")


@lineage_app.command("verify")
def lineage_verify(culture: Annotated[str | None, typer.Option(help="Only this culture's records.")] = None,
                   as_json: Annotated[bool, typer.Option("--json", help="One JSON list, for tooling.")] = False,
                   key: Annotated[str | None, typer.Option(
                       help="Your own copy of the public key to check signatures with (trusted as given), "
                            "instead of lineage.verify_key pinned by lineage.verify_key_sha256.")] = None,
                   unsigned: Annotated[bool, typer.Option(
                       help="Verify a workspace that signs nothing (lineage.verify_key null) on purpose.")] = False,
                   params: ParamsOpt = Path("params.yaml")):
    """Recompute the hashes of every current lineage record (each culture's latest and each production
    LoRA's), one line per record; exit 1 on any mismatch."""
    p = _params(params)
    from scoft.lineage import BadRecord, current_records, read_record, superseded, verify, verify_superseded
    from scoft.signing import trusted_verify_key
    from scoft.text import visible

    verify_key, untrusted = trusted_verify_key(p.lineage, Path("."), key, unsigned)
    results = []
    for item in current_records(Path("."), [culture] if culture else p.validate_.cultures):
        problems = [item["problem"]] if "problem" in item else []
        if not problems:
            try:
                record = read_record(str(item["path"]))
                partial = item["roles"] == ["production"] and superseded(record)
                problems = verify_superseded(record) if partial else verify(record)
                problems += [f"signature: {untrusted}"] if untrusted else _signature_problems(item, verify_key)
                if partial:
                    commit = str(record.get("git_commit"))[:12]
                    item["roles"] = ["production, data superseded here: its LoRA and fields checked; "
                                     f"`git checkout {commit} && dvc checkout` checks the rest"]
            except (BadRecord, FileNotFoundError) as e:
                problems = [str(e)]
        results.append({"record": str(item["path"]) if item["path"] else None, "culture": item["culture"],
                        "roles": item["roles"], "ok": not problems, "problems": problems})
    from scoft import registry

    for c in [culture] if culture else p.validate_.cultures:  # each history, chained event to event
        if (registry.REGISTRY_DIR / f"{c}.json").is_file():
            problems = registry.history_problems(Path("."), c)
            results.append({"record": f"{registry.REGISTRY_DIR}/{c}.json", "culture": c, "roles": ["history"],
                            "ok": not problems, "problems": problems})
    if as_json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            roles = f" ({r['culture']}: {', '.join(r['roles'])})" if r["roles"] else ""
            head = f"{'ok  ' if r['ok'] else 'FAIL'} {visible(r['record'] or 'registry')}{roles}"
            _say(head + ("" if r["ok"] else f": {len(r['problems'])} problem(s)\n      " +
                         "\n      ".join(visible(x) for x in r["problems"])))
        if not results:
            _say("no lineage record to verify (run `scoft run` first)")
        elif unsigned and not untrusted and verify_key is None:
            _say("unsigned workspace (--unsigned): hashes checked, no signature; a record rewritten together "
                 "with its hashes would pass")
    if not all(r["ok"] for r in results) or not results:
        raise typer.Exit(1)


def _signature_problems(item: dict, verify_key: str | None) -> list[str]:
    """With lineage.verify_key: the record's signature, and the production LoRA's when it is production's."""
    if verify_key is None:
        return []
    from scoft import registry
    from scoft.signing import signature_problem

    problems = [f"signature: {x}" for x in [signature_problem(item["path"], verify_key)] if x]
    if any(role.startswith("production") for role in item["roles"]):
        try:
            registry.production_lora(Path("."), item["culture"], verify_key)
        except registry.RegistryError as e:
            problems.append(f"signature: {e}")
    return problems


@lineage_app.command("diff")
def lineage_diff(a: Annotated[str, typer.Argument(help="A record: its key (lineage/KEY.json) or its path.")],
                 b: Annotated[str, typer.Argument(help="The record to compare it with.")],
                 as_json: Annotated[bool, typer.Option("--json", help="Print the difference as JSON.")] = False):
    """What changed from record A to record B: CCUB records, params, metrics side by side."""
    from scoft.lineage import BadRecord, diff, read_record
    from scoft.text import visible

    try:
        change = diff(*_found(lambda: (read_record(a), read_record(b))))
    except BadRecord as e:
        _fail(str(e))
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        _fail(f"{visible(a, 200)} or {visible(b, 200)}: a malformed lineage record ({type(e).__name__}: "
              f"{visible(e, 200)})")
    if as_json:
        print(json.dumps(change, indent=2, sort_keys=True))  # JSON escapes every control character
        return
    v = visible
    lines = [f"data version {v(change['data_version'][0], 80)} -> {v(change['data_version'][1], 80)}",
             f"lora         {v(change['lora_sha256'][0], 16)} -> {v(change['lora_sha256'][1], 16)}",
             f"records      {len(change['records_added'])} added, {len(change['records_removed'])} removed"]
    lines += [f"  + {v(r, 80)}" for r in change["records_added"]]
    lines += [f"  - {v(r, 80)}" for r in change["records_removed"]]
    lines.append(f"params       {len(change['params_changed'])} changed")
    lines += [f"  {v(k, 100)}: {v(repr(old), 200)} -> {v(repr(new), 200)}"
              for k, (old, new) in change["params_changed"].items()]
    lines.append(f"metrics      {'A':>10} {'B':>10}")
    lines += [f"  {v(k, 100)}: {_number(x):>10} {_number(y):>10}" for k, (x, y) in change["metrics"].items()]
    _say("\n".join(lines))


def _number(value) -> str:
    return "-" if not isinstance(value, int | float) else f"{value:.4g}"


def _one_line_failure(error: BaseException) -> tuple[str, int] | None:
    """Failures an operator should read in one line rather than a traceback, with their exit status."""
    import errno

    from scoft.hub import HubUnreachable, ModelUnavailable

    if isinstance(error, ModelUnavailable):
        return str(error), CONFIG_ERROR
    if isinstance(error, HubUnreachable):
        return str(error), 1
    from scoft.registry import RegistryError

    if isinstance(error, RegistryError):  # a damaged registry file, a production LoRA not matching its hash
        return str(error), 1
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        import shutil

        where = Path(error.filename or ".").resolve()
        probe = next((p for p in (where, *where.parents) if p.exists()), Path("/"))
        free = shutil.disk_usage(probe).free
        return f"no space left on device writing {where} ({free / 2**20:.1f} MiB free on {probe})", 1
    return None


def main():
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    try:
        app()
    except Exception as e:  # noqa: BLE001 - everything else keeps its traceback
        known = _one_line_failure(e)
        if known is None:
            raise
        print(f"error: {known[0]}", file=sys.stderr, flush=True)
        sys.exit(known[1])


def _registry_summary(culture: str) -> dict:
    from scoft import registry

    entry = registry.read(Path("."), culture)
    current = entry["production"]
    return {"culture": culture, "production": None if current is None else
            {k: current[k] for k in ("lora_sha256", "lora_dir", "lineage", "at", "by", "reason")},
            "last_event": entry["history"][-1] if entry["history"] else None}


@models_app.command("list")
def models_list(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
                params: ParamsOpt = Path("params.yaml")):
    """Each configured culture's production LoRA (or none) and its latest registry event. A damaged
    registry file is named on its culture's line (exit 1 at the end); the other cultures are listed."""
    p = _params(params)
    from scoft import registry
    from scoft.text import visible

    rows, damaged = [], []
    for culture in sorted(set(p.validate_.cultures) | set(registry.cultures(Path(".")))):
        try:
            rows.append(_registry_summary(culture))
        except registry.RegistryError as e:
            damaged.append(culture)
            rows.append({"culture": culture, "error": str(e)})
    if as_json:
        _say(json.dumps(rows, indent=2))
    for row in [] if as_json else rows:
        if "error" in row:
            _say(f"{row['culture']}: {visible(row['error'])}")
            continue
        current, last = row["production"], row["last_event"]
        shown = "none" if current is None else (f"{current['lora_sha256'][:12]} since {visible(current['at'], 40)} "
                                                f"({visible(current['by'], 80)})")
        latest = "" if last is None else (f"; last event: {visible(last['action'], 20)} {last['lora_sha256'][:12]}: "
                                          f"{visible(last['reason'], 200)}")
        _say(f"{row['culture']}: production {shown}{latest}")
    if damaged:
        raise typer.Exit(1)


@models_app.command("show")
def models_show(culture: str, params: ParamsOpt = Path("params.yaml")):
    """A culture's production pointer and its whole history, as JSON."""
    _params(params)
    from scoft import registry

    try:
        _say(json.dumps(registry.read(Path("."), culture), indent=2))  # JSON escapes every control character
    except registry.RegistryError as e:
        _fail(str(e))



def _configured(culture: str, p) -> None:
    """A one-line failure unless `culture` is one of validate.cultures."""
    if culture not in p.validate_.cultures:
        _fail(f"{culture!r} is not a configured culture (validate.cultures: {', '.join(p.validate_.cultures)})")


def _candidate_of(culture: str, key: str, p) -> dict:
    """The lineage record `key` of `culture`, whose LoRA is still the one it records; else a one-line
    failure: a culture not configured, a key that is not a record's name, a record of another culture."""
    from scoft.io import sha256_file
    from scoft.lineage import LINEAGE_DIR, is_record_key
    from scoft.paths import LORA_DIR

    _configured(culture, p)
    if not is_record_key(key):
        _fail(f"{key!r} is not a lineage record's key (letters, digits, '.', '_', '-'; see `scoft lineage show`)")
    path = LINEAGE_DIR / f"{key}.json"
    if not path.is_file():
        _fail(f"no lineage record {path}")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        lora, digest = Path(record["lora"]["path"]), record["lora"]["sha256"]
    except (ValueError, KeyError, TypeError) as e:
        _fail(f"{path}: not a lineage record ({type(e).__name__})")
    if record.get("culture") != culture:
        _fail(f"lineage record {key} is of culture {str(record.get('culture'))[:20]!r}, not {culture!r}")
    if lora.is_absolute() or not lora.resolve().is_relative_to(LORA_DIR.resolve()):
        _fail(f"lineage record {key}: its LoRA {str(lora)[:200]!r} is not under {LORA_DIR}/")
    if not lora.is_file() or sha256_file(lora) != digest:
        _fail(f"{lora}: not the LoRA of record {key} any more (retrained since): nothing promoted")
    return record


@models_app.command("promote")
def models_promote(culture: str,
                   key: Annotated[str, typer.Argument(help="The lineage record's key (lineage/KEY.json).")],
                   reason: Annotated[str, typer.Option(help="Why, for the history.")],
                   by: Annotated[str, typer.Option(help="Who decides.")] = os.environ.get("USER", "operator"),
                   params: ParamsOpt = Path("params.yaml")):
    """Make the LoRA of a lineage record the culture's production model, whatever the rules said. The
    decision recorded names the person, the reason and the evaluation the record holds."""
    p = _params(params)
    from scoft import registry
    from scoft.lineage import LINEAGE_DIR
    from scoft.promotion import promote_judged
    from scoft.registry import RegistryError
    from scoft.signing import SigningError, sign

    record = _candidate_of(culture, key, p)
    lora = Path(record["lora"]["path"])
    decision = {"promote": True, "manual": True, "by": by, "reason": reason, "lora_sha256": record["lora"]["sha256"],
                "lineage": key, "lora_dir": str(lora.parent), "metrics": record.get("metrics")}
    try:
        with registry.transaction(Path("."), culture):  # the pointer and its tracking, whole or not at all
            # no evaluation folder: the workspace's may hold another candidate's images than this record's
            promote_judged(Path("."), culture, str(lora.parent), key, by, reason, decision, p.lineage.signing_key,
                           evaluation_dir=None)
            if p.lineage.signing_key:
                sign(LINEAGE_DIR / f"{key}.json", p.lineage.signing_key)
            _track_registry()
    except RegistryError as e:
        _fail(str(e))
    except SigningError as e:
        _fail(f"{e}: nothing promoted", code=CONFIG_ERROR)
    _say(f"{culture}: production is now {record['lora']['sha256'][:12]} (lineage {key})")


@models_app.command("rollback")
def models_rollback(culture: str, reason: Annotated[str, typer.Option(help="Why, for the history.")] = "rollback",
                    by: Annotated[str, typer.Option(help="Who decides.")] = os.environ.get("USER", "operator"),
                    params: ParamsOpt = Path("params.yaml")):
    """Production goes back to the LoRA that was production before the current one."""
    p = _params(params)
    from scoft import registry
    from scoft.registry import RegistryError

    _configured(culture, p)
    try:
        with registry.transaction(Path("."), culture):
            entry = registry.rollback(Path("."), culture, by=by, reason=reason)
            _track_registry()
    except RegistryError as e:
        _fail(str(e))
    _say(f"{culture}: production rolled back to {entry['production']['lora_sha256'][:12]}")


def _review_store(p):
    """Sessions on review.database_url; unreachable: one line naming it without its password (exit 1)."""
    from scoft.review.store import StoreUnavailable, open_store

    try:
        return open_store(p.review.database_url)
    except StoreUnavailable as e:
        _fail(str(e))


@review_app.command("open")
def review_open(culture: Annotated[str, typer.Option(help="The culture whose latest candidate is reviewed.")],
                as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
                params: ParamsOpt = Path("params.yaml")):
    """Open a review campaign for the culture's latest candidate LoRA: pairs of the evaluation's own
    images (candidate against base, same prompt and seed), each in a random order."""
    p = _params(params)
    from scoft import registry
    from scoft.review.campaigns import CampaignError, open_campaign, opponents

    _configured(culture, p)
    with _review_store(p)() as session:
        try:
            campaign, pairs = open_campaign(session, Path("."), culture, joint=not p.train.lora_per_culture)
        except CampaignError as e:
            _fail(str(e))
        versus = opponents(session, campaign)
    if as_json:
        print(json.dumps({"campaign": campaign.id, "culture": culture, "pairs": pairs}))
        return
    _say(f"{culture}: campaign {campaign.id}, {pairs} pairs (candidate {campaign.candidate_sha256[:12]} against "
         f"{' and '.join(versus)}); invite reviewers with `scoft review invite --culture {culture} --count N`")
    if "production" not in versus and registry.read(Path("."), culture)["production"] is not None:
        _say("  no pairs against production: no images of it on these prompts were kept (promoted by hand?); "
             "its next retrain measures it again and keeps them")


@review_app.command("invite")
def review_invite(culture: Annotated[str, typer.Option(help="The culture of the open campaign.")],
                  count: Annotated[int, typer.Option(help="How many invitations.")],
                  as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False,
                  params: ParamsOpt = Path("params.yaml")):
    """Make COUNT invitations to the culture's open campaign: a pseudonymous reviewer id and a link with a
    secret token each (printed once, stored only as a hash)."""
    p = _params(params)
    from scoft.review.campaigns import CampaignError, invite, open_campaign_of

    with _review_store(p)() as session:
        try:
            links = invite(session, open_campaign_of(session, culture), count, p.review.public_url)
        except CampaignError as e:
            _fail(str(e))
    if as_json:
        print(json.dumps(links))
    for link in [] if as_json else links:
        _say(f"{link['reviewer']}: {link['url']}")


@review_app.command("revoke")
def review_revoke(reviewer: Annotated[str, typer.Argument(help="The reviewer id (r-...).")],
                  params: ParamsOpt = Path("params.yaml")):
    """The reviewer's link opens nothing from now on; the ratings already given stay."""
    p = _params(params)
    from scoft.review.campaigns import CampaignError, revoke

    with _review_store(p)() as session:
        try:
            revoked = revoke(session, reviewer)
        except CampaignError as e:
            _fail(str(e))
        _say(f"{revoked.id}: revoked at {revoked.revoked_at.isoformat()}")


def _latest_campaign(session, culture: str):
    """The culture's latest campaign, open or closed; none is a one-line failure."""
    from scoft.review.campaigns import CampaignError, latest_campaign

    try:
        return latest_campaign(session, culture)
    except CampaignError as e:
        _fail(str(e))


@review_app.command("results")
def review_results(culture: Annotated[str, typer.Option(help="The culture of the campaign.")],
                   as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
                   html: Annotated[Path | None, typer.Option(help="Also write the results as an HTML page.")] = None,
                   params: ParamsOpt = Path("params.yaml")):
    """The culture's latest campaign: the share of ratings preferring the candidate with its 95% interval
    (clustered by reviewer and prompt), reviewers, ratings, agreement, self-consistency, stereotype
    answers, offensive flags."""
    p = _params(params)

    from scoft.io import atomic_write_text
    from scoft.review.results import campaign_results, comparisons, results_page
    from scoft.text import visible

    with _review_store(p)() as session:
        campaign = _latest_campaign(session, culture)
        results = campaign_results(session, campaign)
    if html is not None:
        atomic_write_text(html, results_page(results, p.promotion.min_reviewers))
    if as_json:
        print(json.dumps(results, indent=2))
        return
    _say(f"{culture}: campaign {results['campaign']} ({results['status']}), {results['invited']} reviewers invited")
    for opponent, c in comparisons(results):
        shown = "no ratings yet" if c["preference"] is None else (
            f"{c['preference']:.2f}" + (f" [{c['interval'][0]:.2f}, {c['interval'][1]:.2f}]" if c["interval"] else ""))
        alpha = c["agreement_alpha"]
        _say(f"  candidate preferred over {opponent}: {shown}; {c['reviewers']} reviewers, "
             f"{c['ratings']} ratings; agreement (Krippendorff's alpha) "
             f"{f'{alpha:.2f}' if alpha is not None else 'undefined'}")
    consistent = results["self_consistency"]["reviewers"]
    _say(f"  self-consistent on their repeated pair: {sum(consistent.values())} of {len(consistent)} reviewers"
         + "".join(f"\n    {r}: {'same answer' if same else 'changed answer'}" for r, same in consistent.items()))
    for flag in results["offensive"]["flags"]:
        _say(f"  offensive ({flag['model']}): {visible(flag['prompt'], 200)}")


@review_app.command("close")
def review_close(culture: Annotated[str, typer.Option(help="The culture of the open campaign.")],
                 params: ParamsOpt = Path("params.yaml")):
    """Judge the culture's open campaign now (promotion.min_insider_preference, min_reviewers,
    max_offensive_flags): promote or reject through the registry, or say what it still waits for."""
    p = _params(params)
    from scoft import registry
    from scoft.review.campaigns import CampaignError
    from scoft.review.results import close_campaign, outcome

    with _review_store(p)() as session:
        try:
            with registry.transaction(Path("."), culture):
                verdict = close_campaign(session, Path("."), culture, p)
                if verdict["decided"] and verdict["promote"]:
                    _track_registry()
        except (CampaignError, registry.RegistryError) as e:
            _fail(str(e))
    _say(f"{culture}: {outcome(verdict)}: {verdict['reason']}")


@review_app.command("export")
def review_export(culture: Annotated[str, typer.Option(help="The culture of the campaign.")],
                  out: Annotated[Path | None, typer.Option(help="The CSV file (default reports/review/C/ID.csv).")]
                  = None, params: ParamsOpt = Path("params.yaml")):
    """Every rating of the culture's latest campaign as CSV, reviewers by pseudonymous ids (what the
    lineage record hashes when the campaign closes)."""
    p = _params(params)

    from scoft.review.campaigns import REVIEW_DIR
    from scoft.review.results import export_csv

    with _review_store(p)() as session:
        campaign = _latest_campaign(session, culture)
        out = out or REVIEW_DIR / culture / f"{campaign.id}.csv"
        digest = export_csv(session, campaign, out)
    _say(f"{out}: sha256 {digest}")


@review_app.command("serve")
def review_serve(host: Annotated[str, typer.Option(help="The address to listen on.")] = "127.0.0.1",
                 port: Annotated[int, typer.Option(min=1, max=65535)] = 8700,
                 params: ParamsOpt = Path("params.yaml")):
    """The reviewers' app (pages at their links, and the JSON API) on the review store."""
    p = _params(params)
    import uvicorn

    from scoft.review.app import create_app

    _say(f"review app on http://{host}:{port} (links: {p.review.public_url}/r/<token>)")
    uvicorn.run(create_app(_review_store(p), Path("."), p.review.public_url), host=host, port=port, log_level="warning",
                server_header=False)


def _track_registry() -> None:
    """`dvc add` the registry's LoRAs where this is a DVC workspace, so `dvc push` sends them; a failure
    is a RegistryError (the transaction then puts the registry file back)."""
    import subprocess

    from scoft.registry import LORAS_DIR, RegistryError

    if Path(".dvc").is_dir() and LORAS_DIR.is_dir():
        out = subprocess.run([sys.executable, "-m", "dvc", "add", "-q", str(LORAS_DIR)], capture_output=True,
                             text=True)
        if out.returncode:
            tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["(no output)"]
            raise RegistryError(f"`dvc add {LORAS_DIR}` failed ({tail[0][:300]}): the registry is as it was")


if __name__ == "__main__":  # last: every command above is registered before it runs
    main()
