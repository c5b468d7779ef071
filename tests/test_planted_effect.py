"""The default pipeline on the planted-bias base, with params.yaml's own settings (`scoft base`, then
`scoft sample|ingest|negatives|train` as dvc.yaml runs them, one LoRA per culture; tests/conftest.py
runs them beside the rest of the suite): the base's VAE can draw the community's truth, the base
itself draws the stereotype, and the default SCoFT fine-tune moves each culture's images from the
stereotype towards the truth. Without these, the evaluation could not tell whether SCoFT moved
anything. (BENCHMARKS.md has the same measured over 5 training seeds and every loss set.)"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from scoft.ccub import HELDOUT, read_manifest
from scoft.config import FeatureParams, ModelParams, load_params
from scoft.data import image_transform, load_image_tensor
from scoft.evaluate import as_tensors, form_shares
from scoft.features import build_distance
from scoft.judge import load_judge, stereotype_form_share
from scoft.planted import BUILD_INFO, JUDGE_DIR, STEREOTYPES, WEB_ENCODER_DIR, palette_distance, stereotype_oracle
from scoft.probe import probe_accuracy, renders
from scoft.sample import CATEGORIES, CULTURES, HELDOUT_LAYOUT, HELDOUT_PHRASES, STEREOTYPE, TRUTH, draw
from tests.conftest import PLANTED_CULTURES

VAE_RMSE_BOUND = 0.16  # on [-1, 1], the CCUB sample at 32 px (measured in BENCHMARKS.md)
# Per culture, about half the smallest drop that the default +MPC LoRAs (L_P and L_C in the web encoder's
# spaces) of 5 training seeds measured on the reporting sample with the evaluation's sampling seeds
# (BENCHMARKS.md, seventeenth session; bench/results/planted_web_reporting_b.json): distance to the truth
# palette KOR 0.053-0.062, NGA 0.027-0.046; stereotype palette share KOR 1.00, NGA 0.78-0.97. (MEX is not
# asserted: its truth palette resembles NGA's.)
DISTANCE_DROP = {"KOR": 0.025, "NGA": 0.013}
SHARE_DROP = {"KOR": 0.3, "NGA": 0.3}
# Form is held by the mean of the two measures' drops in stereotype-form share, the judge's and the
# hand-written geometry's (scoft/geometry.py, built apart from the judge), and each measure must fall.
# Either alone on 36 images is too noisy to bound per culture: on B's 5 seeds the judge's drop ranged
# NGA 0.14-0.44 and the geometry's KOR 0.17-0.36, and a CI run's NGA LoRA dropped 0.22 by the judge and
# 0.11 by geometry (below session 17's geometry bound of 0.12). Their mean ranged KOR 0.31-0.40, NGA
# 0.19-0.43 on B; that CI run's NGA 0.17. Bounds at about half of it.
FORM_DROP = {"KOR": 0.15, "NGA": 0.08}
# Where the forms are clear, on the base's images, the two form measures agree per image (0.83 for KOR and
# NGA on B, 0.78 to 0.86 on this suite's builds). On the LoRAs' images, whose forms lie between the two,
# they do not: 0.47 to 0.72 over B's 5 seeds, 0.36 on one suite run, about what two unrelated verdicts with
# those shares give (BENCHMARKS.md, seventeenth session). What they do agree on there is the share: within
# 0.2 on B's LoRAs. (An inverted measure agrees on about 0.2 of the base's images.)
MIN_BASE_AGREEMENT = 0.75
MAX_SHARE_GAP = 0.3
# A linear probe's form accuracy in the web encoder's pooled space on 8 seeds per cell: 0.78 on a build of
# params.yaml's defaults (2026-12-07), 0.76 after a quarter of its SimCLR steps, 0.70 for the same CNN after
# 20 steps (bench/feature_probe.py); the seeded random tiny DINOv2 0.52.
MIN_WEB_SSL_FORM = 0.72


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


def test_the_web_encoder_reads_form_where_the_seeded_random_backbone_cannot(planted_run):
    """The feature space the `base` stage pretrains without labels on the planted web makes a render's
    form linearly readable on seeds it never saw; L_C's offline alternative, a seeded random tiny DINOv2,
    reads it at chance."""
    pixels, labels, seeds = renders(per_cell=8)
    train = seeds < 4
    learned = build_distance("web-ssl", FeatureParams(web_encoder=str(planted_run / "models/base" / WEB_ENCODER_DIR)))
    random = build_distance("dinov2", FeatureParams())
    with torch.no_grad():
        spaces = {"web-ssl": learned.embed(pixels), "dinov2": random.embed(pixels)}
    form = {name: probe_accuracy(features, labels["form"], train) for name, features in spaces.items()}
    assert form["web-ssl"] >= MIN_WEB_SSL_FORM and form["web-ssl"] >= form["dinov2"] + 0.15, form


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
    """Each culture's LoRA, drawing that culture's held-out captions (the evaluation's sampler and
    sampling seeds), comes nearer the truth palette than the base on the same captions and seeds, and
    leaves the stereotype, in palette and in form (by the judge and by the geometry, built apart)."""
    from scoft.negatives import generate

    pipe, params = _base_pipe(planted_run)
    judge = load_judge(planted_run / "models/base" / JUDGE_DIR)
    evaluation, e = params.sampling("evaluate"), params.evaluate

    def scores(culture: str) -> tuple[float, float, float, dict]:
        held = [r for r in read_manifest(planted_run / "data/ccub", culture) if r.split == HELDOUT]
        seeds = [e.seed + j for j in range(e.samples_per_prompt)]
        images = generate(pipe, [r.caption for r in held for _ in seeds], seeds * len(held), evaluation)
        both = form_shares(judge, {"model": as_tensors(images, 32, "cpu")},
                           np.array([r.category for r in held for _ in seeds]), np.array([culture] * len(images)))
        return (np.mean([stereotype_oracle(im, culture) for im in images]),
                np.mean([palette_distance(im, CULTURES[culture][1:]) for im in images]), _forms(judge, images),
                both["model"]["overall"])

    for culture in PLANTED_CULTURES:
        trained = json.loads((planted_run / f"models/lora/{culture}/training.json").read_text())
        assert trained["culture"] == culture and trained["steps"] == params.train.max_steps
        base = scores(culture)
        pipe.load_lora_weights(str(planted_run / f"models/lora/{culture}"))
        tuned = scores(culture)
        pipe.unload_lora_weights()
        assert tuned[0] <= base[0] - SHARE_DROP[culture], (culture, base, tuned)
        assert tuned[1] < base[1] - DISTANCE_DROP[culture], (culture, base, tuned)
        # by both form measures, built apart: the evaluation report's form table gives the same figures
        assert (tuned[3]["judge"], base[3]["judge"]) == pytest.approx((tuned[2], base[2]))
        drops = [base[3][measure] - tuned[3][measure] for measure in ("judge", "geometry")]
        assert min(drops) > 0 and np.mean(drops) >= FORM_DROP[culture], (culture, drops, base, tuned)
        assert base[3]["agreement"] >= MIN_BASE_AGREEMENT, (culture, base, tuned)
        assert abs(tuned[3]["judge"] - tuned[3]["geometry"]) <= MAX_SHARE_GAP, (culture, base, tuned)


def test_the_judge_holds_at_the_vaes_noise_and_the_metric_weighs_form_and_palette(planted_run):
    """Issue 32: the judge's form recall, per class (truth and stereotype, both layouts), at the planted VAE's
    reconstruction error; and the default evaluation distance (planted-attributes) gives a correction of
    form alone and of palette alone each between 30% and 70% of the full correction's gain (the
    embedding's cosine, planted-judge, gave form about 7%)."""
    from scoft.features import build_distance
    from scoft.judge import degraded

    info = json.loads((planted_run / "models/base" / BUILD_INFO).read_text())
    recall = info["judge"]["form_recall"]["0.15"]
    assert min(recall.values()) >= 0.95, recall
    params = load_params(planted_run / "params.yaml")
    distance = build_distance("planted-attributes", params.features.model_copy(
        update={"judge": str(planted_run / "models/base" / JUDGE_DIR)}))
    rng = np.random.default_rng(11)

    def drawn(culture, form, palette):
        colours = CULTURES[culture][1:] if palette == TRUTH else STEREOTYPES[culture]
        renders = [draw(cat, *colours, rng, 32, form, HELDOUT_LAYOUT) for cat in CATEGORIES for _ in range(4)]
        return torch.stack([torch.from_numpy(degraded(r, rng, 0.15, 0.5)).permute(2, 0, 1) for r in renders])

    for culture in CULTURES:
        truth = drawn(culture, TRUTH, TRUTH)
        base = distance(drawn(culture, STEREOTYPE, STEREOTYPE), truth).mean()
        gain = {name: float(base - distance(drawn(culture, form, palette), truth).mean())
                for name, form, palette in (("form", TRUTH, STEREOTYPE), ("palette", STEREOTYPE, TRUTH),
                                            ("full", TRUTH, TRUTH))}
        assert gain["full"] > 0.5, (culture, gain)
        for partial in ("form", "palette"):
            assert 0.3 <= gain[partial] / gain["full"] <= 0.7, (culture, gain)
