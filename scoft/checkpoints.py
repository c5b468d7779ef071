"""Checkpoints of a long build made of training phases (the planted base: its VAE, its UNet, its judge),
so that a stopped build loses at most `every_s` seconds of it and a resumed one ends bit for bit where
an uninterrupted one would (on the CPU, with deterministic algorithms).

One file per phase in a folder of the build's settings (`fingerprint`): the phase's newest state while it
runs, its final weights once it is done. Files are written to a temporary name and renamed (a kill
mid-write leaves the previous one), and loaded with weights_only, so a planted file that would run code on
load is refused, as is one of other settings; either is named and the phase starts fresh."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import torch


class BuildCheckpoints:
    def __init__(self, folder: str | Path, fingerprint: str, every_s: float, progress=print):
        self.root = Path(folder)
        self.folder = self.root / fingerprint[:16]
        self.fingerprint, self.every_s, self.progress = fingerprint, every_s, progress
        self._saved_at = time.monotonic()

    def load(self, phase: str) -> dict | None:
        """The phase's saved state, or None (nothing saved, or a file refused: named)."""
        path = self.folder / f"{phase}.pt"
        if not path.is_file():
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or not {"fingerprint", "phase", "step", "done"} <= set(state):
                raise ValueError("not a scoft build checkpoint")
        except Exception as e:  # noqa: BLE001 - any unreadable file is refused the same way
            self.progress(f"checkpoint: refusing {path}: not a valid checkpoint "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})")
            return None
        if state["fingerprint"] != self.fingerprint or state["phase"] != phase:
            self.progress(f"checkpoint: refusing {path}: made with other settings")
            return None
        return state

    def save(self, phase: str, step: int, done: bool, **state) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{phase}.pt"
        tmp = path.with_suffix(".tmp")
        torch.save({"fingerprint": self.fingerprint, "phase": phase, "step": step, "done": done, **state}, tmp)
        os.replace(tmp, path)
        self._saved_at = time.monotonic()

    def due(self) -> bool:
        return time.monotonic() - self._saved_at >= self.every_s

    def clear(self) -> None:
        """After the build is written: its checkpoints would only be in the way of another build."""
        shutil.rmtree(self.root, ignore_errors=True)


def resumable_steps(checkpoints: BuildCheckpoints | None, phase: str, steps: int, module: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, schedule, generator: torch.Generator,
                    saved: dict | None) -> Iterator[int]:
    """The steps of a phase's training loop still to run. Restores the module, optimizer, schedule and
    random generator from the phase's `saved` state (of checkpoints.load) first; after each step, saves
    them when a checkpoint is due."""
    start = 0
    if saved is not None and not saved["done"]:
        module.load_state_dict(saved["module"])
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        generator.set_state(saved["generator"])
        start = saved["step"]
        checkpoints.progress(f"checkpoint: {phase} resumes at step {start}/{steps}")
    for step in range(start, steps):
        yield step
        if checkpoints is not None and step + 1 < steps and checkpoints.due():
            checkpoints.save(phase, step + 1, False, module=module.state_dict(), optimizer=optimizer.state_dict(),
                             schedule=schedule.state_dict(), generator=generator.get_state())
