"""Feature spaces that mean something offline: a small CNN pretrained without labels on the planted web.

Real SCoFT measures L_P and L_C in networks pretrained on the web (VGG, DINOv2, CLIP); offline the
seeded random backbones read palette and little else (a random tiny DINOv2's form is at chance:
bench/feature_probe.py). This encoder learns the way DINOv2 and CLIP learn, from unlabeled web pictures:
SimCLR's contrastive loss between two augmented views of each picture of the planted world's own
corpora (the web the base's UNet learns from and the palette pictures its VAE learns from), never the
CCUB sample, the judge's renders or any label. Its views are crops, mirrors and pixel noise and never
a colour change, so colour stays information next to shape. The `base` stage builds it beside the base.

Two distances on it (scoft/features.py): `web-ssl` the cosine between pooled embeddings (for D of L_C),
`web-ssl-lpips` LPIPS' form without learned heads (unit-normalised channels, squared difference, spatial
mean, summed over the layers; for L_P).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from scoft.built import load_built, save_built
from scoft.checkpoints import BuildCheckpoints, resumable_steps

STEM = "web_encoder"  # web_encoder.pt and web_encoder.json in its folder
RESOLUTION = 32
WIDTHS = (32, 64, 128, 128)  # channels of its four convolutions; the last is the embedding's width
MIN_CROP = 0.6  # a view is a crop of 60 to 100% of the side


class WebEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        blocks, channels = [], 3
        for i, width in enumerate(WIDTHS):
            blocks.append(nn.Sequential(nn.Conv2d(channels, width, 3, stride=1 if i == 0 else 2, padding=1), nn.GELU()))
            channels = width
        self.blocks = nn.ModuleList(blocks)

    def layers(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Each block's feature map of images in [-1, 1] (32x32, 16x16, 8x8, 4x4 at 32 px)."""
        h = images
        if h.shape[-2:] != (RESOLUTION, RESOLUTION):
            h = F.interpolate(h, size=(RESOLUTION, RESOLUTION), mode="bilinear", antialias=True)
        maps = []
        for block in self.blocks:
            h = block(h)
            maps.append(h)
        return maps

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The embedding: the last map averaged over space."""
        return self.layers(images)[-1].mean(dim=(2, 3))


def views(x: torch.Tensor, generator: torch.Generator, noise: float = 0.1) -> torch.Tensor:
    """A random view of each image: a square crop of MIN_CROP to 1 of the side anywhere inside it, resized
    back, mirrored half the time, plus Gaussian pixel noise. No colour change: colour stays information."""
    n = x.shape[0]
    scale = MIN_CROP + (1 - MIN_CROP) * torch.rand(n, generator=generator)
    shift = (1 - scale)[:, None] * (2 * torch.rand(n, 2, generator=generator) - 1)  # stays inside the image
    mirror = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, :, 2] = scale * mirror, scale, shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    view = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return view + noise * torch.randn(view.shape, generator=generator)


def nt_xent(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss for 2B projections, rows i and i + B two views of one picture: each view must find its
    partner among the other 2B - 1."""
    z = F.normalize(z, dim=1)
    logits = z @ z.T / temperature
    logits = logits.masked_fill(torch.eye(len(z), dtype=torch.bool), float("-inf"))  # a view is not its own pair
    half = len(z) // 2
    partners = torch.cat([torch.arange(half, 2 * half), torch.arange(half)])
    return F.cross_entropy(logits, partners)


def train_web_encoder(pictures: torch.Tensor, steps: int, batch: int = 64, temperature: float = 0.2,
                      lr: float = 2e-3, seed: int = 0, progress=print,
                      checkpoints: BuildCheckpoints | None = None) -> tuple[WebEncoder, float]:
    """SimCLR on unlabeled pictures in [-1, 1]; returns the encoder (the projection head dropped, as
    SimCLR does) and the final loss."""
    torch.manual_seed(seed)
    encoder = WebEncoder()
    projector = nn.Sequential(nn.Linear(WIDTHS[-1], 128), nn.GELU(), nn.Linear(128, 64))
    both = nn.ModuleDict({"encoder": encoder, "projector": projector})
    optimizer = torch.optim.AdamW(both.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    generator = torch.Generator().manual_seed(seed)
    saved = checkpoints.load("web_encoder") if checkpoints is not None else None
    loss = torch.tensor(float("nan"))
    for step in resumable_steps(checkpoints, "web_encoder", steps, both, optimizer, schedule, generator, saved):
        x = pictures[torch.randint(0, len(pictures), (batch,), generator=generator)]
        loss = nt_xent(projector(encoder(torch.cat([views(x, generator), views(x, generator)]))), temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step + 1 == steps:
            progress(f"web encoder: step {step + 1}/{steps} loss {loss.item():.3f}")
    return encoder.eval(), loss.item()


def build_web_encoder(out_dir: str | Path, pictures: torch.Tensor, steps: int, seed: int = 0, progress=print,
                      checkpoints: BuildCheckpoints | None = None) -> dict:
    """Pretrain the encoder on `pictures` and write its weights and what it was trained on (whole or not at all)."""
    started = time.monotonic()
    encoder, loss = train_web_encoder(pictures, steps, seed=seed, progress=progress, checkpoints=checkpoints)
    info = {"method": "SimCLR (NT-Xent, temperature 0.2, batch 64; crops, mirrors, pixel noise)", "steps": steps,
            "seed": seed, "pictures": len(pictures), "final_loss": round(loss, 4),
            "seconds": round(time.monotonic() - started, 1)}
    save_built(out_dir, STEM, encoder, info)
    progress(f"web encoder: built in {info['seconds']} s on {len(pictures)} unlabeled pictures, final loss {loss:.3f}")
    return info


class WebEncoderUnavailable(FileNotFoundError):
    pass


def load_web_encoder(folder: str | Path) -> WebEncoder:
    return load_built(folder, STEM, lambda info: WebEncoder(), WebEncoderUnavailable,
                      "features.web_encoder: no web encoder")
