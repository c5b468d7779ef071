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
    taus, active = sampler_timesteps(torch.tensor([0, 999, 10]), steps=4)
    assert taus.shape == (4, 3) and active.shape == (4, 3)
    assert taus[:, 0].tolist() == [0, 0, 0, 0] and active[:, 0].tolist() == [True, False, False, False]
    assert taus[:, 1].tolist() == [999, 666, 333, 0] and active[:, 1].all()
    assert taus[:, 2].tolist() == [10, 7, 3, 0]


def test_sampler_timesteps_drop_repeats_for_small_t():
    taus, active = sampler_timesteps(torch.tensor([5, 999]), steps=20)
    assert taus[active[:, 0], 0].tolist() == [5, 4, 3, 2, 1, 0]  # was 5, 5, 4, 4, ...: steps that do nothing
    assert len(set(taus[:, 1].tolist())) == 20


def test_reference_ddpm_timesteps():
    taus, active = sampler_timesteps(torch.tensor([999, 500]), steps=20, schedule="ddpm")
    assert taus[:, 0].tolist()[:3] == [999, 947, 895] and taus[active[:, 0], 0].tolist()[-2:] == [11, 0]
    assert taus[active[:, 1], 1].tolist()[-3:] == [32, 6, 0]  # 500 - 19 * 26 = 6, then 0


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


@pytest.mark.parametrize("t,steps", [([0, 999], 3), ([999, 999], 3), ([0, 0], 1), ([37, 512], 3)])
def test_gradient_reaches_the_weights_only_through_the_first_call(t, steps):
    alphas = _alphas()
    unet = RecordingUNet()
    z_t = torch.randn(2, 4, 3, 3)
    t = torch.tensor(t)
    text, empty = torch.ones(2, 1, 1), torch.zeros(2, 1, 1)
    first = unet(z_t, t, text)  # the L_LDM prediction, with its graph
    z0 = estimate_clean_latents(unet, z_t, t, first, text, empty, alphas, steps=3, guidance_scale=4.5)
    # first call (graph) + unconditional half of step 1 + one batched call per later step, no graph;
    # t = 0 everywhere is one step only
    assert unet.calls == [True, False] + [False] * (steps - 1)
    z0.sum().backward()
    assert unet.weight.grad is not None and math.isfinite(unet.weight.grad.item())
    # The same quantity with the first prediction detached carries no gradient at all:
    unet2 = RecordingUNet()
    detached = unet2(z_t, t, text).detach()
    z0b = estimate_clean_latents(unet2, z_t, t, detached, text, empty, alphas, steps=3, guidance_scale=4.5)
    assert not z0b.requires_grad


@pytest.mark.parametrize("sampler", ["ddim", "dpm-solver++"])
def test_gradient_is_the_derivative_with_later_sampler_calls_held_fixed(sampler):
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
    loss = estimate_clean_latents(recording, z_t, t, first, text, empty, alphas, 3, 2.0, sampler=sampler).pow(2).sum()
    loss.backward()
    replay = iter(list(recorded))
    h = 1e-6
    bumped = first.detach().clone()
    bumped.view(-1)[0] += h
    loss_h = estimate_clean_latents(lambda z, tt, emb: next(replay), z_t, t, bumped, text, empty, alphas, 3, 2.0,
                                    sampler=sampler)
    fd = (loss_h.pow(2).sum() - loss).item() / h
    assert first.grad.view(-1)[0].item() == pytest.approx(fd, rel=1e-4)


def test_v_prediction_converts_to_eps():
    a = torch.tensor(0.64)
    z0, eps = torch.randn(3), torch.randn(3)
    z_t = a.sqrt() * z0 + (1 - a).sqrt() * eps
    v = a.sqrt() * eps - (1 - a).sqrt() * z0
    assert torch.allclose(prediction_to_eps(v, z_t, a, "v_prediction"), eps, atol=1e-6)


def _linear_unet(z, tt, emb):
    """0.5 z for the empty prompt, 0.5 z + 1 for the caption: cond and uncond told apart."""
    return 0.5 * z + emb.view(-1, *([1] * (z.dim() - 1)))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_three_step_guided_sampler_value_by_hand(prediction_type):
    alphas = _alphas().double()
    z_t = torch.tensor([[[[0.8]]]], dtype=torch.float64)
    t, g = torch.tensor([600]), 3.0
    text, empty = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    first = torch.tensor([[[[0.2]]]], dtype=torch.float64)  # the caption's prediction at (z_t, 600)
    got = estimate_clean_latents(_linear_unet, z_t, t, first, text, empty, alphas, 3, g, prediction_type)

    def to_eps(out, z, a):
        return out if prediction_type == "epsilon" else math.sqrt(a) * out + math.sqrt(1 - a) * z

    a600, a300, a0 = (alphas[k].item() for k in (600, 300, 0))
    z = 0.8
    out = 0.5 * z + g * (0.2 - 0.5 * z)  # guidance: uncond + g (cond - uncond)
    eps = to_eps(out, z, a600)
    x0 = (z - math.sqrt(1 - a600) * eps) / math.sqrt(a600)
    z = math.sqrt(a300) * x0 + math.sqrt(1 - a300) * eps  # to t = 300, same eps (DDIM, eta 0)
    eps = to_eps(0.5 * z + g * 1.0, z, a300)  # later steps: cond 0.5 z + 1, uncond 0.5 z
    x0 = (z - math.sqrt(1 - a300) * eps) / math.sqrt(a300)
    z = math.sqrt(a0) * x0 + math.sqrt(1 - a0) * eps
    eps = to_eps(0.5 * z + g * 1.0, z, a0)
    x0 = (z - math.sqrt(1 - a0) * eps) / math.sqrt(a0)
    assert got.item() == pytest.approx(x0, rel=1e-9)


@pytest.mark.parametrize("sampler", ["ddim", "dpm-solver++"])
@pytest.mark.parametrize("t", [0, 5])
def test_small_t_still_gives_the_pixel_losses_a_gradient(sampler, t):
    alphas = _alphas()
    z_t = torch.randn(1, 2, 2, 2)
    first = torch.randn_like(z_t, requires_grad=True)
    text, empty = torch.ones(1), torch.zeros(1)
    z0 = estimate_clean_latents(_linear_unet, z_t, torch.tensor([t]), first, text, empty, alphas, 20, 4.5,
                                sampler=sampler)
    z0.sum().backward()
    assert first.grad.abs().sum() > 0.01  # with repeated timesteps the first step cancelled out: exactly 0


def test_ddpm_sampler_is_reproducible_with_a_generator_and_stochastic_without_one():
    alphas = _alphas()
    z_t, first = torch.randn(2, 2, 2, 2), torch.randn(2, 2, 2, 2)
    text, empty = torch.ones(2), torch.zeros(2)
    run = lambda seed: estimate_clean_latents(_linear_unet, z_t, torch.tensor([999, 40]), first, text, empty,  # noqa: E731
                                              alphas, 20, 4.5, sampler="ddpm",
                                              generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(1), run(1)) and not torch.allclose(run(1), run(2))
    ddim = estimate_clean_latents(_linear_unet, z_t, torch.tensor([999, 40]), first, text, empty, alphas, 20, 4.5)
    assert not torch.allclose(run(1), ddim)


@pytest.mark.parametrize("sampler", ["ddim", "dpm-solver++"])
def test_mixed_timesteps_in_a_batch_match_each_sample_alone(sampler):
    alphas = _alphas()
    z_t, first = torch.randn(2, 2, 2, 2), torch.randn(2, 2, 2, 2)
    text, empty = torch.ones(2), torch.zeros(2)
    both = estimate_clean_latents(_linear_unet, z_t, torch.tensor([5, 900]), first, text, empty, alphas, 20, 4.5,
                                  sampler=sampler)
    for i, t in enumerate([5, 900]):
        alone = estimate_clean_latents(_linear_unet, z_t[i:i + 1], torch.tensor([t]), first[i:i + 1], text[:1],
                                       empty[:1], alphas, 20, 4.5, sampler=sampler)
        assert torch.allclose(both[i:i + 1], alone, atol=1e-5)


def test_dpm_solver_timesteps_are_even_in_log_snr_and_stop_short_of_zero():
    alphas = _alphas()
    taus, active = sampler_timesteps(torch.tensor([999, 0]), steps=4, schedule="dpm-solver++", alphas_cumprod=alphas)
    calls = taus[:, 0].tolist()
    assert calls[0] == 999 and len(calls) == 4 and calls == sorted(set(calls), reverse=True) and calls[-1] > 0
    log_snr = 0.5 * (alphas.log() - (1 - alphas).log())
    gaps = (log_snr[taus[1:, 0]] - log_snr[taus[:-1, 0]]).tolist()
    assert max(gaps) - min(gaps) < 0.05 * max(gaps)  # the calls are evenly spaced in log-SNR, not in t
    assert active[:, 1].tolist() == [True, False, False, False]  # t = 0: its own prediction only


def _gaussian_problem(n=6, mu=0.3, s=0.4, seed=0):
    """Data x0 ~ N(mu, s^2) per value, where the ideal eps-prediction and the probability-flow ODE's
    exact solution are known in closed form: the map from z_t to z_0 keeps each value's quantile."""
    alphas = _alphas().double()
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(999, 50, n).long()
    a = alphas[t].view(-1, 1, 1, 1)
    x0 = mu + s * torch.randn(n, 1, 4, 4, generator=g, dtype=torch.float64)
    z_t = a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(x0.shape, generator=g, dtype=torch.float64)

    def ideal_unet(z, tt, emb):
        a_t = alphas[tt].view(-1, 1, 1, 1)
        return (1 - a_t).sqrt() * (z - a_t.sqrt() * mu) / (a_t * s**2 + 1 - a_t)

    a0 = alphas[0]
    exact = a0.sqrt() * mu + (a0 * s**2 + 1 - a0).sqrt() * (z_t - a.sqrt() * mu) / (a * s**2 + 1 - a).sqrt()
    return alphas, t, z_t, ideal_unet, exact


def test_dpm_solver_with_4_calls_lands_nearer_the_exact_solution_than_ddim_with_20():
    alphas, t, z_t, unet, exact = _gaussian_problem()
    first, text = unet(z_t, t, None), torch.zeros(len(t), 1, 1, 1, dtype=torch.float64)

    def error(sampler, steps):
        estimate = estimate_clean_latents(unet, z_t, t, first, text, text, alphas, steps, 1.0, sampler=sampler)
        return (estimate - exact).abs().max().item()

    dpm = {steps: error("dpm-solver++", steps) for steps in (2, 4, 8, 20)}
    assert dpm[20] < dpm[8] < dpm[4] < dpm[2]  # it converges to the exact solution
    assert dpm[20] < 0.01
    assert dpm[4] < 0.5 * error("ddim", 20) and dpm[4] < 0.2 * error("ddim", 4)


def test_the_ddpm_step_draws_from_the_true_posterior():
    """q(z_r | z_s, z0) by Gaussian conditioning, derived apart from the code: z_r = sqrt(a_r) z0 + sqrt(1 -
    a_r) e1 and z_s = sqrt(a_s / a_r) z_r + sqrt(1 - a_s / a_r) e2 give the mean and the variance
    (1 - a_r) - a_s / a_r (1 - a_r)^2 / (1 - a_s); the step's draws must match both (a variance of beta,
    the DDPM 'fixed_large' choice, is 1.5 times wider here)."""
    from scoft.losses import _ancestral_step

    a_s, a_r = torch.tensor(0.3), torch.tensor(0.6)
    z, z0 = torch.full((200_000,), 0.8), torch.full((200_000,), -0.5)
    draws = _ancestral_step(z, z0, a_s, a_r, torch.Generator().manual_seed(0))
    cov = (a_s / a_r).sqrt() * (1 - a_r)  # Cov(z_r, z_s | z0)
    mean = a_r.sqrt() * z0[0] + cov / (1 - a_s) * (z[0] - a_s.sqrt() * z0[0])
    variance = (1 - a_r) - cov**2 / (1 - a_s)
    assert float(draws.mean()) == pytest.approx(float(mean), abs=0.005)
    assert float(draws.var()) == pytest.approx(float(variance), rel=0.02)
