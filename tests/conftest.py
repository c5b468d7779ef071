import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

# Before any Prefect or GX import: no telemetry, Prefect state in a throwaway folder, no hub access.
_PREFECT_HOME = tempfile.mkdtemp(prefix="scoft-test-prefect-")
os.environ.update({
    "PREFECT_HOME": _PREFECT_HOME,
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "HF_HUB_OFFLINE": "1",
    "PREFECT_LOGGING_TO_API_BATCH_INTERVAL": "0.3",
    # One torch thread in every process of the session (subprocesses inherit it): the planted pipeline
    # runs beside the suite on 2 cores, and a 2-thread torch beside it oversubscribes them; OpenMP's
    # spinning threads then wait on each other (a tiny base build: 15.5 s against 6.9 s on one thread).
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
})

import pytest  # noqa: E402
import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory) -> Path:
    from scoft.sample import write_sample

    return write_sample(tmp_path_factory.mktemp("sample") / "ccub-sample")


# Tests of the mechanics run on the tiny architecture with seeded random weights (fast); the
# planted-bias base ("tiny", built by the `base` stage) has tests of its own.
TEST_BASE = "tiny-random"
# The planted judge judges the planted world (it is built beside that base); the mechanics are judged by
# colour histograms, which need no build. promotion.min_gain is in planted-attributes' units: colour
# histograms get no floor (the floor has its own test, tests/test_promotion.py).
TEST_EVALUATION = "colour-histogram"
# The web encoder of L_P's and L_C's default spaces is built beside that base too: the mechanics train in
# the seeded random spaces (lpips-alex, dinov2), which need no build.
TEST_PERCEPTUAL, TEST_CONTRASTIVE = "lpips-alex", "dinov2"


def unit_params(path: Path = ROOT / "params.yaml"):
    from scoft.config import load_params

    p = load_params(path)
    return p.model_copy(update={"model": p.model.model_copy(update={"base": TEST_BASE}),
                                "features": p.features.model_copy(update={
                                    "evaluation": TEST_EVALUATION, "perceptual": TEST_PERCEPTUAL,
                                    "contrastive": TEST_CONTRASTIVE}),
                                "promotion": p.promotion.model_copy(update={"min_gain": 0.0})})


@pytest.fixture
def params():
    return unit_params()


def make_workspace(path: Path, sample_dir: Path, overrides: dict | None = None) -> Path:
    """A DVC workspace like the project root: dvc.yaml, params.yaml, a local remote, the sample."""
    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "dvc.yaml", path / "dvc.yaml")
    # the stages list the scoft modules they run as deps (a code change reruns them): a workspace
    # is a checkout, so it holds them
    shutil.copytree(ROOT / "scoft", path / "scoft", ignore=shutil.ignore_patterns("__pycache__"))
    write_params(path / "params.yaml", overrides or {})
    shutil.copytree(sample_dir, path / "data" / "sample")
    dvc = [sys.executable, "-m", "dvc"]
    for args in (["init", "--no-scm", "-q"], ["config", "core.analytics", "false"],
                 ["remote", "add", "-d", "local", str(path.parent / f"{path.name}-remote")]):
        subprocess.run(dvc + args, cwd=path, check=True, capture_output=True)
    return path


def scoft(*args, cwd) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    return subprocess.run([str(BIN / "scoft"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 on loopback, a real HTTP endpoint; credentials only in this process's environment."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                                           "AWS_REQUEST_CHECKSUM_CALCULATION", "AWS_RESPONSE_CHECKSUM_VALIDATION")}
    os.environ.update({"AWS_ACCESS_KEY_ID": "test-key-id", "AWS_SECRET_ACCESS_KEY": "test-secret-do-not-log",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
                       "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required"})
    yield f"http://{host}:{port}"
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server (Debian's packages) for the session; skipped, saying why, where none starts."""
    from tests.postgres import LocalPostgres, PostgresUnavailable

    server = LocalPostgres()
    try:
        server.__enter__()
    except PostgresUnavailable as e:
        server.__exit__(None, None, None)
        pytest.skip(f"no PostgreSQL server could be started here: {e}")
    yield server
    server.__exit__(None, None, None)


@pytest.fixture(scope="session")
def prepared(sample_dir, tmp_path_factory):
    """The sample ingested, with 2 negatives per training record: (ccub dir, negatives dir)."""
    from scoft.ccub import read_manifest
    from scoft.config import ModelParams
    from scoft.models import load_pipeline, model_fingerprint
    from scoft.negatives import plan_negatives, sample_negatives
    from tests.helpers import TINY_SAMPLING, ingest_offline

    work = tmp_path_factory.mktemp("prepared")
    ingest_offline([sample_dir], work / "ccub")
    pipe = load_pipeline(ModelParams(base=TEST_BASE, resolution=32))
    settings = TINY_SAMPLING
    plan = plan_negatives(read_manifest(work / "ccub"), model_fingerprint(pipe), settings, per_image=2, base_seed=1)
    sample_negatives(pipe, plan, work / "negatives", batch_size=16, settings=settings, progress=lambda m: None)
    return work / "ccub", work / "negatives"


def write_params(path: Path, overrides: dict) -> Path:
    """The project's params.yaml with dotted keys overridden ({"train.max_steps": 4})."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"]["base"] = TEST_BASE
    params["features"]["evaluation"] = TEST_EVALUATION
    params["features"]["perceptual"], params["features"]["contrastive"] = TEST_PERCEPTUAL, TEST_CONTRASTIVE
    params["promotion"]["min_gain"] = 0.0
    for dotted, value in overrides.items():
        *parents, key = dotted.split(".")
        node = params
        for p in parents:
            node = node[p]
        node[key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path



# Two jobs take minutes: the default pipeline on the planted-bias base (about 10 minutes to build here,
# and its fine-tunes 4 more) and the fan-out scenario on a real Prefect server (tests/fan_out_scenario.py,
# about 5 minutes, much of it waiting on its server and workers). Each starts in a subprocess (one
# thread, as every process of the session) as soon as its tests are collected, and those tests run last.
# The suite runs in two pytest-xdist workers (Makefile), each collecting every test: the first to collect
# starts each job, in a folder of the test run that both workers (and the controller, which removes it
# at the end) find by the run's id.
PLANTED_CULTURES = ("KOR", "NGA")
_RUN_ID = uuid.uuid4().hex


def _planted_commands() -> list[str]:
    """The default pipeline's commands as dvc.yaml runs them, on the built-in sample (4 training and 3
    held-out images per culture and category, as bench/planted_bias.py), with params.yaml untouched.
    What does not depend on each other runs side by side, as DVC's stage graph allows (each process is
    single-threaded): ingest beside the base, then the two cultures' chains."""
    chains = [f"(scoft negatives --culture {c} --out data/negatives/{c} && scoft train --culture {c} "
              f"--negatives data/negatives/{c} --output models/lora/{c} --log-dir models/train_log/{c}) & "
              f"chain_{c}=$!" for c in PLANTED_CULTURES]
    commands = ["scoft sample --out data/sample", "scoft ingest & ingest=$!", "scoft base --out models/base",
                "wait $ingest", *chains, *(f"wait $chain_{c}" for c in PLANTED_CULTURES)]
    return ["bash", "-c", "set -eo pipefail; " + "; ".join(commands)]


BACKGROUND = {  # fixture: (the job's command, run in its own folder; whether it needs params.yaml there)
    "fanned_out": (lambda folder: [sys.executable, "-m", "tests.fan_out_scenario", str(folder)], False),
    "planted_run": (lambda folder: _planted_commands(), True),
}
# Runs the job, then writes its exit status to `rc` beside its log (the job outlives the worker that started it).
_RECORD_EXIT = ("import os, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
                "open('rc.tmp', 'w').write(str(rc)); os.replace('rc.tmp', 'rc')")


def _run_folder(config) -> Path:
    run = getattr(config, "workerinput", {}).get("testrunuid", _RUN_ID)
    folder = Path(tempfile.gettempdir()) / f"scoft-test-run-{run}"
    folder.mkdir(exist_ok=True)
    return folder


def _start_once(folder: Path, command: list[str], with_params: bool) -> None:
    with open(folder.parent / f"{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if folder.exists():
            return  # the other worker started it
        folder.mkdir()
        if with_params:
            shutil.copy(ROOT / "params.yaml", folder / "params.yaml")
        env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=str(ROOT))
        with open(folder / "run.log", "w") as log:
            proc = subprocess.Popen([sys.executable, "-c", _RECORD_EXIT, *command], cwd=folder, env=env,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                    preexec_fn=_first_in_line)
        (folder / "pid").write_text(str(proc.pid))


# The planted pipeline is the suite's longest chain (one thread, about 10 minutes of CPU): the workers run
# at a lower priority than the background jobs, so that the cores it needs go to it first and the rest of
# the suite fills the time around it (a fair share had it finish last, 12 minutes after everything else).
WORKER_NICENESS = 10
_STARTED_AT = os.getpriority(os.PRIO_PROCESS, 0)  # the suite's own priority, before a worker lowers its


def pytest_configure(config):
    if hasattr(config, "workerinput"):
        os.nice(WORKER_NICENESS)
    elif getattr(config.option, "numprocesses", None) and not getattr(config.option, "testrunuid", None):
        config.option.testrunuid = _RUN_ID  # the workers' run id is the controller's: it removes their folder


def _first_in_line() -> None:
    """In a background job's process: back to the priority the suite started with (only root may)."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, _STARTED_AT)
    except PermissionError:  # not root: the job keeps the worker's priority
        pass


# The longest modules first (module fixtures keep a module on one worker): the retrain flow's chain of
# end-to-end runs is the suite's critical path, and started late it ended the suite 10 minutes after the rest.
LONGEST_FIRST = ["test_retrain_flow.py", "test_ingest_flow.py", "test_training.py", "test_run_supervision.py",
                 "test_promotion.py", "test_failures_named.py"]


@pytest.hookimpl(trylast=True)  # after -k and -m deselect: a deselected background test starts nothing
def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each module's order kept
    last = []
    for fixture, (command, with_params) in BACKGROUND.items():
        uses = [item for item in items if fixture in getattr(item, "fixturenames", ())]
        if not uses:
            continue
        items[:] = [item for item in items if item not in uses]
        last += uses
        folder = _run_folder(config) / fixture
        _start_once(folder, command(folder), with_params)
    items += last


def pytest_sessionfinish(session, exitstatus):
    if hasattr(session.config, "workerinput"):
        return  # a worker: the controller (or the only process) ends the jobs once every worker is done
    run = _run_folder(session.config)
    for pid in run.glob("*/pid"):
        try:
            os.killpg(int(pid.read_text()), 9)
        except ProcessLookupError:
            pass
    shutil.rmtree(run, ignore_errors=True)


def _background_result(fixture: str, config) -> Path:
    folder = _run_folder(config) / fixture
    while not (folder / "rc").is_file():
        time.sleep(1)
    if (folder / "rc").read_text() != "0":
        pytest.fail(f"the background job of {fixture} failed:\n" + (folder / "run.log").read_text()[-4000:])
    return folder


@pytest.fixture(scope="session")
def planted_run(pytestconfig) -> Path:
    """A workspace where the default pipeline ran on the planted-bias base (params.yaml's own
    settings): models/base, data/ccub, and a LoRA per culture of PLANTED_CULTURES in models/lora/."""
    return _background_result("planted_run", pytestconfig)


@pytest.fixture(scope="session")
def fanned_out(pytestconfig) -> dict:
    """What tests/fan_out_scenario.py saw: the workspaces, the culture runs and their states, the kill."""
    return json.loads((_background_result("fanned_out", pytestconfig) / "result.json").read_text())


# Under CI a test that could not run for want of a system package `make test` installs is a failure, not a
# skip: a green run must have driven the review app in chromium and run its store on PostgreSQL.
REQUIRED_IN_CI = ("chromium", "PostgreSQL")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI", "").lower() in ("1", "true") and report.skipped:
        reason = str(report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr)
        if any(name.lower() in reason.lower() for name in REQUIRED_IN_CI):
            report.outcome = "failed"
            report.longrepr = f"CI=true and this test was skipped: {reason}"
