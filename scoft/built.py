"""The small networks the `base` stage builds beside the planted base (the judge, the web encoder): each a
folder of its weights and an info JSON, written whole or not at all, and loaded frozen."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from scoft.io import atomic_dir, write_json


def save_built(out_dir: str | Path, stem: str, network: nn.Module, info: dict) -> None:
    """`stem`.pt (the weights) and `stem`.json (`info`) in `out_dir`, replacing it whole."""
    with atomic_dir(out_dir) as tmp:
        torch.save(network.state_dict(), tmp / f"{stem}.pt")
        write_json(tmp / f"{stem}.json", info)


def load_built(folder: str | Path, stem: str, make: Callable[[dict], nn.Module], missing: type[Exception],
               what: str) -> nn.Module:
    """The network `make(info)` with the weights saved by save_built, in eval mode and frozen; `missing`
    (naming `what`, the folder and the stage that builds it) when the folder holds none."""
    folder = Path(folder)
    if not (folder / f"{stem}.pt").is_file():
        raise missing(f"{what} in {folder}: the `base` stage builds it beside the planted base "
                      "(model.base: tiny): run `dvc repro base` first")
    info = json.loads((folder / f"{stem}.json").read_text(encoding="utf-8"))  # written with the weights
    network = make(info)
    network.load_state_dict(torch.load(folder / f"{stem}.pt", map_location="cpu", weights_only=True))
    return network.eval().requires_grad_(False)
