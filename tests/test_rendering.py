"""Text that came from CCUB renders as text: no markup, links, remote images or headings."""

import json

import numpy as np
import pytest
from markdown_it import MarkdownIt
from PIL import Image

from scoft.ccub import Record
from scoft.render import markdown_text

HOSTILE = [
    "# Heading from a caption",
    "![tracker](http://attacker.example/pixel.png)",
    "[click](javascript:alert(1))",
    "<script>alert('x')</script>",
    '<img src=x onerror="alert(1)">',
    "| broken | table |\n\n- list",
    "`code` **bold** _em_ ~~strike~~ \\",
]


def _html(markdown: str) -> str:
    return MarkdownIt("commonmark").enable("table").render(markdown)


@pytest.mark.parametrize("text", HOSTILE)
def test_markdown_text_renders_as_the_literal_text(text):
    html = _html(f"1. {markdown_text(text)}")
    assert html.count("<li>") == 1 and "<h1" not in html and "<img" not in html and "<a " not in html
    assert "<script" not in html and "<strong" not in html and "<code" not in html and "<table" not in html


def test_the_evaluation_report_shows_hostile_captions_as_text(tmp_path):
    from scoft.evaluate import write_evaluation

    ccub = tmp_path / "ccub"
    (ccub / "images").mkdir(parents=True)
    Image.new("RGB", (32, 32), "red").save(ccub / "images/a.png")
    held = [Record(id=f"r{i}", culture="KOR", category="ARCH", caption=c, generic_caption="a house",
                   generic_caption_source="source", file="images/a.png", sha256="0" * 64, width=32, height=32,
                   source_url="https://example.org/a.png", location="x", etag=None, created_at="", split="heldout")
            for i, c in enumerate(HOSTILE)]
    stats = {"mean": 0.5, "ci95_low": 0.4, "ci95_high": 0.6}
    summary = {"n": len(held), "models": {"base": stats}, "improvement": {}}
    retrieval = {"chance": 1.0, "overall": {"base": stats}, "per_culture": {"KOR": {"base": stats}}}
    kid = {"mean": 0.1, "std_over_subsets": 0.01, "subset_size": 2, "real": 2, "generated": 2}
    per_culture = {"overall": stats, "per_culture": {"KOR": stats}}
    result = {
        "metrics": {
            "metric": "feature_distance",
            "overall": summary,
            "per_culture": {"KOR": summary},
            "retrieval_accuracy": retrieval,
            "retrieved_as": {"base": {"KOR": {"KOR": 1.0}}},
            "kid": {"base": {"overall": kid, "per_culture": {"KOR": kid}}},
            "diversity": {"base": per_culture},
            "memorisation": {"base": {"threshold": 0.2, **per_culture}},
            "generic_prompts": {
                "prompts": ["# a house"],
                "max_entropy_bits": 0.0,
                "models": {"base": {"shares": {"KOR": 1.0}, "entropy_bits": 0.0, "images": 1}},
            },
            "form": {"base": {"overall": {"judge": 0.92, "geometry": 0.94, "agreement": 0.86, "images": 36},
                              "per_culture": {"KOR": {"judge": 0.92, "geometry": 0.94, "agreement": 0.86,
                                                      "images": 36}}}},
        },
        "images": {"base": [Image.fromarray(np.zeros((32, 32, 3), np.uint8))] * len(held)},
        "held": held,
        "prompts": [r.caption for r in held],
        "seeds": list(range(len(held))),
    }
    log = tmp_path / "train_log" / "plots" / "metrics" / "train"
    log.mkdir(parents=True)
    (log / "ldm.tsv").write_text("step\tldm\n0\t0.5\n1\t0.25\n2\t0.125\n")
    write_evaluation(
        tmp_path / "eval", tmp_path / "metrics.json", result, ccub, "clip", train_log=tmp_path / "train_log"
    )
    index = json.loads((tmp_path / "eval/images/index.json").read_text())  # every judged image, for review
    assert index["models"] == ["base"] and [e["prompt"] for e in index["images"]] == [r.caption for r in held]
    assert all((tmp_path / f"eval/images/base/{e['i']:04d}.png").is_file() for e in index["images"])
    page = (tmp_path / "eval/report.html").read_text()
    assert 'src="grid-KOR.png"' in page and (tmp_path / "eval/grid-KOR.png").is_file()  # a grid per culture
    assert "<svg" in page and "max 0.5" in page and "min 0.125" in page  # the loss curve, its range
    assert "<script" not in page and "onerror=" not in page.replace("onerror=&quot;", "")
    assert page.count("<img") == 1 and "attacker.example" in page  # captions as text, no remote image
    assert "<table>" in page and "KID" in page and "Memorisation" in page
    # the stereotype-form share by both measures, and their agreement
    assert "| base | KOR | 0.92 | 0.94 | 0.86 | 36 |" in (tmp_path / "eval/report.md").read_text()
    html = _html((tmp_path / "eval/report.md").read_text())
    assert html.count("<h1>") == 1  # the report's own title only
    assert html.count("<img") == 1 and 'src="grid.png"' in html  # the grid only, nothing remote
    assert "<script" not in html and "onerror=" not in html.replace("onerror=&quot;", "")
    assert "attacker.example" in html  # the caption is still there, as text
