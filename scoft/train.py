"""SCoFT fine-tuning of LoRA adapters on the UNet: L_LDM + L_M + L_P + L_C (shared/SCOFT.md)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import StableDiffusionPipeline
from diffusers.optimization import get_scheduler
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from torch.utils.data import DataLoader

from scoft.config import Params
from scoft.data import CCUBTrainSet
from scoft.features import FeatureDistance, Perceptual
from scoft.io import atomic_dir, write_json
from scoft.losses import contrastive_loss, estimate_clean_latents, ldm_loss, memorization_loss
from scoft.models import load_pipeline, training_scheduler

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # every UNet attention projection
LORA_FILE = "pytorch_lora_weights.safetensors"


@dataclass
class Frozen:
    """The parts of the model and the loss networks that training never updates."""

    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    noise_scheduler: object
    perceptual: Perceptual | None
    distance: FeatureDistance | None

    @torch.no_grad()
    def encode_text(self, texts: list[str], device) -> torch.Tensor:
        ids = self.tokenizer(texts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(device)
        return self.text_encoder(ids)[0]


def add_lora(unet, rank: int, alpha: int) -> list[torch.nn.Parameter]:
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
    return [p for p in unet.parameters() if p.requires_grad]


def scoft_losses(unet, frozen: Frozen, batch: dict, params: Params, pixel_step: bool, device) -> dict[str, torch.Tensor]:
    """All SCoFT loss terms for one batch; 'total' is their weighted sum."""
    tp, w = params.train, params.train.loss_weights
    image = batch["image"].to(device)
    if tp.random_flip:
        flip = torch.rand(image.shape[0], device=device) < 0.5
        image = torch.where(flip[:, None, None, None], image.flip(-1), image)
    bsz = image.shape[0]
    vae = frozen.vae
    sched = frozen.noise_scheduler
    with torch.no_grad():
        z0 = vae.encode(image.to(vae.dtype)).latent_dist.sample() * vae.config.scaling_factor
    noise = torch.randn_like(z0)
    t = torch.randint(0, sched.config.num_train_timesteps, (bsz,), device=device)
    z_t = sched.add_noise(z0, noise, t)
    text = frozen.encode_text(batch["caption"], device)
    unet_fn = lambda z, tt, emb: unet(z, tt, encoder_hidden_states=emb).sample  # noqa: E731

    prediction = unet_fn(z_t, t, text)
    target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(z0, noise, t)
    out = {"ldm": ldm_loss(prediction, target)}
    total = w.ldm * out["ldm"]
    if w.memorization > 0:
        with torch.no_grad():
            generic = unet_fn(z_t, t, frozen.encode_text(batch["generic_caption"], device))
        out["memorization"] = memorization_loss(prediction, generic)
        total = total + w.memorization * out["memorization"]
    if pixel_step and (w.perceptual > 0 or w.contrastive > 0):
        empty = frozen.encode_text([""], device).expand(bsz, -1, -1)
        z0_hat = estimate_clean_latents(unet_fn, z_t, t, prediction, text, empty, sched.alphas_cumprod,
                                        tp.sampler_steps, tp.sampler_guidance, sched.config.prediction_type)
        x_hat = vae.decode(z0_hat / vae.config.scaling_factor).sample.float()
        if w.perceptual > 0:
            out["perceptual"] = frozen.perceptual(x_hat, image).mean()
            total = total + w.perceptual * out["perceptual"]
        if w.contrastive > 0:
            out.update(_contrastive(frozen.distance, x_hat, image, batch, tp, device))
            total = total + w.contrastive * out["contrastive"]
    out["total"] = total
    return out


def _contrastive(distance: FeatureDistance, x_hat, image, batch, tp, device) -> dict[str, torch.Tensor]:
    negatives, mask = batch["negatives"].to(device), batch["negative_mask"].to(device)
    e_hat = distance.embed(x_hat)
    with torch.no_grad():
        e_pos = distance.embed(image)
        if negatives.shape[1]:
            e_neg = distance.embed(negatives.flatten(0, 1)).view(*negatives.shape[:2], -1)
        else:
            e_neg = e_hat.new_zeros(e_hat.shape[0], 0, e_hat.shape[1])
    terms = contrastive_loss(distance.between(e_hat, e_pos), distance.between(e_hat[:, None], e_neg), mask,
                             tp.contrastive_form, tp.contrastive_margin)
    return {"contrastive": terms.loss, "contrastive_positive": terms.positive, "contrastive_negative": terms.negative}


def save_lora(unet, output_dir: str | Path, summary: dict) -> Path:
    """The adapter in diffusers' format: StableDiffusionPipeline.load_lora_weights(output_dir) loads it."""
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    with atomic_dir(output_dir) as tmp:
        StableDiffusionPipeline.save_lora_weights(save_directory=str(tmp), unet_lora_layers=state, safe_serialization=True)
        write_json(tmp / "training.json", summary)
    return Path(output_dir) / LORA_FILE


def train(params: Params, ccub_dir, negatives_dir, output_dir, log_dir, progress=print) -> dict:
    tp = params.train
    accelerator = Accelerator(mixed_precision=tp.mixed_precision, gradient_accumulation_steps=tp.gradient_accumulation_steps)
    set_seed(tp.seed)
    device = accelerator.device
    pipe = load_pipeline(params.model)
    weights = tp.loss_weights
    frozen = Frozen(
        vae=pipe.vae.requires_grad_(False).to(device),
        text_encoder=pipe.text_encoder.requires_grad_(False).to(device),
        tokenizer=pipe.tokenizer,
        noise_scheduler=training_scheduler(pipe),
        # Built once per run (the reference re-created its perceptual network every step).
        perceptual=Perceptual(params.features, tp.seed).to(device) if weights.perceptual > 0 else None,
        distance=FeatureDistance(params.features, params.model.seed).to(device) if weights.contrastive > 0 else None,
    )
    unet = pipe.unet
    trainable = add_lora(unet, tp.lora_rank, tp.lora_alpha)
    optimizer = torch.optim.AdamW(trainable, lr=tp.lr, weight_decay=tp.weight_decay)
    lr_scheduler = get_scheduler(tp.lr_scheduler, optimizer, num_warmup_steps=0, num_training_steps=tp.max_steps)
    dataset = CCUBTrainSet(ccub_dir, negatives_dir, params.model.resolution, params.negatives.per_image)
    loader = DataLoader(dataset, batch_size=tp.batch_size, shuffle=True, generator=torch.Generator().manual_seed(tp.seed))
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
    unet.train()

    from dvclive import Live

    started, step, micro, last = time.monotonic(), 0, 0, {}
    with Live(dir=str(log_dir), save_dvc_exp=False, dvcyaml=None) as live:
        while step < tp.max_steps:
            for batch in loader:
                pixel_step = micro % tp.pixel_loss_every == 0
                with accelerator.accumulate(unet):
                    losses = scoft_losses(unet, frozen, batch, params, pixel_step, device)
                    accelerator.backward(losses["total"])
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(trainable, tp.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad()
                micro += 1
                if not accelerator.sync_gradients:
                    continue
                step += 1
                last = {k: float(v.detach()) for k, v in losses.items()}
                for name, value in last.items():
                    live.log_metric(f"train/{name}", value)
                live.log_metric("train/lr", lr_scheduler.get_last_lr()[0])
                live.next_step()
                elapsed = time.monotonic() - started
                eta = elapsed / step * (tp.max_steps - step)
                terms = " ".join(f"{k}={v:.4f}" for k, v in last.items())
                progress(f"step {step}/{tp.max_steps} {terms} eta={eta:.0f}s")
                if step >= tp.max_steps:
                    break
    summary = {"steps": step, "micro_steps": micro, "final_losses": last,
               "seconds": round(time.monotonic() - started, 2), "train_records": len(dataset)}
    if not math.isfinite(last.get("total", float("nan"))):
        raise FloatingPointError(f"training diverged: final losses {last}")
    save_lora(accelerator.unwrap_model(unet), output_dir, summary)
    return summary
