"""Cultural insiders' review, its foundation: campaigns built from the evaluation's own images, blind
(opaque image ids, random order), invitations whose tokens are never stored, a versioned schema."""

import json
import sqlite3
from dataclasses import dataclass

import numpy as np
from PIL import Image

from scoft.evaluate import write_judged_images
from tests.conftest import write_params
from tests.helpers import scoft_here


@dataclass
class Held:
    id: str
    culture: str


def _workspace(ws):
    """A candidate LoRA for KOR and the evaluation's images: 3 held-out prompts (2 KOR, 1 NGA) x 2 seeds."""
    write_params(ws / "params.yaml", {})
    (ws / "models/lora/KOR").mkdir(parents=True)
    (ws / "models/lora/KOR/pytorch_lora_weights.safetensors").write_bytes(b"candidate")
    held = [Held("k1", "KOR"), Held("k2", "KOR"), Held("n1", "NGA")]
    prompts = [f"a photo of {h.id}" for h in held for _ in range(2)]
    image = lambda v: Image.fromarray(np.full((8, 8, 3), v, np.uint8))  # noqa: E731
    result = {"held": held, "prompts": prompts, "seeds": [7, 8] * 3,
              "images": {"base": [image(10)] * 6, "scoft": [image(200)] * 6}}
    write_judged_images(ws / "reports/eval/KOR/images", result)
    return ws


def test_a_campaign_pairs_the_evaluations_own_images_blind(tmp_path):
    ws = _workspace(tmp_path)
    out = scoft_here("review", "open", "--culture", "KOR", "--json", cwd=ws)
    assert out.returncode == 0, out.stderr
    opened = json.loads(out.stdout)
    assert opened["culture"] == "KOR" and opened["pairs"] == 4  # KOR's 2 prompts x 2 seeds, not NGA's
    again = json.loads(scoft_here("review", "open", "--culture", "KOR", "--json", cwd=ws).stdout)
    assert again == opened  # the same candidate: the same campaign
    db = sqlite3.connect(ws / "data/review/review.db")
    assert db.execute("select version_num from alembic_version").fetchone() == ("0001",)
    pairs = db.execute("select id, prompt, seed, first_image, second_image, candidate_first from pairs").fetchall()
    assert sorted((p[1], p[2]) for p in pairs) == [("a photo of k1", 7), ("a photo of k1", 8), ("a photo of k2", 7),
                                                   ("a photo of k2", 8)]
    ids = [i for p in pairs for i in (p[0], p[3], p[4])]
    assert not any(word in i.lower() for i in ids for word in ("scoft", "base", "candidate"))
    assert all(len(i) >= 16 for p in pairs for i in (p[3], p[4]))  # opaque random image ids


def test_invitations_are_secret_tokens_stored_only_as_hashes_and_revocable(tmp_path):
    ws = _workspace(tmp_path)
    assert scoft_here("review", "invite", "--culture", "KOR", "--count", "2", cwd=ws).returncode == 1  # none open
    scoft_here("review", "open", "--culture", "KOR", cwd=ws)
    out = scoft_here("review", "invite", "--culture", "KOR", "--count", "3", "--json", cwd=ws)
    links = json.loads(out.stdout)
    assert len(links) == 3 and all(link["url"].startswith("http://127.0.0.1:8700/r/") for link in links)
    tokens = [link["url"].rsplit("/", 1)[1] for link in links]
    assert len(set(tokens)) == 3 and all(len(t) >= 32 for t in tokens)  # 192 random bits, URL-safe
    stored = (ws / "data/review/review.db").read_bytes()
    assert not any(t.encode() in stored for t in tokens)
    out = scoft_here("review", "revoke", links[0]["reviewer"], cwd=ws)
    assert out.returncode == 0 and "revoked" in out.stdout
    db = sqlite3.connect(ws / "data/review/review.db")
    revoked = dict(db.execute("select id, revoked_at is not null from reviewers").fetchall())
    assert revoked == {links[0]["reviewer"]: 1, links[1]["reviewer"]: 0, links[2]["reviewer"]: 0}


def test_an_unreachable_database_is_one_line_naming_it(tmp_path, monkeypatch):
    ws = _workspace(tmp_path)
    write_params(ws / "params.yaml", {"review.database_url": "postgresql+psycopg://scoft@127.0.0.1:9/reviews"})
    monkeypatch.setenv("PGPASSWORD", "s3cret-pg")
    out = scoft_here("review", "open", "--culture", "KOR", cwd=ws)
    assert out.returncode == 1 and "review database postgresql+psycopg://scoft@127.0.0.1:9/reviews" in out.stderr
    assert "s3cret-pg" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
