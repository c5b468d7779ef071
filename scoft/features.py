"""Feature distances for the pixel-space losses and the evaluation, chosen by name.

- `lpips-vgg`, `lpips-alex`, `lpips-squeeze`: the lpips package (its learned linear weights ship with
  it; the backbone is torchvision's pretrained one for real runs, a seeded random one offline).
- `dinov2`, `clip`: cosine distance between embeddings of a transformers vision model.
- `dinov2+clip`: cosine distance between the concatenated DINOv2 and CLIP embeddings (the ensemble
  DreamSim starts from, without DreamSim's fine-tuned weights: not DreamSim).
- `colour-histogram`: 1 - the Bhattacharyya coefficient of soft RGB histograms. It has no weights, so
  offline, where the transformers backbones can only have seeded random weights, it is the one whose
  judgement means something known (how alike two images' colours are) and depends on no seed.
- `planted-judge`: cosine distance between the penultimate embeddings of the planted world's judge
  (scoft/judge.py), a small CNN trained on its own renders to tell category, form (truth or
  stereotype: shape) and palette apart. Measured through the gate (bench/metric_balance.py), about 93%
  of what it sees between truth and stereotype is colour: a correction of form alone barely moves it.
- `planted-attributes` (the offline default): the judge's named attributes weighed as declared
  (`features.attribute_weights`): D = sum_k w_k (1 - BC(p_k(a), p_k(b))) / sum_k w_k over its category,
  form and palette heads, BC the Bhattacharyya coefficient of their predicted distributions. Form and
  palette count as much as the weights say, whatever the embedding's geometry.
- `web-ssl` (for L_C) and `web-ssl-lpips` (for L_P): the planted web's self-supervised encoder
  (scoft/web_encoder.py: a small CNN pretrained by SimCLR on the planted world's unlabeled pictures, as
  DINOv2 and CLIP learn from the web), the cosine between its pooled embeddings, and LPIPS' form without
  learned heads over its four layers. Offline, the spaces whose features were learned from a web.
Both judge distances load from `features.judge`, the web encoder's from `features.web_encoder` (the
`base` stage builds both beside the base).
Transformers backbones load from `features.weights[name]`: "tiny" (a seeded small model, offline), a
hub id or a local folder. Each network is built once per run and frozen; gradient flows through it to
the images only.
"""

from __future__ import annotations

import warnings

import lpips
import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, Dinov2Config, Dinov2Model

from scoft.config import FeatureParams
from scoft.hub import loading

LPIPS_NETS = {"lpips-vgg": "vgg", "lpips-alex": "alex", "lpips-squeeze": "squeeze"}
EMBEDDING_MODELS = {"dinov2": Dinov2Model, "clip": CLIPVisionModel}
COLOUR_HISTOGRAM = "colour-histogram"
PLANTED_JUDGE = "planted-judge"
PLANTED_ATTRIBUTES = "planted-attributes"
WEB_SSL, WEB_SSL_LPIPS = "web-ssl", "web-ssl-lpips"
BACKBONES = [*LPIPS_NETS, *EMBEDDING_MODELS, "dinov2+clip", COLOUR_HISTOGRAM, PLANTED_JUDGE, PLANTED_ATTRIBUTES,
             WEB_SSL, WEB_SSL_LPIPS]
_NORMALISATION = {
    "dinov2": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "clip": ((0.4815, 0.4578, 0.4082), (0.2686, 0.2613, 0.2758)),
}
_TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    image_size=32, patch_size=8)


def _freeze(module: nn.Module) -> nn.Module:
    module.requires_grad_(False)
    return module.eval()


def vision_model(kind: str, weights: str, seed: int) -> nn.Module:
    if weights == "tiny":
        torch.manual_seed(seed)
        config = Dinov2Config(**_TINY_VISION) if kind == "dinov2" else CLIPVisionConfig(**_TINY_VISION)
        return EMBEDDING_MODELS[kind](config)
    with loading(f"features.weights.{kind}", weights):
        return EMBEDDING_MODELS[kind].from_pretrained(weights)  # a hub id or a local folder


class _Pairwise(nn.Module):
    def pairwise(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """D(x_b, targets_{b,k}) of shape [B, K]; targets [B, K, 3, H, W] carry no gradient."""
        return torch.stack([self(x, targets[:, k]) for k in range(targets.shape[1])], dim=1) \
            if targets.shape[1] else x.new_zeros(x.shape[0], 0)


class EmbeddingDistance(_Pairwise):
    """D(a, b) = 1 - cos(f(a), f(b)) per sample, for images in [-1, 1]."""

    def __init__(self, kind: str, weights: str, seed: int = 0):
        super().__init__()
        self.model = _freeze(vision_model(kind, weights, seed))
        self.size = self.model.config.image_size
        mean, std = _NORMALISATION[kind]
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() + 1) / 2
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        x = ((x - self.mean) / self.std).to(next(self.model.parameters()).dtype)
        return F.normalize(self.model(pixel_values=x).pooler_output.float(), dim=-1)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return 1 - (self.embed(a) * self.embed(b)).sum(-1)

    def pairwise(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        e = self.embed(x)
        if not targets.shape[1]:
            return e.new_zeros(e.shape[0], 0)
        with torch.no_grad():
            t = self.embed(targets.flatten(0, 1)).view(*targets.shape[:2], -1)
        return 1 - (e[:, None] * t).sum(-1)


class DinoClipEnsemble(EmbeddingDistance):
    """Concatenated, normalised DINOv2 and CLIP embeddings: the untrained ensemble under DreamSim."""

    def __init__(self, params: FeatureParams, seed: int = 0):
        _Pairwise.__init__(self)
        self.parts = nn.ModuleList([EmbeddingDistance(k, params.weights_for(k), seed) for k in ("dinov2", "clip")])

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(torch.cat([p.embed(images) for p in self.parts], dim=-1), dim=-1)


class ColourHistogram(EmbeddingDistance):
    """D(a, b) = 1 - sum_i sqrt(h_a[i] h_b[i]) over soft joint RGB histograms (bins^3 cells, each pixel
    spread over its neighbouring bins by triangular weights, so the distance is smooth and has a
    gradient). The embedding is sqrt(h), of unit length: cosine distance on it is that distance."""

    def __init__(self, bins: int = 6, size: int = 32):
        _Pairwise.__init__(self)
        self.size = size
        self.register_buffer("centres", (torch.arange(bins) + 0.5) / bins, persistent=False)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float().clamp(-1, 1) + 1) / 2
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="area")
        bins = len(self.centres)
        # [N, pixels, bins] per channel: weight 1 at a bin's centre, 0 one bin width away
        r, g, b = (F.relu(1 - (x[:, c].flatten(1)[..., None] - self.centres).abs() * bins) for c in range(3))
        histogram = torch.einsum("npi,npj,npk->nijk", r, g, b).flatten(1)
        histogram = histogram / histogram.sum(-1, keepdim=True).clamp_min(1e-12)
        return F.normalize(histogram.clamp_min(0).add(1e-12).sqrt(), dim=-1)


class LpipsDistance(_Pairwise):
    """LPIPS per sample, for images in [-1, 1]."""

    def __init__(self, net: str, pretrained_backbone: bool, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        with warnings.catch_warnings():  # lpips calls torchvision with its deprecated `pretrained=`
            warnings.simplefilter("ignore", UserWarning)
            model = lpips.LPIPS(net=net, pnet_rand=not pretrained_backbone, verbose=False)
        self.lpips = _freeze(model)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        dtype = next(self.lpips.parameters()).dtype  # float32, or bf16 under bf16 training
        return self.lpips(a.to(dtype), b.to(dtype)).float().flatten()


class PlantedJudgeDistance(EmbeddingDistance):
    """D(a, b) = 1 - cos of the planted judge's penultimate embeddings (shape and colour together)."""

    def __init__(self, folder: str):
        from scoft.judge import load_judge

        _Pairwise.__init__(self)
        self.model = load_judge(folder)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model(images.float())["embedding"], dim=-1)


class PlantedAttributeDistance(EmbeddingDistance):
    """D(a, b) = sum_k w_k (1 - BC_k(a, b)) / sum_k w_k over the judge's attribute heads k (category, form,
    palette), BC_k the Bhattacharyya coefficient of the two images' predicted distributions. Its
    embedding concatenates sqrt(w_k / sum w) sqrt(softmax(head_k)), of unit length, so the cosine distance
    on it is that D (and the evaluation's pairwise machinery applies unchanged)."""

    def __init__(self, folder: str, weights: dict[str, float]):
        from scoft.judge import load_judge

        _Pairwise.__init__(self)
        self.model = load_judge(folder)
        total = sum(weights.values())
        self.scales = {k: (w / total) ** 0.5 for k, w in weights.items() if w > 0}

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model(images.float())
        return torch.cat([scale * F.softmax(out[k], dim=-1).sqrt() for k, scale in self.scales.items()], dim=-1)


class WebSslDistance(EmbeddingDistance):
    """D(a, b) = 1 - cos of the web encoder's pooled embeddings."""

    def __init__(self, folder: str):
        from scoft.web_encoder import load_web_encoder

        _Pairwise.__init__(self)
        self.model = load_web_encoder(folder)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype  # float32, or bf16 under bf16 training
        return F.normalize(self.model(images.to(dtype)).float(), dim=-1)


class WebSslLpips(_Pairwise):
    """LPIPS without learned heads (lpips' `lin=False`) on the web encoder: per layer, channels unit-normalised
    at each position, the squared difference summed over channels and averaged over space; summed over
    the four layers."""

    def __init__(self, folder: str):
        from scoft.web_encoder import load_web_encoder

        super().__init__()
        self.model = load_web_encoder(folder)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype  # float32, or bf16 under bf16 training
        maps = [h.float() for h in self.model.layers(torch.cat([a, b]).to(dtype))]
        return sum((F.normalize(h[:len(a)], dim=1) - F.normalize(h[len(a):], dim=1)).pow(2).sum(1).mean(dim=(1, 2))
                   for h in maps)


def device_of(distance: nn.Module) -> torch.device:
    """Where a distance network lives (the colour histogram has buffers but no parameters)."""
    return next(iter([*distance.parameters(), *distance.buffers()])).device


def build_distance(name: str, params: FeatureParams, seed: int = 0) -> nn.Module:
    if name in LPIPS_NETS:
        return LpipsDistance(LPIPS_NETS[name], params.lpips_pretrained_backbone, seed)
    if name in EMBEDDING_MODELS:
        return EmbeddingDistance(name, params.weights_for(name), seed)
    if name == "dinov2+clip":
        return DinoClipEnsemble(params, seed)
    if name == COLOUR_HISTOGRAM:
        return ColourHistogram()
    if name == PLANTED_JUDGE:
        return PlantedJudgeDistance(params.judge)
    if name == PLANTED_ATTRIBUTES:
        return PlantedAttributeDistance(params.judge, params.attribute_weights)
    if name == WEB_SSL:
        return WebSslDistance(params.web_encoder)
    if name == WEB_SSL_LPIPS:
        return WebSslLpips(params.web_encoder)
    raise ValueError(f"unknown feature backbone {name!r} (one of {', '.join(BACKBONES)})")
