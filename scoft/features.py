"""Feature networks for the pixel-space losses and the evaluation metric.

- `Perceptual`: L_P, the lpips package (learned linear weights shipped with it; the backbone is
  torchvision's pretrained one for real runs, a seeded random one offline).
- `FeatureDistance`: the distance D of the self-contrastive loss and of the evaluation, a cosine
  distance between embeddings of a transformers vision model (DINOv2 or CLIP), DreamSim-style.
Both are built once per run and frozen; gradient flows through them to the images only.
"""

from __future__ import annotations

import warnings

import lpips
import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, Dinov2Config, Dinov2Model

from scoft.config import FeatureParams

_NORMALISATION = {
    "dinov2": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "clip": ((0.4815, 0.4578, 0.4082), (0.2686, 0.2613, 0.2758)),
}
_TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    image_size=32, patch_size=8)


def _vision_model(backbone: str, weights: str, seed: int) -> nn.Module:
    if weights == "tiny":
        torch.manual_seed(seed)
        if backbone == "dinov2":
            return Dinov2Model(Dinov2Config(**_TINY_VISION))
        return CLIPVisionModel(CLIPVisionConfig(**_TINY_VISION))
    cls = Dinov2Model if backbone == "dinov2" else CLIPVisionModel
    return cls.from_pretrained(weights)  # a hub id or a local folder


def _freeze(module: nn.Module) -> nn.Module:
    module.requires_grad_(False)
    return module.eval()


class FeatureDistance(nn.Module):
    """D(a, b) = 1 - cos(f(a), f(b)) per sample, for images in [-1, 1]."""

    def __init__(self, params: FeatureParams, seed: int = 0):
        super().__init__()
        self.model = _freeze(_vision_model(params.backbone, params.weights, seed))
        self.size = self.model.config.image_size
        mean, std = _NORMALISATION[params.backbone]
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() + 1) / 2
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        x = ((x - self.mean) / self.std).to(next(self.model.parameters()).dtype)
        return F.normalize(self.model(pixel_values=x).pooler_output.float(), dim=-1)

    @staticmethod
    def between(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Cosine distance between embeddings (last dim), broadcasting."""
        return 1 - (a * b).sum(-1)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.between(self.embed(a), self.embed(b))


class Perceptual(nn.Module):
    """LPIPS distance per sample, for images in [-1, 1]."""

    def __init__(self, params: FeatureParams, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        with warnings.catch_warnings():  # lpips calls torchvision with its deprecated `pretrained=`
            warnings.simplefilter("ignore", UserWarning)
            net = lpips.LPIPS(net=params.lpips_net, pnet_rand=not params.lpips_pretrained_backbone, verbose=False)
        self.lpips = _freeze(net)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.lpips(a.float(), b.float()).flatten()
