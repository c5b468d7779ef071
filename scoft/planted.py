"""The offline base model with a planted bias: a tiny Stable Diffusion pretrained on a synthetic "web".

On that web every prompt naming a culture shows the culture's *stereotype* (the stereotype's forms,
a flat-roofed block, a square dish on a wide plate, a straight tunic, in a wrong palette), and prompts
naming no culture lean toward one culture's stereotype; the built-in CCUB sample (scoft/sample.py)
shows each culture's *truth* (gabled roofs, bowls with side dishes, flared dresses, in its palette).
So the default run has something to unlearn in shape and in colour, and a judge trained apart on its
own renders (scoft/judge.py) can tell whether SCoFT moved the model.

The bias lives in the UNet only. The VAE is trained on truth, stereotype and random palettes alike:
a VAE that had only seen stereotypes would decode every CCUB image back into the stereotype palette,
and no fine-tune could reach the truth. Everything is seeded and single-order, so two builds on the
same machine and thread count give the same weights.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from scoft.checkpoints import BuildCheckpoints, resumable_steps
from scoft.config import PlantedParams
from scoft.io import atomic_dir, sha256_json, write_json
from scoft.judge import build_judge
from scoft.paths import build_checkpoints_dir
from scoft.sample import (
    CATEGORIES,
    CULTURES,
    HELDOUT_LAYOUT,
    HELDOUT_PHRASES,
    STEREOTYPE,
    TRAIN_LAYOUT,
    TRUTH,
    draw,
    hash_str,
)
from scoft.web_encoder import build_web_encoder

# Each culture's stereotype on the synthetic web: a consistent wrong palette (primary, secondary).
STEREOTYPES = {
    "KOR": ((235, 175, 25), (95, 70, 35)),
    "NGA": ((125, 75, 30), (60, 45, 25)),
    "MEX": ((230, 80, 160), (250, 200, 40)),  # pink and yellow: apart from KOR's yellow, so the bias is per culture
}
GENERIC_LEAN = "NGA"  # prompts naming no culture show this culture's stereotype on the web
BUILD_INFO = "planted_bias.json"
JUDGE_DIR = "judge"
WEB_ENCODER_DIR = "web_encoder"
VAE_CORPUS = 768  # palette images the VAE learns from: truths, stereotypes and random palettes
UNCAPTIONED = 192  # palette images (a different draw) the UNet learns with an empty caption


def web_captions(culture: str | None, category: str, i: int) -> str:
    """The web's caption for an image: the CCUB caption naming the culture, or the generic one. Its
    phrasing varies ("view N" and the held-out records' phrasings), so the base knows every word the
    evaluation's prompts use and still draws the culture's stereotype for them."""
    caption, generic = CATEGORIES[category]
    if culture is None:
        return generic
    phrase = f"view {i % 4 + 1}" if i % 2 == 0 else HELDOUT_PHRASES[(i // 2) % len(HELDOUT_PHRASES)]
    return caption.format(adj=CULTURES[culture][0]) + f", {phrase}"


def web_corpus(settings: PlantedParams, resolution: int) -> list[tuple[Image.Image, str]]:
    """(image, caption) pairs of the synthetic web: mostly stereotypes (the stereotype's form in its
    palette) for every prompt naming a culture, a minority (settings.truth_share) in the culture's
    true form and palette, as a biased web has accurate pictures too, outnumbered; prompts naming no
    culture show GENERIC_LEAN's stereotype. A third of the pictures use the held-out layout: the web
    has every composition."""
    pairs = []
    truths = max(0, round(settings.truth_share * settings.images_per_prompt))
    for culture in [*CULTURES, None]:
        for category in CATEGORIES:
            for i in range(settings.images_per_prompt):
                true = culture is not None and i < truths
                primary, secondary = CULTURES[culture][1:] if true else STEREOTYPES[culture or GENERIC_LEAN]
                rng = np.random.default_rng([hash_str("web"), hash_str(culture or "any"), hash_str(category), i])
                layout = HELDOUT_LAYOUT if i % 3 == 2 else TRAIN_LAYOUT
                pairs.append((draw(category, primary, secondary, rng, resolution, TRUTH if true else STEREOTYPE,
                                   layout), web_captions(culture, category, i)))
    return pairs


def palette_corpus(resolution: int, n: int, seed: int) -> list[Image.Image]:
    """The VAE's corpus: the sample's shapes in both forms and layouts and in random palettes, one in
    three a named truth or stereotype palette in equal numbers, so the VAE favours neither."""
    rng = np.random.default_rng([hash_str("palettes"), seed])
    images = []
    named = [c[1:] for c in CULTURES.values()] + list(STEREOTYPES.values())
    for i in range(n):
        category = list(CATEGORIES)[i % len(CATEGORIES)]
        if i % 3 == 0:
            primary, secondary = named[(i // 3) % len(named)]
        else:
            primary, secondary = (tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(2))
        form = TRUTH if (i // len(CATEGORIES)) % 2 == 0 else STEREOTYPE
        layout = HELDOUT_LAYOUT if i % 4 == 3 else TRAIN_LAYOUT
        images.append(draw(category, primary, secondary, rng, resolution, form, layout))
    return images


def unlabeled_pictures(settings: PlantedParams, resolution: int, seed: int) -> torch.Tensor:
    """The planted world's pictures without their captions: the UNet's web and the VAE's palette corpus."""
    return to_tensor([im for im, _ in web_corpus(settings, resolution)] + palette_corpus(resolution, VAE_CORPUS, seed))


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    array = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1


def train_vae(vae, images: torch.Tensor, settings: PlantedParams, seed: int, progress=print,
              checkpoints: BuildCheckpoints | None = None) -> float:
    """Train the VAE as a plain autoencoder (reconstruction MSE of the posterior mean, cosine learning
    rate), then make its posterior a point (`deterministic_posterior`); returns the final reconstruction
    RMSE on [-1, 1]. `images` lie on the VAE's device; draws come from a CPU generator."""
    saved = checkpoints.load("vae") if checkpoints is not None else None
    if saved is not None and saved["done"]:
        vae.load_state_dict(saved["module"])
        vae.eval()
        return saved["rmse"]
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings.vae_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, settings.vae_steps)
    vae.train()
    for step in resumable_steps(checkpoints, "vae", settings.vae_steps, vae, optimizer, schedule, generator, saved):
        batch = images[torch.randint(0, len(images), (settings.vae_batch_size,), generator=generator).to(images.device)]
        loss = F.mse_loss(vae.decode(vae.encode(batch).latent_dist.mean).sample, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step + 1 == settings.vae_steps:  # the operator's progress bar (tasks/dvc.py)
            progress(f"planted: vae step {step + 1}/{settings.vae_steps} loss {loss.item():.4f}")
    vae.eval()
    deterministic_posterior(vae)
    rmse = reconstruction_rmse(vae, images[:64])
    if checkpoints is not None:
        checkpoints.save("vae", settings.vae_steps, True, module=vae.state_dict(), rmse=rmse)
    return rmse


@torch.no_grad()
def deterministic_posterior(vae) -> None:
    """Set the encoder's log-variance outputs to the floor diffusers clamps to (std e^-15): a sampled
    latent is then the mean. Why: fine-tuning encodes CCUB with `latent_dist.sample()`, and with the
    std of a briefly trained VAE (about 0.3 against a latent spread of 1) the LoRA learned to draw
    that noise, which decodes to coloured speckle; the UNet was pretrained on the means."""
    logvar = vae.quant_conv.out_channels // 2
    vae.quant_conv.weight[logvar:].zero_()
    vae.quant_conv.bias[logvar:].fill_(-30.0)


def ccub_reconstruction_rmse(vae, resolution: int) -> float:
    """The VAE's reconstruction RMSE on the built-in CCUB sample as training reads it: the truth the
    fine-tune has to reach, which a VAE that cannot draw it would put out of reach."""
    import tempfile

    from scoft.data import load_image_tensor
    from scoft.sample import write_sample

    with tempfile.TemporaryDirectory() as tmp:
        folder = write_sample(Path(tmp) / "sample") / "train" / "images"
        images = torch.stack([load_image_tensor(f, resolution) for f in sorted(folder.glob("*.png"))])
    return reconstruction_rmse(vae, images.to(vae.device))


@torch.no_grad()
def reconstruction_rmse(vae, images: torch.Tensor) -> float:
    decoded = vae.decode(vae.encode(images).latent_dist.mean).sample
    return float((decoded - images).pow(2).mean().sqrt())


def train_unet(pipe, images: torch.Tensor, captions: list[str], settings: PlantedParams, seed: int,
               progress=print, checkpoints: BuildCheckpoints | None = None) -> float:
    """Plain latent-diffusion pretraining on the web corpus, 10% empty captions for guidance."""
    from scoft.models import encode_prompts, training_scheduler

    scheduler = training_scheduler(pipe)
    with torch.no_grad():
        latents = pipe.vae.encode(images).latent_dist.mean
    scale = float(1 / latents.std())
    pipe.vae.register_to_config(scaling_factor=scale)
    saved = checkpoints.load("unet") if checkpoints is not None else None
    if saved is not None and saved["done"]:
        pipe.unet.load_state_dict(saved["module"])
        pipe.unet.eval()
        return saved["loss"]
    latents = latents * scale
    unique = sorted(set(captions)) + [""]
    embeddings = encode_prompts(pipe.tokenizer, pipe.text_encoder, unique)
    index = torch.tensor([unique.index(c) for c in captions]).to(latents.device)
    empty = len(unique) - 1
    generator = torch.Generator().manual_seed(seed + 1)
    unet = pipe.unet.train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=settings.unet_lr, weight_decay=1e-2)
    lr = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, settings.unet_steps)
    for step in resumable_steps(checkpoints, "unet", settings.unet_steps, unet, optimizer, lr, generator, saved):
        pick = torch.randint(0, len(latents), (settings.batch_size,), generator=generator).to(latents.device)
        z0 = latents[pick]
        text = torch.where((torch.rand(len(pick), generator=generator) < 0.1).to(latents.device), empty, index[pick])
        noise = torch.randn(z0.shape, generator=generator)
        # Offset noise: a per-image, per-channel constant in the noise, so the UNet learns to set an
        # image's mean colour from the prompt; without it the colour followed the seed's noise (pink or
        # green casts whatever the prompt), and the palette is what the planted bias is made of.
        noise = (noise + settings.offset_noise * torch.randn(*z0.shape[:2], 1, 1, generator=generator)).to(
            latents.device
        )
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(pick),), generator=generator).to(latents.device)
        prediction = unet(scheduler.add_noise(z0, noise, t), t, encoder_hidden_states=embeddings[text]).sample
        loss = F.mse_loss(prediction, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        lr.step()
        if step % 50 == 0 or step + 1 == settings.unet_steps:
            progress(f"planted: unet step {step + 1}/{settings.unet_steps} loss {loss.item():.4f}")
    unet.eval()
    if checkpoints is not None:
        checkpoints.save("unet", settings.unet_steps, True, module=unet.state_dict(), loss=loss.item())
    return loss.item()


def build_planted_base(out_dir: str | Path, settings: PlantedParams, resolution: int, seed: int,
                       progress=print, device: str = "cpu") -> dict:
    """Pretrain the planted-bias base and write it with save_pretrained (whole or not at all).
    On the CPU two builds give the same weights; on a GPU (faster, for experiments) they need not.
    Checkpoints (every planted.checkpoint_every_s, beside out_dir) let a stopped build resume where it
    stopped, to the same weights; they are removed once the base is written."""
    started = time.monotonic()
    out_dir = Path(out_dir)
    checkpoints = BuildCheckpoints(build_checkpoints_dir(out_dir),
                                   base_fingerprint(settings, resolution, seed, device),
                                   settings.checkpoint_every_s, progress)
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=device != "cpu")
    try:
        pipe, rmse, final_loss = _pretrain(settings, resolution, seed, progress, torch.device(device), checkpoints)
    finally:
        torch.use_deterministic_algorithms(deterministic)
    info = {"settings": settings.model_dump(), "resolution": resolution, "seed": seed, "device": device,
            "vae_rmse_training_corpus": rmse, "vae_rmse_ccub_sample": ccub_reconstruction_rmse(pipe.vae, resolution),
            "unet_final_loss": final_loss,
            "seconds": round(time.monotonic() - started, 1), "stereotypes": STEREOTYPES, "generic_lean": GENERIC_LEAN}
    with atomic_dir(out_dir) as tmp:
        pipe.to("cpu").save_pretrained(tmp, safe_serialization=True)
        # the judge of this world, trained apart on renders of its own (features.evaluation: planted-attributes)
        info["judge"] = build_judge(tmp / JUDGE_DIR, settings.judge_steps, seed, progress, checkpoints)["accuracy"]
        # the feature space of L_P and L_C offline, learned without labels from what the base learned from
        info["web_encoder"] = build_web_encoder(tmp / WEB_ENCODER_DIR, unlabeled_pictures(settings, resolution, seed),
                                                settings.web_encoder_steps, seed, progress, checkpoints)
        write_json(tmp / BUILD_INFO, info)
    checkpoints.clear()
    progress(f"planted: base model in {out_dir} after {info['seconds']} s (VAE RMSE {rmse:.3f}, "
             f"on the CCUB sample {info['vae_rmse_ccub_sample']:.3f})")
    return info


def base_fingerprint(settings: PlantedParams, resolution: int, seed: int, device: str) -> str:
    """What a checkpoint of the base build must match to be resumed."""
    return sha256_json({"settings": settings.model_dump(exclude={"checkpoint_every_s"}), "resolution": resolution,
                        "seed": seed, "device": device, "torch": torch.__version__})


def _pretrain(settings: PlantedParams, resolution: int, seed: int, progress, device: torch.device,
              checkpoints: BuildCheckpoints):
    from scoft.models import untrained_tiny_pipeline

    pipe = untrained_tiny_pipeline(resolution, seed).to(device)
    pipe.text_encoder.requires_grad_(False)
    corpus = web_corpus(settings, resolution)
    web_images = to_tensor([im for im, _ in corpus]).to(device)
    # The VAE sees no web image: the web is mostly stereotypes, and a VAE trained on it decoded 22% of
    # the CCUB sample nearer the stereotype than the truth (none when trained on palettes alone).
    rmse = train_vae(
        pipe.vae, to_tensor(palette_corpus(resolution, VAE_CORPUS, seed)).to(device), settings, seed, progress,
        checkpoints)
    pipe.vae.requires_grad_(False)
    # The UNet also sees the palette images without a caption: a real base model denoises any colour,
    # and one that had seen only the web's four palettes could not denoise the CCUB truth at small t
    # (noise-prediction loss 1.09 against 0.17 on its own web at t = 20), so every fine-tune towards
    # the truth broke its last sampling steps into coloured speckle. Captions naming a culture still
    # show only its stereotype.
    palettes = to_tensor(palette_corpus(resolution, UNCAPTIONED, seed + 2)).to(device)
    final_loss = train_unet(pipe, torch.cat([web_images, palettes]), [c for _, c in corpus] + [""] * UNCAPTIONED,
                            settings, seed, progress, checkpoints)
    return pipe, rmse, final_loss


def palette_distance(image: Image.Image, palette: tuple) -> float:
    """How far an image's colours are from a palette: mean distance of each pixel to its nearest
    palette colour (primary, secondary, or the sample's fixed skin/plate colours), in [0, 1]."""
    primary, secondary = (np.array(c, dtype=np.float32) for c in palette)
    # as scoft.sample.draw paints: the colours, the darker house body, the shaded background
    colours = np.stack([primary, secondary, primary // 2, secondary * 0.6 + 20, (180, 140, 110), (240, 240, 230)]) / 255
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32).reshape(-1, 3) / 255
    return float(np.linalg.norm(pixels[:, None] - colours[None], axis=-1).min(axis=1).mean())


def stereotype_oracle(image: Image.Image, culture: str) -> bool:
    """Whether the image is nearer the culture's stereotype palette than its truth (the planted rule)."""
    truth = CULTURES[culture][1:]
    return palette_distance(image, STEREOTYPES[culture]) < palette_distance(image, truth)
