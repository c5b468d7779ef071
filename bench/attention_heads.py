"""Time per training step of the tiny planted-bias UNet (scoft.models.TINY_PLANTED_UNET) by number of
attention heads, in one process, alternating the configurations so that clock drift cancels.

    python bench/attention_heads.py [--heads 8,2] [--steps 20] [--batch 8]

What the `base` stage's UNet pretraining does per step (noise-prediction loss, backward, AdamW) at
the default 32 px (16x16 latents), random weights. The last line is the time ratio of the last
configuration against the first.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine  # noqa: E402
from scoft.models import TINY_PLANTED_UNET  # noqa: E402


def seconds_per_step(heads: int, steps: int, batch: int, warmup: int = 3) -> float:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=16, **dict(TINY_PLANTED_UNET, attention_head_dim=heads))
    optimizer = torch.optim.AdamW(unet.parameters(), 1e-3)
    x, text = torch.randn(batch, 4, 16, 16), torch.randn(batch, 77, TINY_PLANTED_UNET["cross_attention_dim"])
    t = torch.randint(0, 1000, (batch,))
    for i in range(warmup + steps):
        if i == warmup:
            started = time.perf_counter()
        loss = unet(x, t, encoder_hidden_states=text).sample.pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", default="8,2", help="comma-separated head counts; the first is the baseline")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2, help="each configuration this many times, interleaved")
    args = parser.parse_args()
    heads = [int(h) for h in args.heads.split(",")]
    times: dict[int, list[float]] = {h: [] for h in heads}
    for _ in range(args.rounds):
        for h in heads:
            times[h].append(seconds_per_step(h, args.steps, args.batch))
    print(f"{machine()}; batch {args.batch}, 16x16 latents, {args.steps} steps x {args.rounds} rounds")
    for h in heads:
        channels = "/".join(str(c // h) for c in TINY_PLANTED_UNET["block_out_channels"])
        print(f"heads {h} (channels per head {channels}): {sum(times[h]) / len(times[h]):.4f} s/step "
              f"(rounds {', '.join(f'{v:.4f}' for v in times[h])})")
    first, last = (sum(times[h]) / len(times[h]) for h in (heads[0], heads[-1]))
    print(f"ratio heads {heads[-1]} / heads {heads[0]}: {last / first:.3f}")


if __name__ == "__main__":
    main()
