"""Negatives: the pretrained model's own samples for each training caption (its biased images).

Each image is keyed by (base model fingerprint, caption, seed, sampler settings): a file already
made under the same key is reused, so a CCUB update samples only new or changed records.
"""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image, ImageFilter, ImageOps

from scoft.ccub import TRAIN, Record
from scoft.hub import loading
from scoft.io import read_jsonl, sha256_json, write_jsonl
from scoft.sample import hash_str

INDEX = "index.jsonl"


def read_negative_index(negatives_dir: str | Path) -> list[dict]:
    """The negatives' rows, `file` relative to `negatives_dir`. A folder without an index of its own
    (data/negatives, for the joint LoRA) gives the rows of every per-culture folder in it."""
    negatives_dir = Path(negatives_dir)
    if (negatives_dir / INDEX).is_file():
        return read_jsonl(negatives_dir / INDEX)
    return [{**row, "file": f"{sub.name}/{row['file']}"}
            for sub in sorted(p for p in negatives_dir.glob("*") if (p / INDEX).is_file())
            for row in read_jsonl(sub / INDEX)]


def negative_seed(base_seed: int, record: Record, i: int) -> int:
    """Per (record, i), so adding a record never changes another record's negatives."""
    return (base_seed * 1_000_003 + hash_str(record.sha256[:8]) + i * 7919) % (2**63 - 1)


def plan_negatives(
    records: list[Record], fingerprint: str, settings: dict, per_image: int, base_seed: int
) -> list[dict]:
    rows = []
    for r in records:
        if r.split != TRAIN:
            continue
        for i in range(per_image):
            seed = negative_seed(base_seed, r, i)
            key = sha256_json({"model": fingerprint, "caption": r.caption, "seed": seed, "settings": settings})
            rows.append({"record_id": r.id, "caption": r.caption, "seed": seed, "index": i, "key": key,
                         "file": f"{key[:32]}.png", "model_fingerprint": fingerprint, "settings": settings})
    return rows


def generate(pipe, prompts: list[str], seeds: list[int], settings: dict, control_images=None):
    """Batched sampling with one generator per image, so an image does not depend on its batch.
    With `control_images` the pipe is a ControlNet pipeline conditioned on them (depth maps)."""
    import torch  # here, not at the top: a culture without records writes its empty index without torch

    device = pipe.device
    generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    extra = {} if control_images is None else {"image": control_images,
                                                "controlnet_conditioning_scale": settings.get("control_scale", 1.0)}
    with torch.no_grad():
        return pipe(
            prompt=prompts,
            generator=generators,
            num_inference_steps=settings["steps"],
            guidance_scale=settings["guidance_scale"],
            height=settings["resolution"],
            width=settings["resolution"],
            output_type="pil",
            **extra,
        ).images


def simple_depth(image: Image.Image, resolution: int) -> Image.Image:
    """An offline stand-in for a depth estimator: smoothed inverted luminance (bright = near).
    It keeps the layout of the CCUB image, which is what the control needs in tests."""
    gray = ImageOps.invert(ImageOps.grayscale(image.resize((resolution, resolution))))
    return ImageOps.autocontrast(gray.filter(ImageFilter.GaussianBlur(radius=max(1, resolution // 32)))).convert("RGB")


class DepthEstimator:
    """`simple` (offline) or a depth-estimation model id or folder through transformers
    (e.g. Intel/dpt-hybrid-midas)."""

    def __init__(self, name: str, resolution: int):
        self.name, self.resolution = name, resolution
        if name != "simple":
            from transformers import pipeline

            with loading("negatives.depth_estimator", name):
                self.model = pipeline("depth-estimation", model=name)

    def __call__(self, image: Image.Image) -> Image.Image:
        if self.name == "simple":
            return simple_depth(image, self.resolution)
        return self.model(image)["depth"].convert("RGB").resize((self.resolution, self.resolution))


def depth_guided_pipeline(pipe, controlnet: str, seed: int = 0):
    """The base model with a depth ControlNet, as the paper makes its negatives: "tiny" builds one from the
    base's UNet (seeded, offline; at any scale, so benchmarks can time it), otherwise a hub id (e.g.
    lllyasviel/sd-controlnet-depth) or a folder."""
    import torch
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    if controlnet == "tiny":
        torch.manual_seed(seed)
        # The control embedding downsamples the image as the VAE does (2x tiny, 8x SD): one stride-2
        # step between each two of SD's channel widths.
        widths = (16, 32, 96, 256)[: int(pipe.vae_scale_factor).bit_length()]
        net = ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=widths)
        # A fresh ControlNet's zero convolutions make it a no-op; a trained one's are not zero. Give the
        # tiny one small seeded weights there, so the control acts offline as it does in real runs.
        for conv in [net.controlnet_cond_embedding.conv_out, *net.controlnet_down_blocks, net.controlnet_mid_block]:
            torch.nn.init.normal_(conv.weight, std=0.05)
    else:
        with loading("negatives.controlnet", controlnet):
            net = ControlNetModel.from_pretrained(controlnet, dtype=pipe.unet.dtype)
    guided = StableDiffusionControlNetPipeline(
        vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
        controlnet=net.to(pipe.device), scheduler=pipe.scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    guided.set_progress_bar_config(disable=True)
    return guided


def depth_control(records: list[Record], ccub_dir: Path, estimate):
    """A plan row's control image for depth-guided sampling: the depth map of its CCUB record's image."""
    files = {r.id: Path(ccub_dir) / r.file for r in records}

    def control(row: dict) -> Image.Image:
        with Image.open(files[row["record_id"]]) as im:
            return estimate(im.convert("RGB"))
    return control


def sample_negatives(pipe, plan: list[dict], out_dir: str | Path, batch_size: int, settings: dict,
                     progress=print, control=None) -> dict:
    """Make the planned images that are missing in out_dir, drop the unplanned ones, write the index.

    `control`, for depth-guided negatives, maps a plan row to its control image (the depth map of
    the row's CCUB image)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    missing = [row for row in plan if not (out_dir / row["file"]).is_file()]
    for start in range(0, len(missing), batch_size):
        batch = missing[start : start + batch_size]
        controls = None if control is None else [control(r) for r in batch]
        images = generate(pipe, [r["caption"] for r in batch], [r["seed"] for r in batch], settings, controls)
        for row, image in zip(batch, images):
            tmp = out_dir / f".{row['file']}.tmp"
            image.save(tmp, format="PNG")
            os.replace(tmp, out_dir / row["file"])
        progress(f"negatives: {min(start + batch_size, len(missing))}/{len(missing)} sampled")
    planned = {row["file"] for row in plan}
    stale = [p for p in out_dir.glob("*.png") if p.name not in planned]
    for p in stale:
        p.unlink()
    write_jsonl(out_dir / INDEX, plan)
    return {"planned": len(plan), "sampled": len(missing), "reused": len(plan) - len(missing), "removed": len(stale)}


def make_negatives(params, ccub_dir, out_dir, pipe=None, progress=print, culture: str | None = None) -> dict:
    """The negatives stage: k samples of the *base* model per training record of ccub_dir (of one
    culture, when given), as params.negatives says (depth-guided by each CCUB image when configured),
    cached by key in out_dir. `pipe` (optional) is the loaded base pipeline; returns sample_negatives' counts."""
    from scoft.ccub import read_training

    n, ccub_dir = params.negatives, Path(ccub_dir)
    settings = params.sampling("negatives")
    records = read_training(ccub_dir, culture)  # the training view only: a held-out record changes nothing here
    if culture is not None and not records:
        # a configured culture without records: nothing to sample, no model to load (nor torch to import)
        return sample_negatives(None, [], out_dir, n.batch_size, settings, progress=progress)
    from scoft.models import load_pipeline, model_fingerprint, pick_device

    pipe = pipe if pipe is not None else load_pipeline(params.model).to(pick_device())
    fingerprint = model_fingerprint(pipe)  # of the base model, before any ControlNet joins it
    control = None
    if n.depth_guided:
        settings.update(depth_guided=True, controlnet=n.controlnet, depth_estimator=n.depth_estimator,
                        control_scale=n.control_scale)
        pipe = depth_guided_pipeline(pipe, n.controlnet, params.model.seed)
        control = depth_control(records, ccub_dir, DepthEstimator(n.depth_estimator, params.model.resolution))
    plan = plan_negatives(records, fingerprint, settings, n.per_image, n.seed)
    return sample_negatives(pipe, plan, out_dir, n.batch_size, settings, progress=progress, control=control)
