"""SCoFT fine-tuning of LoRA adapters on the UNet: L_LDM + L_M + L_P + L_C (docs/SCOFT.md).

Resumable and reproducible: the batch and every random draw of micro-step m are functions of
(seed, m, process rank), and a checkpoint holds the adapter, optimizer, LR schedule, scaler and step;
so a run killed after a checkpoint and started again ends with the same LoRA as an uninterrupted run.
Mixed precision, gradient accumulation and several processes come from accelerate.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import StableDiffusionPipeline
from diffusers.optimization import get_scheduler
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from scoft.ccub import read_training
from scoft.config import Params
from scoft.data import CCUBTrainSet
from scoft.features import build_distance
from scoft.io import _as_created, sha256_json, write_json
from scoft.losses import contrastive_loss, estimate_clean_latents, ldm_loss, memorization_loss
from scoft.models import encode_prompts, load_pipeline, training_scheduler
from scoft.negatives import read_negative_index
from scoft.paths import CHECKPOINTS, LORA_FILE, SKIPPED_FILE

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Frozen:
    """The parts of the model and the loss networks that training never updates."""

    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    noise_scheduler: object
    perceptual: torch.nn.Module | None
    distance: torch.nn.Module | None

    def encode_text(self, texts: list[str], device) -> torch.Tensor:
        return encode_prompts(self.tokenizer, self.text_encoder, texts).to(device)


def add_lora(unet, rank: int, alpha: int, targets: list[str]) -> list[torch.nn.Parameter]:
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets))
    return [p for p in unet.parameters() if p.requires_grad]


def scoft_losses(unet, frozen: Frozen, batch: dict, params: Params, pixel_step: bool, device,
                 generator: torch.Generator, timesteps: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """All SCoFT loss terms of the configured loss set for one batch; 'total' is their weighted sum.

    Every random draw (flip, latents, t, noise) comes from `generator`, so a micro-step is reproducible.
    """
    tp, w = params.train, params.train.loss_weights
    vae, sched = frozen.vae, frozen.noise_scheduler
    image = batch["image"].to(device)
    bsz = image.shape[0]
    if tp.random_flip:
        flip = (torch.rand(bsz, generator=generator) < 0.5).to(device)
        image = torch.where(flip[:, None, None, None], image.flip(-1), image)
    with torch.no_grad():
        z0 = vae.encode(image.to(vae.dtype)).latent_dist.sample(generator=generator).float() * vae.config.scaling_factor
    noise = torch.randn(z0.shape, generator=generator).to(device)
    t = torch.randint(0, sched.config.num_train_timesteps, (bsz,), generator=generator).to(device)
    if timesteps is not None:
        t = timesteps.to(device)
    z_t = sched.add_noise(z0, noise, t)
    captions = list(batch["caption"])
    dropped = [False] * bsz
    if tp.empty_prompt_share:  # caption dropout: the unconditional prediction learns CCUB too
        dropped = (torch.rand(bsz, generator=generator) < tp.empty_prompt_share).tolist()
        captions = ["" if d else c for c, d in zip(captions, dropped)]
    # A row whose caption was dropped trains the unconditional prediction through L_LDM only: L_M on it
    # would be MSE(unconditional, generic), which is not the memorisation the loss guards against, and its
    # guided image estimate would be the unconditional one with the guidance scale (4.5) multiplying the
    # gradient through the first prediction. So L_M and the pixel losses average over captioned rows.
    keep = torch.tensor([not d for d in dropped], device=device)
    text = frozen.encode_text(captions, device)
    unet_fn = lambda z, tt, emb: unet(z, tt, encoder_hidden_states=emb).sample.float()  # noqa: E731

    prediction = unet_fn(z_t, t, text)
    target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(z0, noise, t)
    out = {"ldm": ldm_loss(prediction, target)}
    total = w.ldm * out["ldm"]
    nothing = torch.zeros((), device=device)
    if tp.uses("mem"):
        out["memorization"] = nothing
        if keep.any():
            with torch.no_grad():
                kept_generic = [g for g, k in zip(batch["generic_caption"], keep.tolist()) if k]
                generic = unet_fn(z_t[keep], t[keep], frozen.encode_text(kept_generic, device))
            out["memorization"] = memorization_loss(prediction[keep], generic)
        total = total + w.memorization * out["memorization"]
    if pixel_step and (tp.uses("perceptual") or tp.uses("contrastive")):
        total = total + _pixel_losses(unet_fn, frozen, batch, params, image[keep], z_t[keep], t[keep],
                                      prediction[keep], text[keep], keep, out, device, generator)
    out["total"] = total
    return out


def _pixel_losses(unet_fn, frozen: Frozen, batch: dict, params: Params, image, z_t, t, prediction, text, keep,
                  out: dict, device, generator) -> torch.Tensor:
    """L_P and L_C on the captioned rows (given already selected; `keep` selects the negatives), their
    terms written into `out`; their weighted sum (0 when no row kept its caption)."""
    tp, w, vae, sched = params.train, params.train.loss_weights, frozen.vae, frozen.noise_scheduler
    total = torch.zeros((), device=device)
    names = [n for n in ("perceptual", "contrastive") if tp.uses(n)]
    names += ["contrastive_positive", "contrastive_negative"] if tp.uses("contrastive") else []
    if len(image) == 0:
        out.update({n: total for n in names})
        return total
    empty = frozen.encode_text([""], device).expand(len(image), -1, -1)
    z0_hat = estimate_clean_latents(unet_fn, z_t, t, prediction, text, empty, sched.alphas_cumprod,
                                    tp.sampler_steps, tp.sampler_guidance, sched.config.prediction_type,
                                    tp.sampler, generator)
    x_hat = vae.decode((z0_hat / vae.config.scaling_factor).to(vae.dtype)).sample.float()
    if tp.uses("perceptual"):
        out["perceptual"] = frozen.perceptual(x_hat, image).mean()
        total = total + w.perceptual * out["perceptual"]
    if tp.uses("contrastive"):
        negatives, mask = batch["negatives"].to(device)[keep], batch["negative_mask"].to(device)[keep]
        d = frozen.distance
        terms = contrastive_loss(d(x_hat, image), d.pairwise(x_hat, negatives), mask,
                                 tp.contrastive_form, tp.contrastive_margin)
        out.update(contrastive=terms.loss, contrastive_positive=terms.positive, contrastive_negative=terms.negative)
        total = total + w.contrastive * out["contrastive"]
    return total


def batch_indices(micro: int, n: int, batch_size: int, rank: int, world: int, seed: int) -> list[int]:
    """The dataset indices of micro-step `micro` on process `rank`: a seeded permutation per epoch,
    cut into global batches of batch_size x world (wrapping around a small dataset)."""
    per_epoch = max(1, n // (batch_size * world))
    epoch, position = divmod(micro, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    start = position * batch_size * world + rank * batch_size
    return [order[(start + j) % n] for j in range(batch_size)]


def collate(items: list[dict]) -> dict:
    return {k: (torch.stack([i[k] for i in items]) if isinstance(items[0][k], torch.Tensor) else [i[k] for i in items])
            for k in items[0]}


def run_fingerprint(params: Params, ccub_dir, negatives_dir, max_steps: int, world: int,
                    culture: str | None = None) -> str:
    """What a checkpoint must match to be resumed: settings, data, culture and the number of processes."""
    return sha256_json({
        "model": params.model.model_dump(), "features": params.features.model_dump(),
        "train": params.train.model_dump(exclude={"checkpoint_every", "max_steps"}), "max_steps": max_steps,
        "per_image": params.negatives.per_image, "world": world, **({"culture": culture} if culture else {}),
        "training_records": sha256_json([asdict(r) for r in read_training(ccub_dir, culture)]),
        "negatives": sha256_json(read_negative_index(negatives_dir)),
    })


def checkpoint_folder(output_dir: Path, fingerprint: str) -> Path:
    """Checkpoints are kept per fingerprint: a run resumes and cleans up only its own."""
    return Path(output_dir) / CHECKPOINTS / fingerprint[:16]


def _save_checkpoint(folder: Path, state: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{state['step']:09d}.pt"
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a kill mid-write leaves the previous checkpoint as the latest
    for old in sorted(folder.glob("step-*.pt"))[:-2]:
        old.unlink()


def _read_checkpoint(path: Path) -> dict:
    """Load without unpickling code: weights_only admits tensors, numbers, strings and containers only,
    so a planted file that would run code on load is refused instead."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not {"fingerprint", "step", "micro", "lora", "optimizer"} <= set(state):
        raise ValueError("not a scoft training checkpoint")
    return state


def _latest_checkpoint(folder: Path, fingerprint: str, progress) -> dict | None:
    """The newest valid checkpoint of this run's settings; damaged or foreign files are named and skipped."""
    for stray in sorted(p for p in folder.parent.glob("*") if p.is_file()):
        progress(f"train: ignoring {stray}: not in a checkpoint folder of any settings")
    for path in sorted(folder.glob("step-*.pt"), reverse=True):
        try:
            state = _read_checkpoint(path)
        except Exception as e:  # noqa: BLE001 - any unreadable file is refused the same way
            progress(
                f"train: refusing {path}: not a valid checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
            )
            continue
        if state["fingerprint"] != fingerprint:
            progress(f"train: refusing {path}: made with other settings or data")
            continue
        return state
    if any(folder.glob("step-*.pt")):
        progress("train: no valid checkpoint of these settings: starting fresh")
    return None


def _frozen_on(module: torch.nn.Module, device, dtype: torch.dtype) -> torch.nn.Module:
    module = module.requires_grad_(False).to(device)
    return module if dtype == torch.float32 else module.to(dtype=dtype)


def save_lora(unet, output_dir: Path, summary: dict) -> Path:
    """The adapter in diffusers' format: StableDiffusionPipeline.load_lora_weights(output_dir) loads it."""
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    staging = output_dir / ".lora-staging"
    shutil.rmtree(staging, ignore_errors=True)
    StableDiffusionPipeline.save_lora_weights(
        save_directory=str(staging), unet_lora_layers=state, safe_serialization=True
    )
    write_json(staging / "training.json", summary)
    for f in staging.iterdir():
        _as_created(f, 0o666)  # safetensors creates its file 0600: the umask decides, as for every file here
        os.replace(f, output_dir / f.name)
    staging.rmdir()
    # The folder persists between runs (dvc.yaml: persist, for resuming): a marker left by an earlier run
    # that had nothing to train (a culture without records, the other layout) would hide this LoRA.
    (output_dir / SKIPPED_FILE).unlink(missing_ok=True)
    return output_dir / LORA_FILE


@dataclass
class Run:
    """What the training loop carries: the adapter and its optimizer, where the run stands, where its
    checkpoints go. resume, optimizer_step and checkpoint are its three parts."""

    accelerator: Accelerator
    unet: torch.nn.Module
    trainable: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    fingerprint: str
    checkpoints: Path
    step: int = 0
    micro: int = 0

    def resume(self, say) -> dict | None:
        """Load the newest valid checkpoint of this run's settings, if any; returns it."""
        state = _latest_checkpoint(self.checkpoints, self.fingerprint, say)
        if state:
            set_peft_model_state_dict(self.accelerator.unwrap_model(self.unet), state["lora"])
            self.optimizer.optimizer.load_state_dict(state["optimizer"])
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
            if self.accelerator.scaler is not None and state.get("scaler"):
                self.accelerator.scaler.load_state_dict(state["scaler"])
            self.step, self.micro = state["step"], state["micro"]
        return state

    def optimizer_step(self, frozen: Frozen, dataset, params: Params) -> dict[str, float]:
        """Micro-steps until the next optimizer step; returns each term's mean over the micro-steps
        that computed it (pixel losses come every pixel_loss_every micro-steps, which with gradient
        accumulation need not be the last one of the step) and the total over all of them."""
        tp, acc = params.train, self.accelerator
        computed: dict[str, list[float]] = {}
        while True:
            indices = batch_indices(self.micro, len(dataset), tp.batch_size, acc.process_index, acc.num_processes,
                                    tp.seed)
            batch = collate([dataset[i] for i in indices])
            generator = torch.Generator().manual_seed(tp.seed * 1_000_003 + self.micro * 101 + acc.process_index)
            with acc.accumulate(self.unet), acc.autocast():
                losses = scoft_losses(self.unet, frozen, batch, params, self.micro % tp.pixel_loss_every == 0,
                                      acc.device, generator)
                acc.backward(losses["total"])
                if acc.sync_gradients:
                    acc.clip_grad_norm_(self.trainable, tp.max_grad_norm)
                    self.optimizer.step()
                    self.lr_scheduler.step()
                    self.optimizer.zero_grad()
            self.micro += 1
            for name, value in losses.items():
                computed.setdefault(name, []).append(float(acc.reduce(value.detach(), "mean")))  # over processes
            if acc.sync_gradients:
                self.step += 1
                return {name: sum(values) / len(values) for name, values in computed.items()}

    def checkpoint(self, say) -> None:
        """Everything a resumed run needs to continue bit-identically, written by the main process."""
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            _save_checkpoint(self.checkpoints, {
                "fingerprint": self.fingerprint, "step": self.step, "micro": self.micro,
                "lora": get_peft_model_state_dict(self.accelerator.unwrap_model(self.unet)),
                "optimizer": self.optimizer.optimizer.state_dict(), "lr_scheduler": self.lr_scheduler.state_dict(),
                "scaler": self.accelerator.scaler.state_dict() if self.accelerator.scaler is not None else None})
            say(f"train: checkpoint at step {self.step} in {self.checkpoints}")


def feature_dtype(dtype: torch.dtype) -> torch.dtype:
    """The loss networks' precision under the training's: bf16 halves their memory and runs them at the
    GPU's bf16 rate; under fp16 they stay in float32, since LPIPS normalises each feature vector by its
    norm + 1e-10, which underflows to 0 in fp16 and turns an all-zero (ReLU) vector into NaN."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def _dtypes(*modules) -> list[str]:
    """The parameter dtypes of the modules that are there, as training.json records them."""
    return sorted({str(p.dtype).removeprefix("torch.") for m in modules if m is not None for p in m.parameters()})


def _frozen_parts(pipe, params: Params, device, dtype: torch.dtype) -> Frozen:
    tp, f = params.train, params.features
    features = feature_dtype(dtype)
    return Frozen(
        vae=_frozen_on(pipe.vae, device, dtype),
        text_encoder=_frozen_on(pipe.text_encoder, device, dtype),
        tokenizer=pipe.tokenizer,
        noise_scheduler=training_scheduler(pipe),
        # Built once per run (the reference re-created its perceptual network every step).
        perceptual=_frozen_on(build_distance(f.perceptual, f, tp.seed), device, features)
        if tp.uses("perceptual") else None,
        distance=_frozen_on(build_distance(f.contrastive, f, params.model.seed), device, features)
        if tp.uses("contrastive") else None,
    )


def train(params: Params, ccub_dir, negatives_dir, output_dir, log_dir, progress=print, max_steps: int | None = None,
          checkpoint_every: int | None = None, pipe=None, culture: str | None = None) -> dict:
    """Train and save the LoRA, on one culture's records when `culture` is given (else all).
    `pipe` (optional) is an already loaded base pipeline; it is modified.
    `log_dir` None: no dvclive metrics log (benchmarks and sweeps that time or repeat the loop)."""
    tp = params.train
    max_steps = max_steps or tp.max_steps
    every = tp.checkpoint_every if checkpoint_every is None else checkpoint_every
    output_dir = Path(output_dir)
    accelerator = Accelerator(mixed_precision=tp.mixed_precision,
                              gradient_accumulation_steps=tp.gradient_accumulation_steps)
    say = progress if accelerator.is_main_process else (lambda m: None)

    pipe = pipe if pipe is not None else load_pipeline(params.model)
    frozen = _frozen_parts(pipe, params, accelerator.device, DTYPES.get(accelerator.mixed_precision, torch.float32))
    unet = pipe.unet
    trainable = add_lora(unet, tp.lora_rank, tp.lora_alpha, tp.lora_targets)
    if tp.gradient_checkpointing:  # the pixel step's VAE decode has gradient too: its activations are recomputed
        unet.enable_gradient_checkpointing()
        frozen.vae.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(trainable, lr=tp.lr, weight_decay=tp.weight_decay)
    lr_scheduler = get_scheduler(tp.lr_scheduler, optimizer, num_warmup_steps=0, num_training_steps=max_steps)
    dataset = CCUBTrainSet(ccub_dir, negatives_dir, params.model.resolution, params.negatives.per_image, culture)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    unet.train()
    fingerprint = run_fingerprint(params, ccub_dir, negatives_dir, max_steps, accelerator.num_processes, culture)
    run = Run(accelerator, unet, trainable, optimizer, lr_scheduler, fingerprint,
              checkpoint_folder(output_dir, fingerprint))
    resumed = run.resume(say)
    if resumed:
        say(f"train: resumed from step {run.step}/{max_steps} ({run.checkpoints / f'step-{run.step:09d}.pt'})")

    live = None
    if accelerator.is_main_process and log_dir is not None:
        from dvclive import Live

        live = Live(dir=str(log_dir), resume=resumed is not None, save_dvc_exp=False, dvcyaml=None)
        live.step = run.step
    started, start_step, last = time.monotonic(), run.step, {}
    while run.step < max_steps:
        last = run.optimizer_step(frozen, dataset, params)
        if live is not None:
            for name, value in last.items():
                live.log_metric(f"train/{name}", value)
            live.log_metric("train/lr", lr_scheduler.get_last_lr()[0])
            live.next_step()
        eta = (time.monotonic() - started) / (run.step - start_step) * (max_steps - run.step)
        say(f"step {run.step}/{max_steps} " + " ".join(f"{k}={v:.4f}" for k, v in last.items()) + f" eta={eta:.0f}s")
        if every and run.step % every == 0 and run.step < max_steps:
            run.checkpoint(say)
    if live is not None:
        live.end()
    if not math.isfinite(last.get("total", 0.0)):
        raise FloatingPointError(f"training diverged: final losses {last}")
    summary = {"steps": run.step, "micro_steps": run.micro, "final_losses": last,
               "resumed_from": resumed["step"] if resumed else None, "seconds": round(time.monotonic() - started, 2),
               "train_records": len(dataset), "processes": accelerator.num_processes, "culture": culture,
               "precision": {"mixed": tp.mixed_precision, "loss_networks": _dtypes(frozen.perceptual, frozen.distance)}}
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_lora(accelerator.unwrap_model(unet), output_dir, summary)
        shutil.rmtree(run.checkpoints, ignore_errors=True)  # done: only the LoRA is versioned
        with contextlib.suppress(OSError):
            run.checkpoints.parent.rmdir()  # kept while other settings' checkpoints remain
    accelerator.end_training()
    return summary
