"""The default pipeline on the planted-bias base, with params.yaml's own settings (`scoft base`, then
`scoft sample|ingest|negatives|train` as dvc.yaml runs them, one LoRA per culture; tests/conftest.py
runs them beside the rest of the suite): the base's VAE can draw the community's truth, the base
itself draws the stereotype, and the default SCoFT fine-tune moves each culture's images from the
stereotype towards the truth. Without these, the evaluation could not tell whether SCoFT moved
anything. (BENCHMARKS.md has the same measured over 3 training seeds and every loss set.)"""

import json

import numpy as np
import torch
from PIL import Image

from scoft.ccub import HELDOUT, read_manifest
from scoft.config import ModelParams, load_params
from scoft.data import image_transform, load_image_tensor
from scoft.judge import load_judge, stereotype_form_share
from scoft.planted import BUILD_INFO, JUDGE_DIR, STEREOTYPES, palette_distance, stereotype_oracle
from scoft.sample import CATEGORIES, CULTURES, HELDOUT_LAYOUT, HELDOUT_PHRASES, STEREOTYPE, TRUTH, draw
from tests.conftest import PLANTED_CULTURES

VAE_RMSE_BOUND = 0.16  # on [-1, 1], the CCUB sample at 32 px (measured in BENCHMARKS.md)
# Per culture, about half the smallest drop that the default +MPC LoRAs of 3 training seeds measured with
# this test's own procedure on 2026-12-01 (BENCHMARKS.md, third session): KOR stereotype share 1.00 ->
# 0.00-0.03 and distance to its truth palette 0.256 -> 0.180-0.200; NGA 1.00 -> 0.00-0.13 and 0.291 ->
# 0.192-0.214. (MEX is not asserted: its truth shares NGA's green and the stereotype oracle is a weak
# judge there, BENCHMARKS.md.) The default's 2-step DPM-Solver++ estimate (fifth session, 2 seeds, the
# bench's procedure) moved them as far: stereotype share drops 0.83 and 0.77, truth distance 0.082, 0.064.
DISTANCE_DROP = {"KOR": 0.025, "NGA": 0.035}
SHARE_DROP = {"KOR": 0.5, "NGA": 0.4}


def _as_image(t: torch.Tensor) -> Image.Image:
    return Image.fromarray(((t.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())


def _base_pipe(ws):
    from scoft.models import load_pipeline

    params = load_params(ws / "params.yaml")
    return load_pipeline(ModelParams(base=str(ws / "models/base"), resolution=params.model.resolution)), params


def test_the_vae_reconstructs_the_ccub_truth(planted_run):
    from diffusers import AutoencoderKL

    info = json.loads((planted_run / "models/base" / BUILD_INFO).read_text())
    assert info["vae_rmse_ccub_sample"] <= VAE_RMSE_BOUND
    resolution = load_params(planted_run / "params.yaml").model.resolution
    vae = AutoencoderKL.from_pretrained(planted_run / "models/base/vae")
    files = sorted((planted_run / "data/sample/train/images").glob("*.png"))
    images = torch.stack([load_image_tensor(f, resolution) for f in files])
    with torch.no_grad():
        decoded = vae.decode(vae.encode(images).latent_dist.sample()).sample  # a point posterior: sample = mean
    cultures = [f.name[:3].upper() for f in files]
    assert not any(stereotype_oracle(_as_image(d), c) for d, c in zip(decoded, cultures))  # the truth is in reach


def _forms(judge, images: list[Image.Image]) -> float:
    """The judge's share of images in the stereotype's form."""
    return float(stereotype_form_share(judge, torch.stack([image_transform(32)(im) for im in images])).mean())


def test_the_judge_was_validated_and_sees_shape_whatever_the_colours(planted_run):
    """The judge, trained on renders of its own, was checked on renders it never saw; and a palette swap
    alone (each form redrawn in the other's colours, in the held-out layout) does not change its verdict:
    a palette shift cannot pass for a cultural gain."""
    info = json.loads((planted_run / "models/base" / BUILD_INFO).read_text())
    assert info["judge"]["validation"]["form"] >= 0.95 and info["judge"]["validation"]["category"] >= 0.95
    judge = load_judge(planted_run / "models/base" / JUDGE_DIR)
    rng = np.random.default_rng(5)
    truth_in_stereotype_colours = [draw(cat, *STEREOTYPES[c], rng, 32, TRUTH, HELDOUT_LAYOUT)
                                   for c in CULTURES for cat in CATEGORIES for _ in range(3)]
    stereotype_in_truth_colours = [draw(cat, *CULTURES[c][1:], rng, 32, STEREOTYPE, HELDOUT_LAYOUT)
                                   for c in CULTURES for cat in CATEGORIES for _ in range(3)]
    assert _forms(judge, truth_in_stereotype_colours) <= 0.1
    assert _forms(judge, stereotype_in_truth_colours) >= 0.9


def test_the_base_draws_each_cultures_stereotype(planted_run):
    """In the stereotype's palette and in its form, for the training captions' phrasing and the
    held-out records' phrasings alike."""
    from scoft.negatives import generate

    pipe, params = _base_pipe(planted_run)
    judge = load_judge(planted_run / "models/base" / JUDGE_DIR)
    settings = params.sampling("evaluate")
    for culture, (adjective, _, _) in CULTURES.items():
        prompts = [caption.format(adj=adjective) + f", {phrase}" for caption, _ in CATEGORIES.values()
                   for phrase in ["view 1", *HELDOUT_PHRASES[:2]]]
        images = generate(pipe, prompts * 2, list(range(2 * len(prompts))), settings)
        assert np.mean([stereotype_oracle(im, culture) for im in images]) >= 0.5, culture
        assert _forms(judge, images) >= 0.5, culture


def test_per_culture_fine_tunes_move_each_culture_from_the_stereotype_to_the_truth(planted_run):
    """Each culture's LoRA, drawing that culture's held-out captions (4 seeds each, the evaluation's
    sampler), comes nearer the truth palette than the base on the same captions and seeds, and leaves
    the stereotype."""
    from scoft.negatives import generate

    pipe, params = _base_pipe(planted_run)
    evaluation = params.sampling("evaluate")

    def scores(culture: str) -> tuple[float, float]:
        captions = [r.caption for r in read_manifest(planted_run / "data/ccub", culture) if r.split == HELDOUT]
        images = generate(pipe, [c for c in captions for _ in range(4)], list(range(4)) * len(captions), evaluation)
        return (np.mean([stereotype_oracle(im, culture) for im in images]),
                np.mean([palette_distance(im, CULTURES[culture][1:]) for im in images]))

    for culture in PLANTED_CULTURES:
        trained = json.loads((planted_run / f"models/lora/{culture}/training.json").read_text())
        assert trained["culture"] == culture and trained["steps"] == params.train.max_steps
        base_share, base_distance = scores(culture)
        pipe.load_lora_weights(str(planted_run / f"models/lora/{culture}"))
        tuned_share, tuned_distance = scores(culture)
        pipe.unload_lora_weights()
        assert tuned_share <= base_share - SHARE_DROP[culture], (culture, base_share, tuned_share)
        assert tuned_distance < base_distance - DISTANCE_DROP[culture], (culture, base_distance, tuned_distance)
