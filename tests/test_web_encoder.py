"""The planted web's self-supervised encoder (scoft/web_encoder.py) and the two distances on it."""

import math

import pytest
import torch
import torch.nn.functional as F

from scoft.config import FeatureParams
from scoft.features import build_distance
from scoft.web_encoder import WebEncoderUnavailable, build_web_encoder, nt_xent, views


def test_nt_xent_by_hand():
    """Two pictures, their views' projections one-hot: each view's partner scores 1/T, the other
    picture's two views 0, itself nothing."""
    e0, e1 = torch.eye(2)
    z = torch.stack([e0, e1, e0, e1])
    t = 0.2
    expected = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 2))
    assert nt_xent(z, t).item() == pytest.approx(expected, rel=1e-6)
    # the views paired wrongly (row i with row i + 1): the loss is far higher
    assert nt_xent(torch.stack([e0, e0, e1, e1]), t).item() > expected + 3


def test_views_crop_inside_mirror_and_never_change_colour():
    generator = torch.Generator().manual_seed(0)
    flat = torch.tensor([0.6, -0.2, 0.1]).view(1, 3, 1, 1).expand(16, 3, 32, 32)
    # no colour change and nothing from outside the picture: a flat picture's every view is that colour
    assert torch.allclose(views(flat, generator, noise=0), flat, atol=1e-5)
    ramp = torch.linspace(-1, 1, 32).view(1, 1, 1, 32).expand(400, 3, 32, 32)
    seen = views(ramp, generator, noise=0)[:, 0, 16]
    span = seen[:, -1] - seen[:, 0]
    assert span.abs().min() >= 2 * 0.6 * 31 / 32 - 0.05  # a crop of at least 60% of the side
    assert 0.4 < (span < 0).float().mean() < 0.6  # mirrored half the time
    noisy = views(flat, generator, noise=0.1)
    assert (noisy - flat).std().item() == pytest.approx(0.1, rel=0.05)


@pytest.fixture(scope="module")
def encoder_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("web") / "web_encoder"
    pictures = torch.rand(32, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    build_web_encoder(folder, pictures, steps=3, progress=lambda m: None)
    return folder


def _images(seed: int, n: int = 3) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("name", ["web-ssl", "web-ssl-lpips"])
def test_web_distances_are_zero_on_the_same_image_symmetric_and_carry_a_gradient(encoder_folder, name):
    d = build_distance(name, FeatureParams(web_encoder=str(encoder_folder)))
    a, b = _images(1), _images(2)
    assert torch.allclose(d(a, a), torch.zeros(3), atol=1e-5)
    assert torch.allclose(d(a, b), d(b, a), atol=1e-6) and (d(a, b) > 0).all()
    x = a.clone().requires_grad_(True)
    d(x, b).sum().backward()
    assert x.grad.abs().sum() > 0 and not any(p.requires_grad for p in d.parameters())  # frozen network
    targets = torch.stack([b, a], dim=1)
    assert torch.allclose(d.pairwise(a, targets), torch.stack([d(a, b), d(a, a)], dim=1), atol=1e-5)


def test_web_distances_by_hand(encoder_folder):
    params = FeatureParams(web_encoder=str(encoder_folder))
    pooled, layered = build_distance("web-ssl", params), build_distance("web-ssl-lpips", params)
    a, b = _images(3), _images(4)
    ea, eb = pooled.model(a), pooled.model(b)
    assert torch.allclose(pooled(a, b), 1 - F.cosine_similarity(ea, eb), atol=1e-5)
    expected = sum(((F.normalize(ha, dim=1) - F.normalize(hb, dim=1)) ** 2).sum(1).mean(dim=(1, 2))
                   for ha, hb in zip(layered.model.layers(a), layered.model.layers(b)))
    assert torch.allclose(layered(a, b), expected, atol=1e-5)
    assert len(layered.model.layers(a)) == 4


def test_the_web_encoder_missing_is_an_error_naming_the_stage(tmp_path):
    with pytest.raises(WebEncoderUnavailable, match="run `dvc repro base`"):
        build_distance("web-ssl", FeatureParams(web_encoder=str(tmp_path / "nowhere")))


def test_a_planted_backbone_without_the_planted_base_is_refused_when_the_params_load(tmp_path):
    """With another base the `base` stage builds no web encoder (nor judge): said at load, before any stage
    runs, naming the key; a build pointed at elsewhere is taken."""
    from scoft.config import ConfigError, load_params, with_overrides
    from tests.conftest import ROOT

    defaults = load_params(ROOT / "params.yaml")
    with pytest.raises(ConfigError, match="features.perceptual: web-ssl-lpips needs features.web_encoder"):
        with_overrides(defaults, ["model.base=tiny-random"])
    with pytest.raises(ConfigError, match="features.evaluation: planted-attributes needs features.judge"):
        with_overrides(defaults, ["model.base=tiny-random", "features.perceptual=lpips-alex",
                                  "features.contrastive=dinov2"])
    elsewhere = with_overrides(defaults, ["model.base=tiny-random", f"features.web_encoder={tmp_path / 'w'}",
                                          f"features.judge={tmp_path / 'j'}"])
    assert elsewhere.features.contrastive == "web-ssl"


@pytest.mark.parametrize("name", ["web-ssl", "web-ssl-lpips"])
def test_web_distances_run_in_bf16_as_bf16_training_builds_them(encoder_folder, name):
    from scoft.train import _frozen_on, feature_dtype

    d32 = build_distance(name, FeatureParams(web_encoder=str(encoder_folder)))
    d16 = _frozen_on(build_distance(name, FeatureParams(web_encoder=str(encoder_folder))), "cpu",
                     feature_dtype(torch.bfloat16))
    a, b = _images(5), _images(6)
    assert d16(a, b).dtype == torch.float32 and torch.allclose(d16(a, b), d32(a, b), rtol=0.1, atol=0.02)
