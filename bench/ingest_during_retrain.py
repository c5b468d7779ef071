"""An ingest that lands while a retrain trains in the same workspace: how long until its `ccub.updated`,
what the retrain recorded, and what the isolation costs.

A workspace (this checkout's dvc.yaml, params.yaml and scoft/, the built-in sample, a local DVC remote,
the tests' tiny-random base) is brought to version V by the ingest flow; a retrain pinned to V starts,
and when its train stage starts one KOR training image is added and the ingest flow runs again. Printed:
the ingest's seconds from its start to its announcement, whether the retrain was still training then,
the retrain's seconds, the CCUB version its lineage record says, and the ingest workspace's size on disk.
Every flow runs on a temporary Prefect server. Run it on two checkouts to compare (before and after):

    .venv/bin/python -m bench.ingest_during_retrain [--steps 250]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.update({"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "GX_ANALYTICS_ENABLED": "false",
                   "HF_HUB_OFFLINE": "1", "PREFECT_HOME": tempfile.mkdtemp(prefix="scoft-bench-prefect-")})

from bench.incremental import workspace  # noqa: E402


def _training(ws: Path) -> bool:
    import psutil

    return any(proc.info["cwd"] == str(ws) and "scoft train" in " ".join(proc.info["cmdline"] or [])
               and "dvc" not in " ".join(proc.info["cmdline"] or [])
               for proc in psutil.process_iter(["cmdline", "cwd"]))


def _disk(folder: Path) -> int:
    """Bytes of the files under `folder`, links not followed (the ingest workspace links the sources)."""
    return sum((Path(d) / f).lstat().st_size for d, _, files in os.walk(folder) for f in files)


def run(steps: int) -> dict:
    from prefect.testing.utilities import prefect_test_harness

    from flows.ingest import ingest
    from flows.retrain import retrain
    from scoft.lineage import latest_record
    from scoft.sample import add_sample_image

    folder = Path(tempfile.mkdtemp(prefix="scoft-bench-isolation-"))
    overrides = {"model.base": "tiny-random", "features.evaluation": "colour-histogram", "train.max_steps": steps,
                 "train.checkpoint_every": steps, "negatives.per_image": 1, "negatives.steps": 2, "evaluate.steps": 2,
                 "evaluate.bootstrap": 100, "evaluate.samples_per_prompt": 2, "validate.cultures": ["KOR"]}
    try:
        ws = workspace(folder / "ws", overrides)
        subprocess.run([sys.executable, "-m", "dvc", "remote", "add", "-d", "local", str(folder / "remote")],
                       cwd=ws, check=True, capture_output=True)
        with prefect_test_harness(server_startup_timeout=180):
            started = time.monotonic()
            first = ingest(workdir=str(ws))
            first_ingest = time.monotonic() - started
            outcome = {}

            def retraining():
                began = time.monotonic()
                outcome["state"] = retrain(workdir=str(ws), ccub_version=first["version"], return_state=True)
                outcome["seconds"] = time.monotonic() - began

            thread = threading.Thread(target=retraining)
            thread.start()
            while not _training(ws) and thread.is_alive():
                time.sleep(0.2)
            add_sample_image(ws / "data/sample", "KOR")
            began = time.monotonic()
            second = ingest(workdir=str(ws))
            to_event = time.monotonic() - began
            training_then = _training(ws)
            thread.join()
            record = latest_record(ws, "KOR")[1]
        twin = ws / ".dvc/tmp/scoft-ingest"
        return {"first ingest (s)": round(first_ingest, 1), "ingest start to ccub.updated (s)": round(to_event, 1),
                "retrain still training at the event": training_then, "retrain (s)": round(outcome["seconds"], 1),
                "retrain state": outcome["state"].type.value, "V": first["version"],
                "V+1": (second or {}).get("version"), "record's version": record["ccub"]["dvc_hash"],
                "ingest workspace on disk (MB)": round(_disk(twin) / 2**20, 2) if twin.is_dir() else 0.0,
                **({f"  of which {part} (MB)": round(_disk(twin / part) / 2**20, 2)
                    for part in (".dvc", "scoft", "data")} if twin.is_dir() else {}),
                "project data/ccub on disk (MB)": round(_disk(ws / "data/ccub") / 2**20, 2)}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=250, help="train.max_steps of the retrain")
    print(json.dumps(run(parser.parse_args().steps), indent=2))


if __name__ == "__main__":
    main()
