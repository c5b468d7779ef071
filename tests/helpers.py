"""Helpers the tests share: an offline ingest with the suite's usual options, tiny sampler settings, the
`scoft` command run in this process."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
from pathlib import Path

# Two sampler steps at 32 px: enough to exercise guidance and batching, cheap on 2 cores.
TINY_SAMPLING = {"steps": 2, "guidance_scale": 4.5, "resolution": 32}


def ingest_offline(sources: list, out: str | Path, **overrides) -> dict:
    """scoft.ccub.ingest with the fallback captioner, no progress output, a quarter held out and a
    quarter of rows allowed to be rejected; keyword arguments override any of these."""
    from scoft.captions import FallbackCaptioner
    from scoft.ccub import ingest

    options = dict(heldout_fraction=0.25, max_pixels=10**7, max_rejected_fraction=0.25,
                   captioner=FallbackCaptioner(), progress=lambda m: None)
    return ingest([str(s) for s in sources], out, **{**options, **overrides})


def scoft_here(*args: str | Path, cwd: str | Path) -> subprocess.CompletedProcess:
    """`scoft ARGS` run from `cwd` in this process, through the console script's own entry point
    (scoft.cli:main, with its one-line failures): the same command as tests.conftest.scoft (a subprocess)
    without its 10 to 15 s of importing torch and diffusers again. An exception the command does not turn
    into an exit status fails the test (the subprocess would print a traceback). For commands judged by
    their exit status, output and files; what is about processes (signals, time limits, environment
    read at start) keeps the subprocess."""
    from scoft.cli import main

    out, err, argv = io.StringIO(), io.StringIO(), sys.argv
    sys.argv = ["scoft", *map(str, args)]
    try:
        with contextlib.chdir(cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
        status = 0
    except SystemExit as e:  # typer ends every command with one
        status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv
    return subprocess.CompletedProcess(["scoft", *args], status, out.getvalue(), err.getvalue())


def kill_stage_command(ws, name: str) -> int:
    """SIGKILL the running `scoft NAME` of the workspace. The stage's command may run under a `sh -c`
    wrapper (DVC runs it through the shell, and whether the shell execs it depends on the shell):
    kill the whole command, wrapper included."""
    import psutil

    killed = 0
    for proc in psutil.process_iter(["cmdline", "cwd"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if proc.info["cwd"] == str(ws) and "scoft" in cmd and f" {name} " in f"{cmd} " and "dvc" not in cmd:
            proc.kill()
            killed += 1
    return killed
