"""The four SCoFT losses and the short sampler that gives the pixel-space losses their image.

Notation (docs/SCOFT.md): x a CCUB image, z0 its latents, t the timestep, eps the noise,
z_t = sqrt(a_t) z0 + sqrt(1 - a_t) eps with a_t the cumulative alpha product.
Every function works per sample, so any batch size and any t in [0, T-1] are handled.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# eps_theta(z, t, text_embeddings) -> raw model output (eps or v, by the model's prediction type)
UNetFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def ldm_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L_LDM: MSE between the UNet's prediction for the cultural caption and eps (or v)."""
    return F.mse_loss(prediction.float(), target.float())


def memorization_loss(pred_caption: torch.Tensor, pred_generic: torch.Tensor) -> torch.Tensor:
    """L_M: keep the caption's prediction near the generic caption's, which gets no gradient."""
    return F.mse_loss(pred_caption.float(), pred_generic.detach().float())


@dataclass
class ContrastiveTerms:
    loss: torch.Tensor
    positive: torch.Tensor  # mean D(x_hat, x), for the logs
    negative: torch.Tensor  # mean over samples with negatives of mean_k D(x_hat, n_k)


def contrastive_loss(
    d_positive: torch.Tensor,
    d_negatives: torch.Tensor,
    negative_mask: torch.Tensor,
    form: str = "difference",
    margin: float = 0.0,
) -> ContrastiveTerms:
    """L_C from distances: D(x_hat, x) of shape [B] and D(x_hat, n_k) of shape [B, K].

    form "difference" is the reference's D(x_hat, x) - mean_k D(x_hat, n_k), unbounded below;
    "hinge" is max(0, D(x_hat, x) - mean_k D(x_hat, n_k) + margin). A sample whose mask row is all
    False has no negatives and contributes its positive term only.
    """
    mask = negative_mask.to(d_negatives.dtype)
    count = mask.sum(dim=1)
    has_negatives = count > 0
    neg_mean = (d_negatives * mask).sum(dim=1) / count.clamp(min=1)
    if form == "difference":
        per_sample = d_positive - neg_mean  # neg_mean is 0 where there are no negatives
    elif form == "hinge":
        per_sample = torch.where(has_negatives, F.relu(d_positive - neg_mean + margin), d_positive)
    else:
        raise ValueError(f"unknown contrastive form {form!r} (difference or hinge)")
    negative = neg_mean[has_negatives].mean() if has_negatives.any() else d_positive.new_zeros(())
    return ContrastiveTerms(per_sample.mean(), d_positive.detach().mean(), negative.detach())


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.view(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def prediction_to_eps(output, z_t, alpha_bar, prediction_type: str) -> torch.Tensor:
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":  # eps = sqrt(a) v + sqrt(1 - a) z_t
        return alpha_bar.sqrt() * output + (1 - alpha_bar).sqrt() * z_t
    raise ValueError(f"unsupported prediction type {prediction_type!r}")


def sampler_timesteps(t: torch.Tensor, steps: int, schedule: str = "ddim",
                      alphas_cumprod: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample, the timesteps of the short sampler from its t down to 0, without repeats.

    "ddim": up to `steps` values evenly spaced from t to 0, rounded; rounding a small t would repeat
    values (t = 5 over 20 steps: 5, 5, 4, 4, ...), and a step from a timestep to itself changes
    nothing, so repeats are dropped. "ddpm" (the reference's): t - i * floor(t / (steps - 1)) for
    i = 0..steps-1, then 0, repeats dropped likewise. "dpm-solver++" (needs alphas_cumprod): steps + 1
    points evenly spaced in log-SNR from t to 0, each the nearest timestep, repeats dropped, and the
    last (0) left out: the solver's last step goes on to timestep 0 without a call. Even in log-SNR, not
    in t: the path bends most near 0, where even spacing in t takes its longest step (on Gaussian data,
    whose exact solution is known, 4 calls spaced in log-SNR land nearer it than 20 spaced in t:
    tests/test_losses.py).
    Returns timesteps [S, B] and a mask [S, B] of the steps each sample takes (its first n_b rows);
    padded rows repeat the sample's 0.
    """
    rows = []
    log_snr = _log_snr(alphas_cumprod.double().cpu()) if schedule == "dpm-solver++" else None
    for value in t.tolist():
        if schedule == "ddim":
            fractions = torch.linspace(1, 0, steps) if steps > 1 else torch.ones(1)
            taus = (fractions * value).round().long().tolist()
        elif schedule == "ddpm":
            stride = value // (steps - 1) if steps > 1 else value
            taus = [value - i * stride for i in range(steps)] + [0]
        elif schedule == "dpm-solver++":
            points = log_snr[value] + (log_snr[0] - log_snr[value]) * torch.arange(steps + 1) / steps
            taus = [int((log_snr - p).abs().argmin()) for p in points]
            taus = [tau for tau in taus if tau > 0] or [0]
        else:
            raise ValueError(f"unknown sampler {schedule!r} (ddim, ddpm or dpm-solver++)")
        rows.append(sorted(set(taus), reverse=True))
    longest = max(len(r) for r in rows)
    timesteps = torch.tensor([r + [0] * (longest - len(r)) for r in rows], device=t.device).T
    mask = torch.tensor([[i < len(r) for i in range(longest)] for r in rows], device=t.device).T
    return timesteps, mask


def estimate_clean_latents(
    unet: UNetFn,
    z_t: torch.Tensor,
    t: torch.Tensor,
    first_prediction: torch.Tensor,
    text: torch.Tensor,
    empty_text: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    steps: int,
    guidance_scale: float,
    prediction_type: str = "epsilon",
    sampler: str = "ddim",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """z0_hat from z_t by a short sampler from t down to 0, with classifier-free guidance.

    sampler "ddim": deterministic (eta 0). "ddpm": the reference's stochastic ancestral steps, each
    from timestep s to the next r drawing z_r from q(z_r | z_s, z0_hat) with noise from `generator`.
    "dpm-solver++": DPM-Solver++(2M) (Lu et al. 2022), the second-order multistep solver of the same
    ODE as DDIM in its data-prediction form: for the same number of UNet calls, an estimate nearer the
    long sampler's (bench/x0_estimate.py).
    `first_prediction` is the UNet output for (z_t, t, text) that L_LDM already used, with its
    graph: it is the only call that carries gradient. The unconditional half of the first step runs
    under no_grad, every later call under inference_mode (no graph, no version counters either); the
    result still depends on the first prediction through the sampler's linear updates, so the pixel
    losses train the model through that one call.
    Each sample keeps its own timestep list, so mixed t in one batch, t = 0 and t = T-1 all work.
    """
    taus, active = sampler_timesteps(t, steps, sampler, alphas_cumprod)
    alphas_cumprod = alphas_cumprod.to(z_t.device)
    with torch.no_grad():
        uncond = unet(z_t.detach(), t, empty_text)
    output = uncond + guidance_scale * (first_prediction - uncond)
    z, previous = z_t, None  # previous: (x0, step size h) of the last solver step, for dpm-solver++
    for i in range(len(taus)):
        if i > 0:
            with torch.inference_mode():
                both = unet(torch.cat([z.detach()] * 2), torch.cat([taus[i]] * 2), torch.cat([empty_text, text]))
            u, c = both.clone().chunk(2)  # out of inference mode: later code may hand them to autograd to save
            output = u + guidance_scale * (c - u)
        a = _per_sample(alphas_cumprod[taus[i]], z)
        eps = prediction_to_eps(output, z, a, prediction_type)
        z0 = (z - (1 - a).sqrt() * eps) / a.sqrt()
        more = _per_sample(active[i + 1], z).bool() if i + 1 < len(taus) else torch.zeros_like(a, dtype=torch.bool)
        if sampler == "dpm-solver++":  # after a sample's last call, one more step to timestep 0, without a call
            following = _per_sample(alphas_cumprod[taus[min(i + 1, len(taus) - 1)]], z)
            a_next = torch.where(more, following, alphas_cumprod[0])
            step, previous = _dpm_solver_2m_step(z, z0, a, a_next, previous)
            ended = torch.where(a_next > a, step, z0)  # t = 0: no step left, its x0 prediction
        elif i + 1 < len(taus):
            a_next = _per_sample(alphas_cumprod[taus[i + 1]], z)
            if sampler == "ddpm":
                step = _ancestral_step(z, z0, a, a_next, generator)
            else:
                step = a_next.sqrt() * z0 + (1 - a_next).sqrt() * eps
            ended = torch.where(more, step, z0)  # z0 where this was the last step
        else:
            ended = z0
        z = torch.where(_per_sample(active[i], z).bool(), ended, z)  # samples done earlier keep their estimate
    return z


def _dpm_solver_2m_step(z, z0, a, a_next, previous):
    """One DPM-Solver++(2M) step from cumulative alpha a to a_next, in log-SNR lambda = log(alpha / sigma).

    The first step is first order (exactly DDIM's); later ones extrapolate the data prediction linearly
    in lambda from the previous step's, D = (1 + 1/(2r)) x0 - 1/(2r) x0_prev with r = h_prev / h.
    A sample whose previous step was its last (padded rows) has h_prev of its own and is not updated.
    Returns the next z and (x0, h) for the step after.
    """
    h = _log_snr(a_next) - _log_snr(a)
    sigma, sigma_next = (1 - a).sqrt(), (1 - a_next).sqrt()
    data = z0
    if previous is not None:
        x0_prev, h_prev = previous
        r = h_prev / h.clamp(min=1e-12)
        data = z0 + (z0 - x0_prev) / (2 * r.clamp(min=1e-12))
        data = torch.where(h > 0, data, z0)  # a repeated (padded) timestep: no step, no extrapolation
    step = sigma_next / sigma * z - a_next.sqrt() * torch.expm1(-h) * data
    return step, (z0, h)


def _log_snr(alpha_bar: torch.Tensor) -> torch.Tensor:
    """lambda = log(alpha / sigma) of cumulative alphas."""
    return 0.5 * (alpha_bar.log() - (1 - alpha_bar).log())


def _ancestral_step(z, z0, a, a_next, generator):
    """A draw from the DDPM posterior q(z_r | z_s, z0) between cumulative alphas a (at s) and a_next (at r)."""
    alpha = a / a_next
    beta = 1 - alpha
    mean = a_next.sqrt() * beta / (1 - a) * z0 + alpha.sqrt() * (1 - a_next) / (1 - a) * z
    variance = ((1 - a_next) / (1 - a) * beta).clamp(min=0)
    noise = torch.randn(z.shape, generator=generator, dtype=z.dtype).to(z.device)
    return mean + variance.sqrt() * noise
