"""Shared set-up of the benchmarks: the model at a scale, and a small CCUB workspace."""

from __future__ import annotations

import json
import platform
import tempfile
from pathlib import Path

import torch

from scoft.models import SD_SCHEDULE, tiny_pipeline

# Stable Diffusion v1.5's architecture (its published configs), random weights: no download.
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
)
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
                block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4)
SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                 max_position_embeddings=77, vocab_size=49408, bos_token_id=0, eos_token_id=1, pad_token_id=1)
RESOLUTION = {"tiny": 32, "sd15": 512}


def build_pipeline(scale: str, device: torch.device):
    if scale == "tiny":
        pipe = tiny_pipeline(32).to(device)
        pipe.set_progress_bar_config(disable=True)
        return pipe
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tiny = tiny_pipeline(32)  # for its offline tokenizer; the token count (77) is what costs
    torch.manual_seed(0)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**SD15_VAE),
        text_encoder=CLIPTextModel(CLIPTextConfig(**SD15_TEXT)),
        tokenizer=tiny.tokenizer,
        unet=UNet2DConditionModel(**SD15_UNET),
        scheduler=DPMSolverMultistepScheduler(**SD_SCHEDULE),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def sample_workspace(per_category: int, heldout_per_category: int = 1) -> tuple[Path, list]:
    from scoft.captions import FallbackCaptioner
    from scoft.ccub import ingest, read_manifest
    from scoft.sample import write_sample

    work = Path(tempfile.mkdtemp(prefix="scoft-bench-"))
    write_sample(work / "sample", per_category=per_category, heldout_per_category=heldout_per_category, size=64)
    ingest([str(work / "sample")], work / "ccub", heldout_fraction=0.25, max_pixels=10**8, max_rejected_fraction=0,
           captioner=FallbackCaptioner(), progress=lambda m: None)
    return work, read_manifest(work / "ccub")


def training_workspace(scale: str, device, resolution: int) -> Path:
    """A sample workspace (2 images per culture and category) with 2 negatives per training record from
    the scale's base, sampled in 4 steps: what the training benchmarks train on."""
    from scoft.models import model_fingerprint
    from scoft.negatives import plan_negatives, sample_negatives

    work, records = sample_workspace(per_category=2)
    pipe = build_pipeline(scale, device)
    settings = {"steps": 4, "guidance_scale": 4.5, "resolution": resolution}
    plan = plan_negatives(records, model_fingerprint(pipe), settings, per_image=2, base_seed=0)
    sample_negatives(pipe, plan, work / "negatives", 8, settings, progress=lambda m: None)
    return work


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def report(result: dict) -> None:
    print(json.dumps(result, indent=2))
