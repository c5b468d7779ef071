"""The offline evaluation backbone (colour histogram) and the tiny profile's tokenizer."""

import numpy as np
import pytest
import torch

from scoft.config import FeatureParams
from scoft.data import load_image_tensor
from scoft.evaluate import nearest_culture, pairwise_distances
from scoft.features import ColourHistogram, build_distance
from scoft.sample import CULTURES


def _flat(rgb, size=8) -> torch.Tensor:
    return (torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1).expand(1, 3, size, size) / 127.5 - 1).clone()


def test_colour_histogram_distance_by_hand():
    d = ColourHistogram(bins=2, size=8)
    black, white = _flat((0, 0, 0)), _flat((255, 255, 255))
    # bins=2 has centres 0.25 and 0.75: black and white pixels each put all their weight in one corner bin
    assert d(black, black).item() == pytest.approx(0.0, abs=1e-5)
    assert d(black, white).item() == pytest.approx(1.0, abs=1e-5)
    half = torch.cat([black[..., :4], white[..., 4:]], dim=-1)  # half black, half white: sqrt(0.5) overlap
    assert d(half, black).item() == pytest.approx(1 - np.sqrt(0.5), abs=1e-5)
    quarter = torch.cat([black[..., :6], white[..., 6:]], dim=-1)  # 3/4 black: overlap sqrt(3/4), not 3/4
    assert d(quarter, black).item() == pytest.approx(1 - np.sqrt(0.75), abs=1e-5)
    # the cells are (red, green, blue) bins in that order: pure red fills cell (1, 0, 0), index 4 of 8
    cells = [d.embed(_flat(rgb)).argmax().item() for rgb in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    assert cells == [4, 2, 1]
    # a mid grey (0.5 on every channel) is spread evenly over the 8 cells: overlap sqrt(1/8) with black
    grey = _flat((127.5, 127.5, 127.5))
    assert d(grey, black).item() == pytest.approx(1 - np.sqrt(1 / 8), abs=1e-5)


def test_colour_histogram_has_a_gradient_and_ignores_layout():
    d = ColourHistogram()
    x = torch.rand(2, 3, 16, 16, requires_grad=True)
    d(x * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    image = torch.rand(1, 3, 16, 16) * 2 - 1
    assert d(image, image.flip(-1)).item() == pytest.approx(0.0, abs=1e-5)


def test_offline_evaluation_backbone_tells_the_samples_cultures_apart(sample_dir):
    """Retrieval over the sample's own images, each image the query against all the others: the colour
    histogram finds each image's culture."""
    files = sorted((sample_dir / "train" / "images").glob("*.png"))
    images = torch.stack([load_image_tensor(f, 32) for f in files])
    cultures = np.array([f.name[:3].upper() for f in files])

    def accuracy(distance) -> float:
        matrix = pairwise_distances(distance, images, images)
        np.fill_diagonal(matrix, np.nan)  # an image is not its own reference
        hits = [nearest_culture(np.nan_to_num(row[None], nan=np.nanmean(row)), cultures)[0] == c
                for row, c in zip(matrix, cultures)]
        return float(np.mean(hits))

    assert accuracy(build_distance("colour-histogram", FeatureParams())) >= 0.9
    assert len(CULTURES) == len(set(cultures))


def test_tiny_tokenizer_has_one_token_per_caption_word_and_bytes_for_the_rest():
    from scoft.models import _word_merges, tiny_pipeline

    tokenizer = tiny_pipeline(32).tokenizer
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("a traditional Korean house, view 3 Quechua").input_ids)
    assert tokens[1:5] == ["a</w>", "traditional</w>", "korean</w>", "house</w>"]
    assert "quechua</w>" not in tokens and "a</w>" in tokens[-3:]  # an unseen word falls back to pieces
    assert (
        _word_merges(["abab", "ab"]) == _word_merges(["abab", "ab"]) == ["a b</w>", "a b", "ab ab</w>"]
    )  # most frequent first, ties by text


def test_the_planted_judge_missing_is_an_error_naming_the_stage(tmp_path):
    from scoft.judge import JudgeUnavailable

    with pytest.raises(JudgeUnavailable, match="run `dvc repro base`"):
        build_distance("planted-judge", FeatureParams(judge=str(tmp_path / "nowhere")))


def test_planted_attributes_weigh_each_attribute_as_declared(tmp_path):
    """D = sum_k w_k (1 - BC_k) / sum_k w_k over the judge's heads, computed here from the heads themselves."""
    import torch.nn.functional as F

    from scoft.judge import build_judge

    folder = tmp_path / "judge"
    build_judge(folder, steps=5, progress=lambda m: None)
    a, b = (torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(s)) * 2 - 1 for s in (1, 2))
    weights = {"category": 0.2, "form": 0.5, "palette": 0.3}
    d = build_distance("planted-attributes", FeatureParams(judge=str(folder), attribute_weights=weights))
    heads_a, heads_b = d.model(a), d.model(b)
    overlap = {k: (F.softmax(heads_a[k], -1) * F.softmax(heads_b[k], -1)).sqrt().sum(-1) for k in weights}
    expected = sum(w * (1 - overlap[k]) for k, w in weights.items()) / sum(weights.values())
    assert torch.allclose(d(a, b), expected, atol=1e-5)
    form_only = build_distance("planted-attributes", FeatureParams(judge=str(folder), attribute_weights={"form": 1}))
    assert torch.allclose(form_only(a, b), 1 - overlap["form"], atol=1e-5)
    assert torch.allclose(d.pairwise(a, b[:, None]).squeeze(1), expected, atol=1e-5)


def test_attribute_weights_must_weigh_something():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="at least one attribute"):
        FeatureParams(attribute_weights={"form": 0, "palette": 0})
    with pytest.raises(ValidationError):
        FeatureParams(attribute_weights={"shape": 1})
