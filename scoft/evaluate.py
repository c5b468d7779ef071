"""Evaluation: the base model and fine-tuned LoRAs on the same prompts and seeds, against held-out CCUB.

Metrics, per culture and overall, for every model, with 95% bootstrap intervals over prompts:
- distance: mean feature distance D(generated, held-out reference for the same caption), and each
  LoRA's paired improvement over the base (positive: closer to the community's images), with a paired
  permutation test, Holm-corrected across cultures;
- retrieval accuracy: the share of images for culture X whose nearest culture is X;
- KID against the held-out images in the evaluation backbone's feature space;
- diversity: mean pairwise distance between a prompt's seeds (a collapsed model draws one picture);
- memorisation: the share of images nearer a training image than any held-out image is;
- for prompts naming no culture, the distribution of retrieved cultures and its entropy.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from scoft.ccub import HELDOUT, TRAIN, Record, read_heldout, read_manifest
from scoft.data import image_transform, load_image_tensor
from scoft.features import build_distance, device_of
from scoft.io import atomic_dir, write_json
from scoft.negatives import generate
from scoft.paths import BASE, IMAGES_DIR, PRODUCTION
from scoft.render import html_text, markdown_text
from scoft.stats import bootstrap_ci, hierarchical_bootstrap_ci, holm, sign_flip_p

NO_INTERVAL = "fewer than 2 prompts: no interval"
# memorisation: an image nearer a training image than 90% of unseen community images are is flagged
MEMORISATION_QUANTILE = 0.1


def _stats(values: np.ndarray, n: int, seed: int) -> dict:
    interval = bootstrap_ci(values, n, seed)
    if interval is None:
        return {"mean": float(values.mean()), "ci95_low": None, "ci95_high": None, "insufficient": NO_INTERVAL}
    return {"mean": float(values.mean()), "ci95_low": interval[0], "ci95_high": interval[1]}


def paired_gain(gains: np.ndarray, n: int, seed: int, categories: np.ndarray | None = None,
                prompt_ids: list[str] | None = None) -> dict:
    """A model's per-prompt paired gain over a reference model (positive: closer to the community's
    images): its mean and interval over prompts, one-sided sign-flip p-values by prompt and by
    category (the cluster: a LoRA's effect is often shared by a category's prompts), and the gains
    themselves, so that the gate (and a reader) can test them again."""
    out = {**_stats(gains, n, seed), "p_one_sided": sign_flip_p(gains, seed=seed), "gains": gains.round(6).tolist()}
    if categories is not None:
        out["categories"] = list(map(str, categories))
        out["p_one_sided_by_category"] = sign_flip_p(gains, categories, seed=seed)
        clustered = hierarchical_bootstrap_ci(gains, categories, n, seed)
        out["ci95_by_category"] = list(clustered) if clustered else None
    if prompt_ids is not None:
        out["prompt_ids"] = list(prompt_ids)
    return out


def _summary(dist: dict[str, np.ndarray], idx: np.ndarray, bootstrap: int, seed: int,
             categories: np.ndarray | None = None, prompt_ids: np.ndarray | None = None) -> dict:
    """Per model, over the prompts in idx (each prompt's distance averaged over its seeds first)."""
    cats = None if categories is None else categories[idx]
    ids = None if prompt_ids is None else prompt_ids[idx].tolist()
    return {
        "n": int(idx.sum()),
        "models": {name: _stats(d[idx], bootstrap, seed) for name, d in dist.items()},
        "improvement": {name: paired_gain(dist[BASE][idx] - d[idx], bootstrap, seed, cats, ids)
                        for name, d in dist.items() if name != BASE},
        # per prompt (held-out record id): what a later candidate is compared with, prompt by prompt
        "distances": None if ids is None else {name: dict(zip(ids, d[idx].round(6).tolist()))
                                               for name, d in dist.items()},
    }


def culture_metrics(dist: dict[str, np.ndarray], prompt_cultures: np.ndarray, all_cultures: list[str],
                    bootstrap: int, seed: int, categories: np.ndarray | None = None,
                    prompt_ids: np.ndarray | None = None) -> dict:
    """Per culture: the summary, each LoRA's one-sided paired test against the base with Holm's
    correction across cultures (for the report: the gate applies its own family, the cultures it
    judges); a culture without held-out prompts is named, not dropped."""
    per_culture = {}
    for culture in all_cultures:
        idx = prompt_cultures == culture
        per_culture[culture] = (_summary(dist, idx, bootstrap, seed, categories, prompt_ids) if idx.any()
                                else {"n": 0, "insufficient": "no held-out record for this culture"})
    for name in (n for n in dist if n != BASE):
        tested = {c: m["improvement"][name]["p_one_sided"] for c, m in per_culture.items() if m["n"]}
        for culture, p in holm(tested).items():
            per_culture[culture]["improvement"][name]["p_holm"] = p
    return per_culture


def as_tensors(images: list[Image.Image], resolution: int, device) -> torch.Tensor:
    """Generated images as the evaluation reads references: resized, cropped, in [-1, 1]."""
    return torch.stack([image_transform(resolution)(im) for im in images]).to(device)


@torch.no_grad()
def pairwise_distances(distance, a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """D(a_i, b_j) for every pair: [len(a), len(b)]."""
    rows = [distance.pairwise(a[i:i + 16], b[None].expand(len(a[i:i + 16]), *b.shape)) for i in range(0, len(a), 16)]
    return torch.cat(rows).cpu().numpy()


def distance_matrix(distance, images: list[Image.Image], refs: torch.Tensor, resolution: int) -> np.ndarray:
    """D(generated_i, reference_j) for every pair: [len(images), len(refs)]."""
    return pairwise_distances(distance, as_tensors(images, resolution, refs.device), refs)


def within_prompt_diversity(distance, images: torch.Tensor, per_prompt: int) -> np.ndarray | None:
    """Per prompt, the mean distance between its seeds' images (off-diagonal pairs of its own block:
    the distances across prompts are never computed); None below 2 seeds."""
    if per_prompt < 2:
        return None
    off_diagonal = ~np.eye(per_prompt, dtype=bool)
    blocks = (pairwise_distances(distance, images[i:i + per_prompt], images[i:i + per_prompt])
              for i in range(0, len(images), per_prompt))
    return np.array([block[off_diagonal].mean() for block in blocks])


def memorised(gen_vs_train: np.ndarray, held_vs_train: np.ndarray, quantile: float) -> tuple[np.ndarray, float]:
    """Per generated image, whether it is nearer a training image than all but the `quantile` share of
    unseen community images (held-out) are to their nearest training image; and that threshold. A model
    drawing like the community without copying it scores about `quantile`; copies score near 1. (The
    smallest held-out distance, the old threshold, flagged nothing, ever: a rule that could not fail.)"""
    threshold = float(np.quantile(held_vs_train.min(axis=1), quantile))
    return gen_vs_train.min(axis=1) < threshold, threshold


class _Embedder(torch.nn.Module):
    """The evaluation backbone's embedding as KID's feature extractor (images in [-1, 1])."""

    def __init__(self, distance):
        super().__init__()
        self.distance = distance

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.distance.embed(images).double()


@torch.no_grad()
def kid(distance, real: torch.Tensor, fake: torch.Tensor, seed: int, subsets: int = 100) -> dict:
    """Kernel Inception Distance (torchmetrics) in the evaluation backbone's feature space, subset size
    fitted to the smaller sample; lower is closer. Needs an embedding backbone and 2 images a side."""
    if not hasattr(distance, "embed"):
        return {
            "insufficient": "KID needs an embedding backbone (clip, dinov2, dinov2+clip, colour-histogram), not LPIPS"
        }
    size = min(len(real), len(fake))
    if size < 2:
        return {"insufficient": f"KID needs 2 images a side (real {len(real)}, generated {len(fake)})"}
    from torchmetrics.image.kid import KernelInceptionDistance

    with warnings.catch_warnings():  # "will save all extracted features in buffer": a few dozen here
        warnings.simplefilter("ignore", UserWarning)
        metric = KernelInceptionDistance(feature=_Embedder(distance), subsets=subsets, subset_size=size).to(real.device)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    with torch.random.fork_rng(devices=[]):  # its subsets come from the global generator
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return {"mean": float(mean), "std_over_subsets": float(std), "subset_size": size, "real": len(real),
            "generated": len(fake)}


def nearest_culture(distances: np.ndarray, ref_cultures: np.ndarray) -> np.ndarray:
    """Nearest-centroid retrieval in distance terms: per generated image, the culture whose held-out
    references are nearest on average."""
    cultures = np.unique(ref_cultures)
    mean_to = np.stack([distances[:, ref_cultures == c].mean(axis=1) for c in cultures], axis=1)
    return cultures[mean_to.argmin(axis=1)]


def retrieval_metrics(hits: dict[str, np.ndarray], prompt_cultures: np.ndarray, bootstrap: int, seed: int,
                      candidates: int) -> dict:
    """Share of images generated for culture X retrieved as X among `candidates` cultures (per prompt
    over its seeds), per model, per culture and overall, with intervals over prompts."""
    def block(idx):
        return {name: _stats(h[idx], bootstrap, seed) for name, h in hits.items()}

    def gains(idx):  # paired by prompt: each LoRA's accuracy minus the base's on the same prompts and seeds
        return {name: _stats(h[idx] - hits[BASE][idx], bootstrap, seed) for name, h in hits.items() if name != BASE}

    every = np.ones(len(prompt_cultures), dtype=bool)
    cultures = np.unique(prompt_cultures).tolist()
    return {"chance": 1 / candidates,
            "overall": block(every),
            "per_culture": {c: block(prompt_cultures == c) for c in cultures},
            "improvement": {"overall": gains(every), "per_culture": {c: gains(prompt_cultures == c) for c in cultures}}}


def generic_distribution(retrieved: dict[str, np.ndarray], cultures: list[str], prompts: list[str]) -> dict:
    """Per model, the share of generic-prompt images retrieved as each culture and its entropy in bits
    (log2 of the number of cultures when even; 0 when every image lands on one culture)."""
    out = {"prompts": prompts, "max_entropy_bits": float(np.log2(len(cultures))), "models": {}}
    for name, labels in retrieved.items():
        shares = np.array([(labels == c).mean() for c in cultures])
        nonzero = shares[shares > 0]
        out["models"][name] = {"shares": dict(zip(cultures, shares.round(4).tolist())),
                               "entropy_bits": max(0.0, float(-(nonzero * np.log2(nonzero)).sum())),  # no -0.0
                               "images": int(len(labels))}
    return out


def retrieved_as(labels: dict[str, np.ndarray], image_cultures: np.ndarray, cultures: list[str]) -> dict:
    """Per model and prompt culture, the share of its images retrieved as each culture: off the culture
    itself, the cross-culture bleed (a joint LoRA drawing one culture's prompts in another's likeness)."""
    return {name: {prompted: {c: round(float((found[image_cultures == prompted] == c).mean()), 4) for c in cultures}
                   for prompted in sorted(set(image_cultures.tolist()))}
            for name, found in labels.items()}


def category_coverage(records: list[Record], cultures: list[str] | None = None) -> dict:
    """Per culture, the categories it trains on and those among them with no held-out record: what
    the evaluation cannot judge (a LoRA may change them for better or worse unseen)."""
    out = {}
    for culture in sorted({r.culture for r in records if cultures is None or r.culture in cultures}):
        trained = sorted({r.category for r in records if r.culture == culture and r.split == TRAIN})
        held = {r.category for r in records if r.culture == culture and r.split == HELDOUT}
        out[culture] = {"trained": trained, "unjudged": [c for c in trained if c not in held]}
    return out


def with_seeds(texts: list[str], per_prompt: int, seed: int) -> tuple[list[str], list[int]]:
    """Each prompt repeated once per sampling seed, and those seeds (the same for every prompt and model):
    prompt-major, a prompt's images side by side (what `prompt_means` reads back)."""
    return [t for t in texts for _ in range(per_prompt)], [seed + j for _ in texts for j in range(per_prompt)]


def prompt_means(values: np.ndarray, per_prompt: int) -> np.ndarray:
    """One value per prompt, the mean over its seeds, from per-image values laid out as `with_seeds` lays
    out the images: intervals and tests then resample prompts, not images of one prompt."""
    values = np.asarray(values, dtype=np.float64)
    return values.reshape(len(values) // per_prompt, per_prompt).mean(axis=1)


def sample_in_batches(pipe, texts: list[str], seeds: list[int], settings: dict,
                      on_batch=lambda n: None) -> list[Image.Image]:
    """Batches of 8 (each image with its own generator); on_batch(n) after each, n images in it."""
    images = []
    for i in range(0, len(texts), 8):
        images += generate(pipe, texts[i:i + 8], seeds[i:i + 8], settings)
        on_batch(len(texts[i:i + 8]))
    return images


def heldout_records(records: list[Record]) -> list[Record]:
    return [r for r in records if r.split == HELDOUT]


def compare(pipe, loras: dict[str, Path | dict[str, Path]], records: list[Record], ccub_dir, distance,
            settings: dict, samples_per_prompt: int, seed: int, bootstrap: int, progress=print,
            cultures: list[str] | None = None, judge=None) -> dict:
    """Generate for every held-out caption (of `cultures`, when given) with the base model, then with
    each model, same seeds. Retrieval is among every culture's held-out records in `records`.

    A model is one LoRA folder (for every culture) or {culture: LoRA folder} (one LoRA per culture, as
    the paper trains them): a culture's prompts are then drawn with its own LoRA, the base where it has
    none (named in `notes`), and each culture's LoRA draws the generic prompts as its own row. `judge`:
    the planted world's judge, when there is one: each model's stereotype-form share by it and by the
    hand-written geometry (`form_shares`)."""
    references = heldout_records(records)
    held = [r for r in references if cultures is None or r.culture in cultures]
    if not held:
        raise ValueError(f"no held-out records{'' if cultures is None else ' of ' + ', '.join(cultures)} "
                         "to evaluate against")
    prompts, seeds = with_seeds([r.caption for r in held], samples_per_prompt, seed)
    prompt_cultures = [r.culture for r in held for _ in range(samples_per_prompt)]
    device = device_of(distance)
    position = {r.id: i for i, r in enumerate(references)}
    all_refs = torch.stack([load_image_tensor(Path(ccub_dir) / r.file, settings["resolution"])
                            for r in references]).to(device)
    ref_cultures = np.array([r.culture for r in references])
    refs = all_refs[[position[r.id] for r in held]]
    train_refs = [load_image_tensor(Path(ccub_dir) / r.file, settings["resolution"]) for r in records
                  if r.split == TRAIN and (cultures is None or r.culture in cultures)]

    # prompts that name no culture (the generic captions): which culture does each model draw?
    generic = sorted({r.generic_caption for r in references})  # the same for every culture's evaluation
    generic_prompts, generic_seeds = with_seeds(generic, samples_per_prompt, seed)

    per_culture = {c: sum(pc == c for pc in prompt_cultures) for c in set(prompt_cultures)}
    total = len(prompts) + len(generic_prompts) + sum(
        len(prompts) + len(generic_prompts) if not isinstance(lora, dict)
        else sum(per_culture.get(c, 0) + len(generic_prompts) for c in lora if c in per_culture)
        for lora in loras.values())
    sampled = [0]

    def count(n: int) -> None:
        sampled[0] += n
        progress(f"evaluate: {sampled[0]}/{total} images sampled")  # the operator's progress bar (tasks/dvc.py)

    def sample(texts: list[str], text_seeds: list[int]) -> list[Image.Image]:
        return sample_in_batches(pipe, texts, text_seeds, settings, count)

    images, generic_images, notes = {BASE: sample(prompts, seeds)}, {BASE: sample(generic_prompts, generic_seeds)}, []
    for name, lora in loras.items():
        if not isinstance(lora, dict):
            pipe.load_lora_weights(str(lora))
            images[name] = sample(prompts, seeds)
            generic_images[name] = sample(generic_prompts, generic_seeds)
            pipe.unload_lora_weights()
        else:
            images[name] = list(images[BASE])
            for culture in sorted({r.culture for r in held}):
                if culture not in lora:
                    notes.append(f"{name}: no LoRA for {culture}; its prompts are drawn by the base model")
                    continue
                at = [i for i, c in enumerate(prompt_cultures) if c == culture]
                pipe.load_lora_weights(str(lora[culture]))
                for i, im in zip(at, sample([prompts[i] for i in at], [seeds[i] for i in at])):
                    images[name][i] = im
                generic_images[f"{name}[{culture}]"] = sample(generic_prompts, generic_seeds)
                pipe.unload_lora_weights()
        progress(f"evaluate: {len(prompts)} + {len(generic_prompts)} generic images from {name}")
    # One distance matrix per model (every image against every held-out reference) gives both the
    # distance to the image's own reference and the culture retrieval.
    held_cultures = np.array([r.culture for r in held])
    image_cultures = np.repeat(held_cultures, samples_per_prompt)
    own = np.repeat([position[r.id] for r in held], samples_per_prompt)  # each image's held-out record
    generated = {name: as_tensors(imgs, settings["resolution"], device) for name, imgs in images.items()}
    matrices = {name: pairwise_distances(distance, tensors, all_refs) for name, tensors in generated.items()}

    dist = {name: prompt_means(m[np.arange(len(m)), own], samples_per_prompt) for name, m in matrices.items()}
    labels = {name: nearest_culture(m, ref_cultures) for name, m in matrices.items()}
    hits = {name: prompt_means(found == image_cultures, samples_per_prompt) for name, found in labels.items()}
    retrieved = {name: nearest_culture(distance_matrix(distance, imgs, all_refs, settings["resolution"]), ref_cultures)
                 for name, imgs in generic_images.items()}
    extra = quality_metrics(distance, generated, refs, torch.stack(train_refs).to(device) if train_refs else None,
                            held_cultures, samples_per_prompt, bootstrap, seed)
    metrics = {
        **extra,
        "notes": notes,
        "retrieval_accuracy": retrieval_metrics(hits, held_cultures, bootstrap, seed, len(np.unique(ref_cultures))),
        "generic_prompts": generic_distribution(retrieved, np.unique(ref_cultures).tolist(), generic),
        "retrieved_as": retrieved_as(labels, image_cultures, np.unique(ref_cultures).tolist()),
        "metric": "feature_distance",
        "unit": f"prompt (mean over {samples_per_prompt} seed(s))",
        "overall": _summary(dist, np.ones(len(held), dtype=bool), bootstrap, seed),
        "per_culture": culture_metrics(dist, held_cultures, sorted({r.culture for r in records if cultures is None
                                                                    or r.culture in cultures}), bootstrap, seed,
                                       categories=np.array([r.category for r in held]),
                                       prompt_ids=np.array([r.id for r in held])),
        "coverage": category_coverage(records, cultures),
        "form": (form_shares(judge, generated, np.repeat([r.category for r in held], samples_per_prompt),
                             image_cultures) if judge is not None
                 else {"insufficient": "no planted judge: form is measured in the planted world only"}),
    }
    return {"metrics": metrics, "images": images, "held": held, "prompts": prompts, "seeds": seeds,
            "generic_images": generic_images, "per_prompt": {"distance": dist, "retrieval": hits}}


@torch.no_grad()
def form_shares(judge, generated: dict[str, torch.Tensor], categories: np.ndarray, cultures: np.ndarray) -> dict:
    """Per model (and culture), the share of its images in the stereotype's form by two measures built
    apart, the planted judge (a network) and scoft.geometry (hand-written shape ratios), and the share of
    images on which they agree: a claim about form rests on both, never on one network's leanings."""
    from scoft.geometry import stereotype_form_share as by_geometry
    from scoft.judge import stereotype_form_share as by_judge

    def shares(judge_says: np.ndarray, geometry_says: np.ndarray, mask: np.ndarray) -> dict:
        return {"judge": float(judge_says[mask].mean()), "geometry": float(geometry_says[mask].mean()),
                "agreement": float((judge_says == geometry_says)[mask].mean()), "images": int(mask.sum())}

    out = {}
    for name, images in generated.items():
        pixels = images.detach().float().cpu()
        said = by_judge(judge, pixels), by_geometry(pixels.numpy(), list(categories))
        out[name] = {"overall": shares(*said, np.ones(len(pixels), dtype=bool)),
                     "per_culture": {c: shares(*said, cultures == c) for c in sorted(set(cultures.tolist()))}}
    return out


def form_markdown(form: dict) -> list[str]:
    if "insufficient" in form:
        return [f"Stereotype form share: not measured ({form['insufficient']})."]
    lines = ["Stereotype form share (lower is better): the share of each model's images drawn in the stereotype's "
             "form (shape, whatever the colours), by the planted judge and by hand-written geometry built apart "
             "from it, and the share of images on which the two agree.", "",
             "| model | culture | judge | geometry | agreement | images |", "|---|---|---|---|---|---|"]
    for name, block in form.items():
        for culture, m in [*block["per_culture"].items(), ("all", block["overall"])]:
            lines.append(f"| {markdown_text(name)} | {markdown_text(culture)} | {m['judge']:.2f} | "
                         f"{m['geometry']:.2f} | {m['agreement']:.2f} | {m['images']} |")
    return lines


def quality_metrics(distance, generated: dict[str, torch.Tensor], refs: torch.Tensor, train_refs: torch.Tensor | None,
                    cultures: np.ndarray, per_prompt: int, bootstrap: int, seed: int) -> dict:
    """KID, within-prompt diversity and memorisation per model, overall and per culture."""
    image_cultures = np.repeat(cultures, per_prompt)
    names = sorted(set(cultures.tolist()))
    out = {"kid": {}, "diversity": {}, "memorisation": {}}
    held_vs_train = pairwise_distances(distance, refs, train_refs) if train_refs is not None else None
    for name, images in generated.items():
        out["kid"][name] = {"overall": kid(distance, refs, images, seed),
                            "per_culture": {c: kid(distance, refs[cultures == c], images[image_cultures == c], seed)
                                            for c in names}}
        diversity = within_prompt_diversity(distance, images, per_prompt)
        out["diversity"][name] = (
            {"insufficient": f"{per_prompt} sample(s) per prompt: diversity needs 2 seeds"} if diversity is None else
            {"overall": _stats(diversity, bootstrap, seed),
             "per_culture": {c: _stats(diversity[cultures == c], bootstrap, seed) for c in names}})
        if held_vs_train is None:
            out["memorisation"][name] = {"insufficient": "no training records to compare with"}
            continue
        flags, threshold = memorised(pairwise_distances(distance, images, train_refs), held_vs_train,
                                     MEMORISATION_QUANTILE)
        share = prompt_means(flags, per_prompt)
        out["memorisation"][name] = {"threshold": threshold, "overall": _stats(share, bootstrap, seed),
                                     "per_culture": {c: _stats(share[cultures == c], bootstrap, seed) for c in names}}
    return out


def image_grid(rows: list[list[Image.Image]], size: int) -> Image.Image:
    grid = Image.new("RGB", (size * len(rows[0]), size * len(rows)), "white")
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            grid.paste(im.convert("RGB").resize((size, size)), (j * size, i * size))
    return grid


def _cell(s: dict) -> str:
    if s.get("insufficient"):
        return f"{s['mean']:.4f} ({s['insufficient']})"
    p = f", p {s['p_holm']:.3g} (Holm)" if s.get("p_holm") is not None else ""
    return f"{s['mean']:.4f} [{s['ci95_low']:.4f}, {s['ci95_high']:.4f}]{p}"


def metrics_markdown(metrics: dict, backbone: str) -> list[str]:
    names = list(metrics["overall"]["models"])
    tuned = [n for n in names if n != BASE]
    lines = [f"Primary metric, named in advance (the promotion gate's): feature distance ({backbone}) between "
             "generated images and held-out CCUB images for the same "
             "caption (lower is closer); improvement = base - model (higher is better). Same prompts and seeds "
             "for every model; 95% bootstrap intervals over prompts; p: one-sided paired sign-flip test "
             "against the base, Holm-corrected across cultures.", "",
             "| culture | n | " + " | ".join(names) + " | " + " | ".join(f"improvement {n}" for n in tuned) + " |",
             "|---" * (2 + len(names) + len(tuned)) + "|"]
    for culture, m in [*metrics["per_culture"].items(), ("all", metrics["overall"])]:
        if "models" not in m:
            lines.append(
                f"| {markdown_text(culture)} | 0 | {m['insufficient']} |" + " |" * (len(names) + len(tuned) - 1)
            )
            continue
        cells = [_cell(m["models"][n]) for n in names] + [_cell(m["improvement"][n]) for n in tuned]
        lines.append(f"| {markdown_text(culture)} | {m['n']} | " + " | ".join(cells) + " |")
    return lines


def retrieval_markdown(retrieval: dict) -> list[str]:
    names = list(retrieval["overall"])
    lines = [f"Culture retrieval accuracy: the share of images generated for a culture whose nearest culture (mean "
             f"distance to its held-out references) is that culture; chance {retrieval['chance']:.2f}; higher is "
             "better.", "", "| culture | " + " | ".join(names) + " |", "|---" * (1 + len(names)) + "|"]
    for culture, row in [*retrieval["per_culture"].items(), ("all", retrieval["overall"])]:
        lines.append(f"| {markdown_text(culture)} | " + " | ".join(_cell(row[n]) for n in names) + " |")
    return lines


def retrieved_as_markdown(shares: dict) -> list[str]:
    """Where each culture's images land, per model: the row's own culture is the retrieval accuracy,
    the rest is bleed into other cultures."""
    cultures = list(next(iter(next(iter(shares.values())).values())))
    lines = ["Where each culture's images land: the share retrieved as each culture, per model (off the "
             "prompt's own culture: bleed into another culture's likeness).", "",
             "| model | prompts of | " + " | ".join(markdown_text(c) for c in cultures) + " |",
             "|---" * (2 + len(cultures)) + "|"]
    for name, rows in shares.items():
        for prompted, row in rows.items():
            lines.append(f"| {markdown_text(name)} | {markdown_text(prompted)} | "
                         + " | ".join(f"{row[c]:.2f}" for c in cultures) + " |")
    return lines


def generic_markdown(generic: dict) -> list[str]:
    cultures = list(next(iter(generic["models"].values()))["shares"])
    lines = [
        f"Prompts naming no culture ({len(generic['prompts'])}: "
        + "; ".join(markdown_text(p) for p in generic["prompts"])
        + f"): the share of images retrieved as each culture and the entropy (bits, even spread "
        f"{generic['max_entropy_bits']:.2f}). Too few prompts for intervals: a description, not a test.",
        "",
        "| model | " + " | ".join(markdown_text(c) for c in cultures) + " | entropy |",
        "|---" * (2 + len(cultures)) + "|",
    ]
    for name, m in generic["models"].items():
        lines.append(f"| {markdown_text(name)} | " + " | ".join(f"{m['shares'][c]:.2f}" for c in cultures)
                     + f" | {m['entropy_bits']:.2f} |")
    return lines


def _quality_cell(block: dict) -> str:
    return block["insufficient"] if "insufficient" in block else _cell(block)


def quality_markdown(metrics: dict) -> list[str]:
    """KID, diversity and memorisation per culture (rows) and model (columns)."""
    names = list(metrics["kid"])
    cultures = list(next(iter(metrics["kid"].values()))["per_culture"])
    header = ["| culture | " + " | ".join(markdown_text(n) for n in names) + " |", "|---" * (1 + len(names)) + "|"]

    def rows(block: dict, cell) -> list[str]:
        return [f"| {markdown_text(c)} | " + " | ".join(cell(block[n], c) for n in names) + " |"
                for c in [*cultures, "all"]]

    def kid_cell(m: dict, c: str) -> str:
        k = m["overall"] if c == "all" else m["per_culture"][c]
        return (
            k["insufficient"]
            if "insufficient" in k
            else f"{k['mean']:.4f} ± {k['std_over_subsets']:.4f} (m={k['subset_size']})"
        )

    def stat_cell(m: dict, c: str) -> str:
        if "insufficient" in m:
            return m["insufficient"]
        return _quality_cell(m["overall"] if c == "all" else m["per_culture"][c])

    memorisation = next(iter(metrics["memorisation"].values()))
    threshold = f"{memorisation['threshold']:.4f}" if "threshold" in memorisation else "none"
    return ["KID against the held-out images in the evaluation backbone's features (lower is closer; ± the "
            "spread over subsets, m the subset size).", "", *header, *rows(metrics["kid"], kid_cell), "",
            "Within-prompt diversity: mean distance between the images of one prompt's seeds (a collapsed model "
            "draws one picture for every seed; higher is more varied).", "", *header,
            *rows(metrics["diversity"], stat_cell), "",
            f"Memorisation: the share of images nearer a training image than any held-out image is to its nearest "
            f"training image (threshold {threshold}; lower is better).", "", *header,
            *rows(metrics["memorisation"], stat_cell)]


def culture_grids(result: dict, ccub_dir, size: int) -> dict[str, Image.Image]:
    """Per culture: one row per held-out prompt and seed, columns reference | base | each LoRA."""
    per_prompt = len(result["prompts"]) // len(result["held"])
    names = list(result["images"])
    grids = {}
    for culture in sorted({r.culture for r in result["held"]}):
        rows = []
        for i, record in enumerate(result["held"]):
            if record.culture != culture:
                continue
            reference = Image.open(Path(ccub_dir) / record.file)
            rows += [[reference, *(result["images"][n][i * per_prompt + j] for n in names)] for j in range(per_prompt)]
        grids[culture] = image_grid(rows, size)
    return grids


def read_loss_curves(log_dir) -> dict[str, list[tuple[float, float]]]:
    """The training terms dvclive logged (plots/metrics/train/<term>.tsv): {term: [(step, value)]}."""
    curves = {}
    folder = Path(log_dir) / "plots" / "metrics" / "train" if log_dir else None
    for tsv in sorted(folder.glob("*.tsv")) if folder and folder.is_dir() else []:
        rows = [line.split("\t") for line in tsv.read_text(encoding="utf-8").splitlines()[1:] if line.strip()]
        curves[tsv.stem] = [(float(step), float(value)) for step, value, *_ in rows]
    return curves


def curve_svg(name: str, points: list[tuple[float, float]], width: int = 260, height: int = 120) -> str:
    """A small line chart of one loss term, its own y range printed (terms differ by orders of magnitude)."""
    xs, ys = [x for x, _ in points], [y for _, y in points]
    lo, hi = min(ys), max(ys)
    span_x, span_y = (max(xs) - min(xs)) or 1, (hi - lo) or 1
    path = " ".join(
        f"{8 + (x - min(xs)) / span_x * (width - 16):.1f},{height - 18 - (y - lo) / span_y * (height - 36):.1f}"
        for x, y in points
    )
    return (f'<figure><svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
            f'aria-label="{html_text(name)}"><rect width="100%" height="100%" fill="#fafafa"/>'
            f'<polyline fill="none" stroke="#2a6fdb" stroke-width="1.5" points="{path}"/>'
            f'<text x="8" y="12" font-size="10">max {hi:.4g}</text>'
            f'<text x="8" y="{height - 4}" font-size="10">min {lo:.4g}, steps {min(xs):.0f}-{max(xs):.0f}</text>'
            f'</svg><figcaption>{html_text(name)}</figcaption></figure>')


_STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
          "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px}"
          "img{image-rendering:pixelated}figure{display:inline-block;margin:4px}")


def html_report(
    sections_markdown: list[str], grids: dict[str, str], columns: list[str], curves: dict, prompts: dict
) -> str:
    """The report as one HTML page: the tables (Markdown rendered with raw HTML off, so CCUB text
    stays text), a grid per culture, and the loss curves."""
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark", {"html": False}).enable("table").render("\n".join(sections_markdown))
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>SCoFT evaluation</title><style>{_STYLE}</style>"
             "</head><body>", body, "<h2>Per culture</h2>",
             f"<p>Columns: {html_text(' | '.join(['held-out reference', *columns]))}; one row per prompt and seed.</p>"]
    for culture, file in grids.items():
        parts += [f"<h3>{html_text(culture)}</h3>", f'<img src="{html_text(file)}" alt="{html_text(culture)} grid">',
                  "<ol>" + "".join(f"<li>{html_text(p)}</li>" for p in prompts[culture]) + "</ol>"]
    parts.append("<h2>Training loss</h2>")
    parts += [curve_svg(name, points) for name, points in curves.items() if points] or [
        "<p>No training log was given to the evaluation.</p>"]
    return "\n".join([*parts, "</body></html>"])




def write_judged_images(folder: Path, result: dict) -> None:
    """images/<model>/<i>.png for each held-out prompt and seed, and images/index.json saying, for each i,
    the prompt, its seed, and the held-out record and culture it stands for: a review campaign pairs these
    images (same prompt and seed, candidate against base) without any new sampling."""
    per_prompt = len(result["prompts"]) // len(result["held"])
    index = [{"i": i, "prompt": prompt, "seed": int(seed), "record": result["held"][i // per_prompt].id,
              "culture": result["held"][i // per_prompt].culture}
             for i, (prompt, seed) in enumerate(zip(result["prompts"], result["seeds"]))]
    for model, images in result["images"].items():
        (folder / model).mkdir(parents=True)
        for i, image in enumerate(images):
            image.save(folder / model / f"{i:04d}.png")
    write_json(folder / "index.json", {"models": sorted(result["images"]), "images": index})


def grid_file(culture: str) -> str:
    return "grid-" + re.sub(r"[^A-Za-z0-9_-]", "_", culture) + ".png"  # a file name whatever the manifest holds


def write_evaluation(out_dir, metrics_file, result: dict, ccub_dir, backbone: str, size: int = 64,
                     train_log=None) -> None:
    """report.md (the Prefect artifact), report.html (tables, a grid per culture, loss curves), the grids
    and metrics.json."""
    per_prompt = len(result["prompts"]) // len(result["held"])
    refs = [Image.open(Path(ccub_dir) / r.file) for r in result["held"] for _ in range(per_prompt)]
    names = list(result["images"])
    rows = [[ref, *(result["images"][n][i] for n in names)] for i, ref in enumerate(refs)]
    notes = [f"- {markdown_text(n)}" for n in result["metrics"].get("notes", [])]
    notes += [f"- {c}: no held-out record of {', '.join(block['unjudged'])}, which it trains on: not judged here"
              for c, block in result["metrics"].get("coverage", {}).items() if block["unjudged"]]
    tables = [*(["Notes:", "", *notes, ""] if notes else []), *metrics_markdown(result["metrics"], backbone), "",
              *retrieval_markdown(result["metrics"]["retrieval_accuracy"]), "",
              *retrieved_as_markdown(result["metrics"]["retrieved_as"]), "",
              *generic_markdown(result["metrics"]["generic_prompts"]), "", *quality_markdown(result["metrics"]), "",
              *form_markdown(result["metrics"].get("form") or {"insufficient": "not measured by this evaluation"})]
    lines = ["# SCoFT evaluation", "", *tables, "",
             f"Columns of the grid: held-out reference, {', '.join(names)}. Rows, in order:", ""]
    lines += [f"{i + 1}. {markdown_text(p)}" for i, p in enumerate(result["prompts"])]
    lines += ["", f"![reference | {' | '.join(names)}](grid.png)", ""]
    grids = culture_grids(result, ccub_dir, size)
    prompts = {c: [r.caption for r in result["held"] if r.culture == c] for c in grids}
    with atomic_dir(out_dir) as tmp:
        write_judged_images(tmp / IMAGES_DIR, result)
        image_grid(rows, size).save(tmp / "grid.png")
        for culture, grid in grids.items():
            grid.save(tmp / grid_file(culture))
        (tmp / "report.md").write_text("\n".join(lines), encoding="utf-8")
        page = html_report(["# SCoFT evaluation", "", *tables], {c: grid_file(c) for c in grids}, names,
                           read_loss_curves(train_log), prompts)
        (tmp / "report.html").write_text(page, encoding="utf-8")
    write_json(metrics_file, result["metrics"])


def evaluate_loras(params, loras: dict[str, Path | dict[str, Path]], ccub_dir, out_dir, metrics_file, train_log=None,
                   progress=print, culture: str | None = None) -> dict:
    """The evaluate stage: the base model and each model in `loras` (one LoRA, or one per culture) on the
    held-out prompts of ccub_dir (of one culture, when given: retrieval is still among every culture's
    held-out images), judged by features.evaluation; writes the report and metrics_file and returns the
    metrics."""
    from scoft.models import load_pipeline, pick_device

    f, e = params.features, params.evaluate
    if f.evaluation == f.contrastive and params.train.uses("contrastive"):
        progress(f"warning: features.evaluation is the L_C backbone ({f.contrastive}): the full method is "
                 "judged by the network it trained against")
    records = read_manifest(ccub_dir)
    if culture is not None:  # its own records, and every culture's held-out references (the stage's deps)
        own = read_manifest(ccub_dir, culture)
        records = own + [r for r in read_heldout(ccub_dir) if r.culture != culture]
    device = pick_device()
    pipe = load_pipeline(params.model).to(device)
    distance = build_distance(f.evaluation, f, params.model.seed).to(device)
    result = compare(pipe, loras, records, ccub_dir, distance, params.sampling("evaluate"),
                     e.samples_per_prompt, e.seed, e.bootstrap, progress=progress,
                     cultures=None if culture is None else [culture], judge=planted_judge(f.judge))
    write_evaluation(out_dir, metrics_file, result, ccub_dir, f.evaluation, train_log=train_log)
    return result["metrics"]


def planted_judge(folder: str | Path):
    """The planted world's judge where the `base` stage built one (model.base: tiny), else None."""
    from scoft.judge import JudgeUnavailable, load_judge

    try:
        return load_judge(folder)
    except JudgeUnavailable:
        return None


def prompt_distances(params, lora_dir: str | Path, ccub_dir, culture: str,
                     keep: Path | None = None) -> dict[str, float]:
    """One LoRA's distance to each held-out image of `culture` (by record id), on the evaluation's own
    prompts, seeds, sampler and backbone: how production is measured again on the current held-out
    records when it was judged on others, so that a candidate is always compared with it. `keep`: a
    folder to hold its images (as write_judged_images lays them out, the model named PRODUCTION)."""
    from scoft.models import load_pipeline, pick_device

    held = [r for r in read_heldout(ccub_dir) if r.culture == culture]
    if not held:
        return {}
    e, settings, device = params.evaluate, params.sampling("evaluate"), pick_device()
    pipe = load_pipeline(params.model).to(device)
    distance = build_distance(params.features.evaluation, params.features, params.model.seed).to(device)
    prompts, seeds = with_seeds([r.caption for r in held], e.samples_per_prompt, e.seed)
    pipe.load_lora_weights(str(lora_dir))
    images = sample_in_batches(pipe, prompts, seeds, settings)
    refs = torch.stack([load_image_tensor(Path(ccub_dir) / r.file, settings["resolution"]) for r in held]).to(device)
    if keep is not None:
        with atomic_dir(keep) as tmp:
            judged = {"held": held, "prompts": prompts, "seeds": seeds, "images": {PRODUCTION: images}}
            write_judged_images(tmp, judged)
    matrix = pairwise_distances(distance, as_tensors(images, settings["resolution"], device), refs)
    own = np.repeat(np.arange(len(held)), e.samples_per_prompt)
    per_prompt = matrix[np.arange(len(own)), own].reshape(len(held), e.samples_per_prompt).mean(axis=1)
    return {r.id: round(float(v), 6) for r, v in zip(held, per_prompt)}
