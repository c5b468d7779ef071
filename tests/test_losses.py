"""The SCoFT losses and the short sampler: values by hand, shapes, and where gradient flows."""

import math

import pytest
import torch

from scoft.losses import (
    contrastive_loss,
    estimate_clean_latents,
    ldm_loss,
    memorization_loss,
    prediction_to_eps,
    sampler_timesteps,
)


def test_ldm_loss_is_mean_squared_error_by_hand():
    pred = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    target = torch.tensor([[0.0, 2.0], [1.0, 8.0]])
    assert ldm_loss(pred, target).item() == pytest.approx((1 + 0 + 4 + 16) / 4)


def test_memorization_loss_value_and_gradient_only_through_the_caption_prediction():
    caption = torch.tensor([1.0, 3.0], requires_grad=True)
    generic = torch.tensor([0.0, 1.0], requires_grad=True)
    loss = memorization_loss(caption, generic)
    assert loss.item() == pytest.approx((1 + 4) / 2)
    loss.backward()
    assert torch.allclose(caption.grad, torch.tensor([1.0, 2.0]))  # d/dx mean((x-y)^2) = (x-y)
    assert generic.grad is None


def test_contrastive_difference_by_hand_with_a_sample_without_negatives():
    d_pos = torch.tensor([0.5, 0.2])
    d_neg = torch.tensor([[0.3, 0.7], [9.0, 9.0]])
    mask = torch.tensor([[True, True], [False, False]])
    terms = contrastive_loss(d_pos, d_neg, mask, "difference")
    # sample 0: 0.5 - (0.3 + 0.7) / 2 = 0.0; sample 1 has no negatives: positive term 0.2 only
    assert terms.loss.item() == pytest.approx((0.0 + 0.2) / 2)
    assert terms.positive.item() == pytest.approx(0.35)
    assert terms.negative.item() == pytest.approx(0.5)


def test_contrastive_hinge_by_hand():
    d_pos = torch.tensor([0.5, 0.1])
    d_neg = torch.tensor([[0.2, 0.0], [0.9, 0.0]])
    mask = torch.tensor([[True, False], [True, False]])
    terms = contrastive_loss(d_pos, d_neg, mask, "hinge", margin=0.1)
    # max(0, 0.5 - 0.2 + 0.1) = 0.4; max(0, 0.1 - 0.9 + 0.1) = 0
    assert terms.loss.item() == pytest.approx(0.2)


def test_contrastive_difference_is_unbounded_but_hinge_is_not():
    d_pos, d_neg, mask = torch.tensor([0.1]), torch.tensor([[5.0]]), torch.tensor([[True]])
    assert contrastive_loss(d_pos, d_neg, mask, "difference").loss.item() == pytest.approx(-4.9)
    assert contrastive_loss(d_pos, d_neg, mask, "hinge", 0.1).loss.item() == 0.0


def test_sampler_timesteps_handle_zero_and_last_timestep_per_sample():
    taus = sampler_timesteps(torch.tensor([0, 999, 10]), steps=4)
    assert taus.shape == (4, 3)
    assert taus[:, 0].tolist() == [0, 0, 0, 0]
    assert taus[:, 1].tolist() == [999, 666, 333, 0]
    assert taus[0, 2].item() == 10 and taus[-1, 2].item() == 0


def _alphas(T=1000):
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, T) ** 2
    return torch.cumprod(1 - betas, 0)


def test_one_step_sampler_is_the_x0_formula_with_guidance():
    alphas = _alphas()
    z_t = torch.randn(2, 4, 3, 3)
    t = torch.tensor([500, 0])
    text, empty = torch.ones(2, 1, 1), torch.zeros(2, 1, 1)
    cond_pred = torch.randn_like(z_t)
    uncond_pred = torch.randn_like(z_t)
    unet = lambda z, tt, emb: uncond_pred  # noqa: E731 - only the unconditional call reaches it
    z0 = estimate_clean_latents(unet, z_t, t, cond_pred, text, empty, alphas, steps=1, guidance_scale=4.5)
    eps = uncond_pred + 4.5 * (cond_pred - uncond_pred)
    a = alphas[t].view(-1, 1, 1, 1)
    assert torch.allclose(z0, (z_t - (1 - a).sqrt() * eps) / a.sqrt(), atol=1e-5)


class RecordingUNet(torch.nn.Module):
    """A linear stand-in for eps_theta that records, per call, whether it built a graph."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.tensor(0.3))
        self.calls = []

    def forward(self, z, t, emb):
        out = self.weight * z + emb.mean() * 0.1
        self.calls.append(out.requires_grad)
        return out


@pytest.mark.parametrize("t", [[0, 999], [999, 999], [0, 0], [37, 512]])
def test_gradient_reaches_the_weights_only_through_the_first_call(t):
    alphas = _alphas()
    unet = RecordingUNet()
    z_t = torch.randn(2, 4, 3, 3)
    t = torch.tensor(t)
    text, empty = torch.ones(2, 1, 1), torch.zeros(2, 1, 1)
    first = unet(z_t, t, text)  # the L_LDM prediction, with its graph
    z0 = estimate_clean_latents(unet, z_t, t, first, text, empty, alphas, steps=3, guidance_scale=4.5)
    # first call (graph) + unconditional half of step 1 + one batched call per later step, no graph
    assert unet.calls == [True, False, False, False]
    z0.sum().backward()
    assert unet.weight.grad is not None and math.isfinite(unet.weight.grad.item())
    # The same quantity with the first prediction detached carries no gradient at all:
    unet2 = RecordingUNet()
    detached = unet2(z_t, t, text).detach()
    z0b = estimate_clean_latents(unet2, z_t, t, detached, text, empty, alphas, steps=3, guidance_scale=4.5)
    assert not z0b.requires_grad


def test_gradient_is_the_derivative_with_later_sampler_calls_held_fixed():
    """The sampler's gradient w.r.t. the first prediction equals finite differences of the sampler
    in which every later UNet output is replayed unchanged: no gradient flows through them."""
    alphas = _alphas().double()
    z_t = torch.randn(1, 2, 2, 2, dtype=torch.float64)
    t = torch.tensor([300])
    text, empty = torch.ones(1, 1, 1, dtype=torch.float64), torch.zeros(1, 1, 1, dtype=torch.float64)
    recorded = []

    def recording(z, tt, emb):
        out = 0.2 * z + emb.mean()
        recorded.append(out.detach().clone())
        return out

    first = torch.randn_like(z_t, requires_grad=True)
    loss = estimate_clean_latents(recording, z_t, t, first, text, empty, alphas, 3, 2.0).pow(2).sum()
    loss.backward()
    replay = iter(list(recorded))
    h = 1e-6
    bumped = first.detach().clone()
    bumped.view(-1)[0] += h
    loss_h = estimate_clean_latents(lambda z, tt, emb: next(replay), z_t, t, bumped, text, empty, alphas, 3, 2.0)
    fd = (loss_h.pow(2).sum() - loss).item() / h
    assert first.grad.view(-1)[0].item() == pytest.approx(fd, rel=1e-4)


def test_v_prediction_converts_to_eps():
    a = torch.tensor(0.64)
    z0, eps = torch.randn(3), torch.randn(3)
    z_t = a.sqrt() * z0 + (1 - a).sqrt() * eps
    v = a.sqrt() * eps - (1 - a).sqrt() * z0
    assert torch.allclose(prediction_to_eps(v, z_t, a, "v_prediction"), eps, atol=1e-6)
