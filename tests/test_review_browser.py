"""The review app in a real browser: Playwright for Python driving Debian's chromium (its executable
path, no browser download). Three scripted reviewers complete a campaign, one clicking with JavaScript
off, one from the keyboard, one from the keyboard on a phone-sized screen; then results and the gate
follow. With SCOFT_DOCS_SCREENSHOTS=docs the run also refreshes the README's screenshots."""

import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import scoft_here
from tests.test_review import _sql, _workspace

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _look(model: str, i: int) -> Image.Image:
    """Blocky 64 px stand-ins: the candidate's in warm community colours, the base model's washed out."""
    rng = np.random.default_rng(i)
    palette = np.array([[178, 34, 52], [0, 94, 153], [246, 190, 0], [250, 245, 235]] if model == "scoft"
                       else [[150, 150, 145], [120, 125, 130], [190, 185, 180], [90, 90, 95]], np.uint8)
    blocks = palette[rng.integers(0, 4, (8, 8))]
    return Image.fromarray(blocks).resize((64, 64), Image.NEAREST)


@pytest.fixture
def review_app(tmp_path):
    """The app served by uvicorn on loopback over a KOR campaign of 10 prompts x 2 seeds."""
    import uvicorn

    from scoft.review.app import create_app
    from scoft.review.store import open_store

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ws = _workspace(tmp_path, kor_prompts=10, look=_look,
                    overrides={"promotion.min_reviewers": 3, "review.public_url": f"http://127.0.0.1:{port}"})
    url = f"sqlite:///{ws / 'data/review/review.db'}"
    scoft_here("review", "open", "--culture", "KOR", cwd=ws)
    links = json.loads(scoft_here("review", "invite", "--culture", "KOR", "--count", "3", "--json", cwd=ws).stdout)
    server = uvicorn.Server(uvicorn.Config(create_app(open_store(url), ws), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield ws, url, links
    server.should_exit = True
    thread.join(10)


def _candidate_position(url: str, page) -> int:
    """Where the candidate's image is on the page (the test's knowledge, from the store)."""
    pair = page.locator("input[name=pair]").get_attribute("value")
    (first,), = _sql(url, "select candidate_first from pairs where id = :p", p=pair)
    return 0 if first else 1


def _review(page, link: str, url: str, answer) -> list[str]:
    """Open the link and answer every pair with answer(page, candidate position, prompt); the progress
    lines seen."""
    page.goto(link)
    seen = []
    while page.locator("h1").inner_text() != "Thank you":
        seen.append(page.locator("body > p").first.inner_text())
        images = page.locator(".pair img")
        assert images.count() == 2 and all(images.nth(k).evaluate("i => i.naturalWidth") == 64 for k in range(2))
        with page.expect_navigation():
            answer(page, _candidate_position(url, page), page.locator("h1").inner_text())
    return seen


def _by_clicks(page, candidate: int, prompt: str) -> None:
    """With JavaScript off: the candidate is better, and more stereotyped on k2 (can't tell elsewhere)."""
    page.locator(f"input[name=better][value='{candidate}']").click()
    stereotyped = f"input[name=more_stereotyped][value='{candidate}']" if prompt.endswith("k2") else \
        "input[name=more_stereotyped][value='']"
    page.locator(stereotyped).click()
    page.get_by_role("button", name="Send").click()


def _by_keys(unsure: tuple[str, ...], prefers_base: tuple[str, ...]):
    """From the keyboard: 1 or 2 the better image (0: can't tell, on the prompts in `unsure`), e: the
    stereotype question can't tell, Enter sends."""
    def answer(page, candidate: int, prompt: str) -> None:
        key = "0" if prompt in unsure else str(2 - candidate if prompt in prefers_base else candidate + 1)
        page.keyboard.press(key)
        page.keyboard.press("e")
        page.keyboard.press("Enter")
    return answer


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt install chromium)")
def test_three_reviewers_complete_a_campaign_in_chromium_then_the_gate_promotes(review_app, tmp_path):
    from playwright.sync_api import sync_playwright

    from scoft import registry

    ws, url, links = review_app
    errors = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM)
        contexts = [browser.new_context(java_script_enabled=False, viewport={"width": 900, "height": 760}),
                    browser.new_context(viewport={"width": 900, "height": 760}),
                    browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)]
        pages = [c.new_page() for c in contexts]
        for page in pages:
            page.on("pageerror", lambda e: errors.append(str(e)))
        pages[1].goto(links[1]["url"])
        shots = Path(os.environ.get("SCOFT_DOCS_SCREENSHOTS") or tmp_path)
        pages[1].screenshot(path=str(shots / "review-page.png"), full_page=True)
        phone = pages[2]
        phone.goto(links[2]["url"])
        for k in range(2):  # both images at once on a 390 x 844 phone, without scrolling
            box = phone.locator(".pair img").nth(k).bounding_box()
            assert box["y"] >= 0 and box["y"] + box["height"] <= 844 and box["width"] >= 120, box
        assert not phone.locator(".keys").is_visible() and pages[1].locator(".keys").is_visible()  # no keyboard
        smallest = min(phone.locator(f"{kind} label").nth(k).bounding_box()["height"]
                       for kind in ("fieldset", "figcaption") for k in range(phone.locator(f"{kind} label").count()))
        assert smallest >= 44  # touch targets
        assert phone.get_by_role("button", name="Send").bounding_box()["height"] >= 44
        phone.screenshot(path=str(shots / "review-page-phone.png"))
        reviewers = (_by_clicks, _by_keys(unsure=("a photo of k3", "a photo of k7"), prefers_base=()),
                     _by_keys(unsure=(), prefers_base=("a photo of k5",)))
        progress = [_review(page, link["url"], url, answer) for page, link, answer in zip(pages, links, reviewers)]
        assert all(seen == [f"Pair {n} of 21" for n in range(1, 22)] for seen in progress)  # 20 pairs and the repeat
        scoft_here("review", "results", "--culture", "KOR", "--html", tmp_path / "results.html", cwd=ws)
        pages[1].goto((tmp_path / "results.html").as_uri())
        assert "Krippendorff's alpha" in pages[1].content() and "once 3 reviewers have rated: 3 have" in \
            pages[1].locator("body").inner_text()
        pages[1].screenshot(path=str(shots / "review-results.png"), full_page=True)
        browser.close()
    assert errors == []
    results = json.loads(scoft_here("review", "results", "--culture", "KOR", "--json", cwd=ws).stdout)
    # 60 answers: the candidate, but "can't tell" 4 times (half a preference each) and the base 2 times
    assert results["candidate_vs_base"]["preference"] == pytest.approx((60 - 4 * 0.5 - 2) / 60)
    assert results["candidate_vs_base"]["reviewers"] == 3 and results["candidate_vs_base"]["ratings"] == 60
    assert results["candidate_vs_base"]["interval"][0] > 0.5
    assert list(results["self_consistency"]["reviewers"].values()) == [True, True, True]
    stereotyped = (58 * 0.5 + 2) / 60  # the candidate on k2 (both seeds), can't tell elsewhere
    assert results["candidate_vs_base"]["candidate_more_stereotyped"] == pytest.approx(stereotyped)
    out = scoft_here("review", "close", "--culture", "KOR", cwd=ws)
    assert "promoted" in out.stdout, out.stdout
    assert registry.read(ws, "KOR")["production"]["by"].startswith("insiders (review campaign ")
