"""The base text-to-image model: the offline tiny profile, a hub id or a local folder, one loader.

`load_pipeline` returns a diffusers StableDiffusionPipeline in every case, so negatives, training,
evaluation and `scoft generate` share one code path whatever the weights are.
"""

from __future__ import annotations

import functools
import hashlib
import json
import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.utils import logging as diffusers_logging
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from scoft.config import ModelParams
from scoft.hub import ModelUnavailable, loading
from scoft.paths import BASE_DIR

TINY = "tiny"  # the planted-bias base, built by the `base` stage (scoft/planted.py) into BASE_DIR
TINY_RANDOM = "tiny-random"  # the same architecture, seeded random weights


# Small configs of the Stable Diffusion v1 architecture: the same module types, a few channels.
TINY_UNET = dict(
    block_out_channels=(32, 64),
    layers_per_block=1,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32,
    # Two heads (16 and 32 channels each), not SD v1's eight: eight heads of 4 channels made CPU attention
    # half of a training step, and two cut the planted base's UNet step from 0.43 s to 0.27 s (BENCHMARKS.md).
    attention_head_dim=2,
    norm_num_groups=16,
)
TINY_PLANTED_UNET = dict(
    TINY_UNET,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
TINY_VAE = dict(
    block_out_channels=(16, 32),
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    latent_channels=4,
    norm_num_groups=16,
)
TINY_TEXT = dict(
    hidden_size=32,
    intermediate_size=37,
    num_attention_heads=4,
    num_hidden_layers=2,
    vocab_size=1024,  # bytes, byte+</w>, and the word tokens of TINY_WORDS
    max_position_embeddings=77,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=1,
)


def _caption_words() -> list[str]:
    """The lower-cased words of the built-in sample's captions and generic captions."""
    import re

    from scoft.sample import CATEGORIES, CULTURES

    texts = [c.format(adj=adj) for pair in CATEGORIES.values() for c in pair for adj, *_ in CULTURES.values()] + [
        "view"
    ]
    return sorted({w for t in texts for w in re.findall(r"[a-z]+", t.lower()) if len(w) > 1})


TINY_WORDS = _caption_words()
# Stable Diffusion v1's noise schedule.
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                   steps_offset=1)


def _word_merges(words: list[str]) -> list[str]:
    """BPE merges ("k o", ...) learned on `words` until each word is one token: the most frequent
    adjacent pair first, ties broken by the pair's text. Learned rather than chained by hand, so greedy
    BPE applies them consistently; written here because the tokenizers trainer breaks ties in hash
    order, and the planted base must come out the same on every build."""
    corpus = [[*w[:-1], w[-1] + "</w>"] for w in words]
    merges = []
    while any(len(w) > 1 for w in corpus):
        counts: dict[tuple[str, str], int] = {}
        for w in corpus:
            for pair in zip(w, w[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(" ".join(best))
        for i, w in enumerate(corpus):
            merged, j = [], 0
            while j < len(w):
                if j + 1 < len(w) and (w[j], w[j + 1]) == best:
                    merged.append(w[j] + w[j + 1])
                    j += 2
                else:
                    merged.append(w[j])
                    j += 1
            corpus[i] = merged
    return merges


@functools.cache
def _tiny_tokenizer_dir() -> str:
    """A CLIP BPE vocabulary of bytes plus one token per word of the sample's captions (as a real CLIP
    vocabulary has whole-word tokens for common words), so "Korean" and "Mexican" are one distinct token
    each rather than a run of letters that shifts every later position. Other words fall back to
    byte tokens. No download."""
    # GPT-2/CLIP byte-to-unicode table: printable bytes map to themselves, the rest above 255.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    chars = [chr(b) if b in printable else chr(next(extra)) for b in range(256)]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(c, len(vocab))
    merges = _word_merges(TINY_WORDS)
    for merge in merges:
        vocab.setdefault(merge.replace(" ", ""), len(vocab))
    folder = Path(tempfile.mkdtemp(prefix="scoft-tiny-tokenizer-"))
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{m}\n" for m in merges), encoding="utf-8")
    return str(folder)


def untrained_tiny_pipeline(resolution: int, seed: int = 0) -> StableDiffusionPipeline:
    """The SD v1 architecture at toy size, weights from a fixed seed: what the planted-bias base
    (scoft/planted.py) starts from, with cross-attention at every level so a prompt can steer it."""
    return tiny_pipeline(resolution, seed, TINY_PLANTED_UNET)


def tiny_pipeline(resolution: int, seed: int = 0, unet_config: dict = TINY_UNET) -> StableDiffusionPipeline:
    """Build the tiny profile: the SD v1 architecture at toy size, weights from a fixed seed."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=resolution // 2, **unet_config)
    vae = AutoencoderKL(sample_size=resolution, **TINY_VAE)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_TEXT))
    tokenizer = CLIPTokenizer.from_pretrained(_tiny_tokenizer_dir(), model_max_length=77)
    scheduler = DPMSolverMultistepScheduler(**SD_SCHEDULE)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def load_pipeline(params: ModelParams, dtype: torch.dtype = torch.float32) -> StableDiffusionPipeline:
    """The base model named by params: "tiny" (the planted-bias base in models/base), "tiny-random",
    a local save_pretrained folder, or a hub id."""
    if params.base == TINY_RANDOM:
        pipe = tiny_pipeline(params.resolution, params.seed)
        if dtype != torch.float32:
            pipe = pipe.to(dtype=dtype)
    else:
        location = params.base
        if params.base == TINY:
            if not (BASE_DIR / "model_index.json").is_file():
                raise ModelUnavailable(f"model.base: 'tiny' is the planted-bias base that the `base` stage builds into "
                                       f"{BASE_DIR}: run `dvc repro base` (or `scoft base`) first")
            location = str(BASE_DIR)
        # The planted base, a local folder and a hub id take the same call; a hub id downloads on first use.
        with loading("model.base", params.base):
            pipe = StableDiffusionPipeline.from_pretrained(
                location,
                revision=params.revision,
                dtype=dtype,
                safety_checker=None,
                requires_safety_checker=False,
            )
        # Sampling uses DPM-Solver, as the reference's inference does.
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    diffusers_logging.set_verbosity_error()  # e.g. "no LoRA keys for the text encoder": expected here
    return pipe


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, texts: list[str]) -> torch.Tensor:
    """Text embeddings as the pipeline conditions on them: padded to the tokenizer's length, truncated."""
    ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids.to(text_encoder.device))[0]


def training_scheduler(pipe: StableDiffusionPipeline) -> DDPMScheduler:
    return DDPMScheduler.from_config(pipe.scheduler.config)


def model_fingerprint(pipe: StableDiffusionPipeline) -> str:
    """sha256 over the weights of UNet, VAE and text encoder and the scheduler config.

    It names the base model by content, so cached negatives are reused exactly when the model is
    the same, whichever way it was loaded.
    """
    h = hashlib.sha256()
    for name in ("unet", "vae", "text_encoder"):
        for key, tensor in getattr(pipe, name).state_dict().items():
            h.update(f"{name}.{key}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    schedule = {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}  # no file metadata
    h.update(json.dumps(schedule, sort_keys=True, default=str).encode())
    return h.hexdigest()


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
