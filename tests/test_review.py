"""Cultural insiders' review, its foundation: campaigns built from the evaluation's own images, blind
(opaque image ids, random order), invitations whose tokens are never stored, a versioned schema."""

import json
import sqlite3
from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image

from scoft.evaluate import write_judged_images
from scoft.io import sha256_file
from tests.conftest import write_params
from tests.helpers import scoft_here


@dataclass
class Held:
    id: str
    culture: str


def _workspace(ws, kor_prompts: int = 2, look=None, overrides: dict | None = None):
    """A candidate LoRA for KOR and the evaluation's images: KOR's held-out prompts and one NGA prompt,
    2 seeds each; look(model, i) draws image i of a model (by default, one flat colour per model)."""
    write_params(ws / "params.yaml", overrides or {})
    (ws / "models/lora/KOR").mkdir(parents=True)
    (ws / "models/lora/KOR/pytorch_lora_weights.safetensors").write_bytes(b"candidate")
    held = [*(Held(f"k{i + 1}", "KOR") for i in range(kor_prompts)), Held("n1", "NGA")]
    prompts = [f"a photo of {h.id}" for h in held for _ in range(2)]
    look = look or (lambda model, i: Image.fromarray(np.full((8, 8, 3), 200 if model == "scoft" else 10, np.uint8)))
    result = {"held": held, "prompts": prompts, "seeds": [7, 8] * len(held),
              "images": {model: [look(model, i) for i in range(len(prompts))] for model in ("base", "scoft")}}
    write_judged_images(ws / "reports/eval/KOR/images", result)
    _judged_and_awaiting(ws)
    return ws


def _judged_and_awaiting(ws, key: str = "rec1"):
    """What a retrain run leaves for the insiders: the candidate's lineage record, and the registry's
    'await' event of a candidate that passed every rule (people decide only on such a one)."""
    from scoft import registry
    from scoft.io import write_json
    from scoft.lineage import sealed
    from scoft.promotion import RULES_BY

    lora = "models/lora/KOR/pytorch_lora_weights.safetensors"
    write_json(ws / f"lineage/{key}.json", sealed({"created_at": "2026-01-01T00:00:00+00:00", "culture": "KOR",
                                                  "ccub": {"path": "data/ccub", "dvc_hash": None}, "params": {},
                                                  "metrics": {}, "lora": {"path": lora,
                                                                          "sha256": sha256_file(ws / lora)}}))
    registry.await_review(ws, "KOR", sha256_file(ws / lora), key, by=RULES_BY, reason="every rule passed")


def test_a_campaign_pairs_the_evaluations_own_images_blind(tmp_path):
    ws = _workspace(tmp_path)
    out = scoft_here("review", "open", "--culture", "KOR", "--json", cwd=ws)
    assert out.returncode == 0, out.stderr
    opened = json.loads(out.stdout)
    assert opened["culture"] == "KOR" and opened["pairs"] == 4  # KOR's 2 prompts x 2 seeds, not NGA's
    again = json.loads(scoft_here("review", "open", "--culture", "KOR", "--json", cwd=ws).stdout)
    assert again == opened  # the same candidate: the same campaign
    db = sqlite3.connect(ws / "data/review/review.db")
    assert db.execute("select version_num from alembic_version").fetchone() == ("0002",)
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


def _app(ws, invited: int = 2, url: str | None = None, public_url: str | None = None):
    from fastapi.testclient import TestClient

    from scoft.review.app import create_app
    from scoft.review.store import open_store

    scoft_here("review", "open", "--culture", "KOR", cwd=ws)
    links = json.loads(scoft_here("review", "invite", "--culture", "KOR", "--count", str(invited), "--json",
                                  cwd=ws).stdout)
    url = url or f"sqlite:///{ws / 'data/review/review.db'}"
    client = TestClient(create_app(open_store(url), ws, public_url))
    client.ws, client.url = ws, url
    return client, [link["url"].rsplit("/", 1)[1] for link in links], links


def _sql(url: str, query: str, **values) -> list:
    """A query on the review store behind the app (the test's own look at what was stored)."""
    import sqlalchemy

    with sqlalchemy.create_engine(url).begin() as connection:
        result = connection.execute(sqlalchemy.text(query), values)
        return result.all() if result.returns_rows else []


def test_a_reviewer_rates_every_pair_through_the_api_and_the_last_answer_is_kept(tmp_path):
    client, tokens, links = _app(_workspace(tmp_path))
    auth = {"Authorization": f"Bearer {tokens[0]}"}
    seen = []
    while (r := client.get("/api/v1/next", headers=auth)).status_code == 200:
        shown = r.json()
        assert shown["prompt"].startswith("a photo of k") and len(shown["images"]) == 2
        for url in shown["images"]:
            image = client.get(url, headers=auth)
            assert image.status_code == 200 and image.headers["content-type"] == "image/png"
            assert not {"etag", "last-modified", "content-disposition"} & set(image.headers)
        body = {"pair": shown["pair"], "better": 0, "more_stereotyped": None, "offensive": [False, True]}
        assert client.post("/api/v1/ratings", json=body, headers=auth).status_code == 201
        seen.append(shown["pair"])
    assert r.status_code == 204 and len(seen) == 5 == len(set(seen))  # 4 pairs, then one of them again
    again = {"pair": seen[0], "better": 1, "more_stereotyped": 1, "offensive": [False, False]}
    assert client.post("/api/v1/ratings", json=again, headers=auth).status_code == 201
    db = sqlite3.connect(tmp_path / "data/review/review.db")
    kept = db.execute("select better from ratings where pair_id = ? order by id", (seen[0],)).fetchall()
    assert kept == [(0,), (1,)]  # never deleted; the last one is the answer


def test_tokens_pairs_and_bodies_that_do_not_belong_are_refused_and_store_nothing(tmp_path):
    ws = _workspace(tmp_path)
    client, tokens, links = _app(ws)
    assert client.get("/api/v1/next").status_code == 401
    assert client.get("/api/v1/next", headers={"Authorization": "Bearer not-a-token"}).status_code == 401
    assert client.get("/r/%3Cscript%3E").status_code == 401 and "opens nothing" in client.get("/r/x").text
    scoft_here("review", "revoke", links[1]["reviewer"], cwd=ws)
    assert client.get("/api/v1/next", headers={"Authorization": f"Bearer {tokens[1]}"}).status_code == 403
    auth = {"Authorization": f"Bearer {tokens[0]}"}
    pair = client.get("/api/v1/next", headers=auth).json()["pair"]
    for body, status in [({"pair": "someone-elses", "better": 0, "more_stereotyped": 0, "offensive": [False, False]},
                          404), ({"pair": pair, "better": 2, "more_stereotyped": 0, "offensive": [False, False]}, 422),
                         ({"pair": pair, "better": 0, "more_stereotyped": 0, "offensive": "no"}, 422), ([1, 2], 422)]:
        r = client.post("/api/v1/ratings", json=body, headers=auth)
        assert r.status_code == status and r.json()["error"]
    assert client.post("/api/v1/ratings", content=b"{", headers=auth).status_code == 400
    assert client.get("/img/" + "x" * 22, headers=auth).status_code == 404
    assert sqlite3.connect(ws / "data/review/review.db").execute("select count(*) from ratings").fetchone() == (0,)


def test_token_guessing_and_rating_floods_are_answered_429(tmp_path):
    from fastapi.testclient import TestClient

    from scoft.review.app import create_app
    from scoft.review.store import open_store

    ws = _workspace(tmp_path, kor_prompts=3)
    client, tokens, _ = _app(ws)

    def app(**limits):
        return TestClient(create_app(open_store(client.url), ws, None, **limits))

    guessing = app(failed_tokens_per_minute=5)
    assert [guessing.get(f"/r/guess{i:02d}" + "x" * 20).status_code for i in range(6)] == [401] * 5 + [429]
    refused = guessing.get("/api/v1/next", headers={"Authorization": f"Bearer {tokens[0]}"})
    assert refused.status_code == 429 and "wait a minute" in refused.json()["error"]  # the address, for a minute
    flooding, auth = app(ratings_per_minute=3), {"Authorization": f"Bearer {tokens[0]}"}
    statuses = []
    for _ in range(4):
        pair = flooding.get("/api/v1/next", headers=auth).json()["pair"]
        statuses.append(flooding.post("/api/v1/ratings", headers=auth, json={
            "pair": pair, "better": 0, "more_stereotyped": 1, "offensive": [False, False]}).status_code)
    assert statuses == [201, 201, 201, 429]
    assert sqlite3.connect(ws / "data/review/review.db").execute("select count(*) from ratings").fetchone() == (3,)


def test_the_page_is_blind_escapes_captions_and_refuses_cross_site_posts(tmp_path):
    ws = _workspace(tmp_path)
    index = json.loads((ws / "reports/eval/KOR/images/index.json").read_text())
    for entry in index["images"]:
        entry["prompt"] = "<script>alert(1)</script> a house"
    (ws / "reports/eval/KOR/images/index.json").write_text(json.dumps(index))
    client, tokens, _ = _app(ws)
    page = client.get(f"/r/{tokens[0]}")
    assert page.status_code == 200 and "1 of 5" in page.text
    assert "<script>alert(1)</script>" not in page.text and "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
    for word in ("scoft", "base", "candidate", ".png", "images/"):
        assert word not in page.text.lower().replace("scoft_review", "")
    pair = page.text.split('name="pair" value="')[1].split('"')[0]
    form = {"pair": pair, "better": "1", "more_stereotyped": "", "offensive_0": "1"}
    assert client.post(f"/r/{tokens[0]}/rate", data=form, follow_redirects=False).status_code == 403  # no csrf
    form["csrf"] = page.text.split('name="csrf" value="')[1].split('"')[0]
    sent = client.post(f"/r/{tokens[0]}/rate", data=form, follow_redirects=False)
    assert sent.status_code == 303 and "2 of 5" in client.get(f"/r/{tokens[0]}").text
    img = page.text.split('<img src="')[1].split('"')[0]
    assert client.get(img).status_code == 200  # with the page's cookie
    db = sqlite3.connect(ws / "data/review/review.db")
    assert db.execute("select better, more_stereotyped, offensive_first from ratings").fetchall() == [(1, None, 1)]


def _reviews(client, tokens, choose):
    """Each reviewer rates every pair through the API: choose(reviewer, position of the candidate,
    the candidate's opponent) gives the position it calls better. The test knows the candidate's
    position from the store."""
    for k, token in enumerate(tokens):
        auth = {"Authorization": f"Bearer {token}"}
        while (r := client.get("/api/v1/next", headers=auth)).status_code == 200:
            pair = r.json()["pair"]
            (first, versus), = _sql(client.url, "select candidate_first, comparison from pairs where id = :p", p=pair)
            body = {"pair": pair, "better": choose(k, 0 if first else 1, versus), "more_stereotyped": None,
                    "offensive": [False, False]}
            assert client.post("/api/v1/ratings", json=body, headers=auth).status_code == 201


def _balanced(url: str):
    """The candidate first in every other pair (the drawn order, made exactly balanced for the test)."""
    for k, (pair,) in enumerate(_sql(url, "select id from pairs where repeat_of is null order by id")):
        _sql(url, "update pairs set candidate_first = :first where id = :p", first=bool(k % 2), p=pair)


@pytest.mark.parametrize("who,choose,promoted", [
    ("insiders who prefer the candidate", lambda k, cand, _: cand if (k + hash(cand)) % 10 else 1 - cand, True),
    ("reviewers who always pick the left image", lambda k, cand, _: 0, False),
    ("reviewers who answer at random", lambda k, cand, _: int(np.random.default_rng(k).integers(2)), False),
])
def test_only_insiders_preference_beyond_chance_promotes(tmp_path, who, choose, promoted):
    from scoft import registry

    ws = _workspace(tmp_path, kor_prompts=10)
    client, tokens, _ = _app(ws, invited=6)
    _balanced(client.url)
    rng = np.random.default_rng(0)
    if "random" in who:
        choose = lambda k, cand, _: int(rng.integers(2))  # noqa: E731
    _reviews(client, tokens, choose)
    out = scoft_here("review", "close", "--culture", "KOR", cwd=ws)
    assert out.returncode == 0, out.stderr
    production = registry.read(ws, "KOR")["production"]
    last = registry.read(ws, "KOR")["history"][-1]
    assert (production is not None) == promoted, (who, out.stdout)
    assert last["reason"].startswith("insiders: ") and ", 6 reviewers, 120 ratings" in last["reason"]
    assert last["by"].startswith("insiders (review campaign ")
    results = json.loads(scoft_here("review", "results", "--culture", "KOR", "--json", cwd=ws).stdout)
    assert results["status"] == "closed" and results["candidate_vs_base"]["ratings"] == 120
    (export, digest), = last["decision"]["insiders"]["export"].items()
    rows = (ws / export).read_text().splitlines()
    assert len(rows) == 1 + 120 + 6 and all(line.split(",")[1].startswith("r-") for line in rows[1:])  # + repeats
    assert sha256_file(ws / export) == digest


def test_the_export_enters_the_lineage_record_and_verify_checks_it(tmp_path):
    from scoft.lineage import verify

    ws = _workspace(tmp_path, kor_prompts=3)  # with the candidate's lineage record, lineage/rec1.json
    client, tokens, _ = _app(ws, invited=2)
    _reviews(client, tokens, lambda k, cand, _: cand)
    db = sqlite3.connect(ws / "data/review/review.db")
    db.execute("update campaigns set opened_at = '2020-01-01 00:00:00'")
    db.commit()
    assert "rejected" in scoft_here("review", "close", "--culture", "KOR", cwd=ws).stdout
    record = json.loads((ws / "lineage/rec1.json").read_text())
    (export, digest), = record["files"]["insiders review"].items()
    assert record["insiders"]["promote"] is False and sha256_file(ws / export) == digest
    assert not [p for p in verify(record, ws) if p.startswith("insiders review") or p.startswith("record:")]
    (ws / export).write_text((ws / export).read_text().replace(",1,", ",0,", 1))  # one answer changed
    assert any(p.startswith(f"insiders review: {export}: sha256 differs") for p in verify(record, ws))


def test_a_campaign_waits_for_reviewers_then_its_deadline_rejects_it(tmp_path):
    from scoft import registry

    ws = _workspace(tmp_path, kor_prompts=3)
    client, tokens, _ = _app(ws, invited=2)
    _reviews(client, tokens, lambda k, cand, _: cand)
    out = scoft_here("review", "close", "--culture", "KOR", cwd=ws)
    assert out.returncode == 0 and "still open" in out.stdout and "waiting for promotion.min_reviewers" in out.stdout
    db = sqlite3.connect(ws / "data/review/review.db")
    db.execute("update campaigns set opened_at = '2020-01-01 00:00:00'")
    db.commit()
    out = scoft_here("review", "close", "--culture", "KOR", cwd=ws)
    assert "rejected: not enough reviews by the deadline" in out.stdout
    assert registry.read(ws, "KOR")["production"] is None


def test_the_review_close_flow_judges_every_open_campaign(prefect_server, tmp_path):
    from flows.review import review_close
    from scoft import registry

    ws = _workspace(tmp_path, kor_prompts=3)
    client, tokens, _ = _app(ws, invited=2)
    _reviews(client, tokens, lambda k, cand, _: cand)
    waiting = review_close(workdir=str(ws))
    assert list(waiting) == ["KOR"] and not waiting["KOR"]["decided"]
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as prefect:  # the latest (other tests' runs write this key too)
        shown = prefect.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["scoft-review-kor"])),
                                       sort=ArtifactSort.CREATED_DESC, limit=1)[0].data
    # the campaign in the UI: progress, where reviewers go, what it waits for
    assert "# KOR: still open" in shown and "12 of 12 ratings from 2 invited reviewers" in shown
    assert "the app: http://127.0.0.1:8700" in shown and "waiting for promotion" in shown
    db = sqlite3.connect(ws / "data/review/review.db")
    db.execute("update campaigns set opened_at = '2020-01-01 00:00:00'")
    db.commit()
    closed = review_close(workdir=str(ws))
    assert closed["KOR"]["decided"] and "not enough reviews" in closed["KOR"]["reason"]
    assert registry.read(ws, "KOR")["history"][-1]["action"] == "reject"
    assert review_close(workdir=str(ws)) == {}  # nothing open any more


def test_each_reviewer_sees_one_pair_again_swapped_and_the_results_say_who_answered_alike(tmp_path):
    ws = _workspace(tmp_path, kor_prompts=3)
    client, tokens, links = _app(ws, invited=2)
    db = sqlite3.connect(ws / "data/review/review.db")
    repeats = db.execute("select id, reviewer_id, repeat_of, first_image, second_image, candidate_first from pairs "
                         "where repeat_of is not null").fetchall()
    assert sorted(r[1] for r in repeats) == sorted(link["reviewer"] for link in links)
    path = lambda image: db.execute("select path from images where id = ?", (image,)).fetchone()[0]  # noqa: E731
    for _, _, original, first, second, candidate_first in repeats:
        shown = db.execute("select first_image, second_image, candidate_first from pairs where id = ?",
                           (original,)).fetchone()
        assert (path(first), path(second), bool(candidate_first)) == (path(shown[1]), path(shown[0]), not shown[2])
        assert not {first, second} & {shown[0], shown[1]}  # the same images swapped, under new addresses
    theirs = next(r[0] for r in repeats if r[1] == links[1]["reviewer"])
    refused = client.post("/api/v1/ratings", json={"pair": theirs, "better": 0, "more_stereotyped": None,
                                                    "offensive": [False, False]},
                          headers={"Authorization": f"Bearer {tokens[0]}"})
    assert refused.status_code == 404  # another reviewer's repeat is not yours to rate
    # the first reviewer names the candidate every time; the second always the left image, which the
    # swapped repeat shows up
    _reviews(client, tokens, lambda k, cand, _: cand if k == 0 else 0)
    results = json.loads(scoft_here("review", "results", "--culture", "KOR", "--json", cwd=ws).stdout)
    assert results["self_consistency"]["reviewers"] == {links[0]["reviewer"]: True, links[1]["reviewer"]: False}
    assert results["candidate_vs_base"]["ratings"] == 2 * 6  # the repeats count towards consistency only
    out = scoft_here("review", "results", "--culture", "KOR", cwd=ws).stdout
    assert "self-consistent on their repeated pair: 1 of 2 reviewers" in out


@pytest.mark.parametrize("insiders_prefer,promoted", [("production", False), ("candidate", True)])
def test_a_candidate_faces_production_on_the_same_prompts_and_must_not_lose_to_it(tmp_path, insiders_prefer,
                                                                                   promoted):
    from scoft import registry
    from scoft.review.campaigns import keep_as_production, production_images_dir

    def distinct(model, i):  # every image its own bytes, so that a shared picture would be seen
        shade = {"scoft": 200, "base": 10}.get(model, 100)
        return Image.fromarray(np.full((8, 8, 3), (i * 7 % 256, shade, 3), np.uint8))

    ws = _workspace(tmp_path, kor_prompts=10, look=distinct)
    earlier = ws / "earlier"
    earlier.mkdir()
    (earlier / "pytorch_lora_weights.safetensors").write_bytes(b"production")
    production = registry.promote(ws, "KOR", earlier, "rec0", by="test", reason="earlier")["production"]
    keep_as_production(ws, "KOR", production["lora_sha256"], "reports/eval/KOR")  # as at its promotion
    for i, kept in enumerate(sorted((ws / production_images_dir("KOR", production["lora_sha256"])).rglob("*.png"))):
        distinct("production", 100 + i).save(kept)  # production drew its own pictures, not the candidate's
    opened = json.loads(scoft_here("review", "open", "--culture", "KOR", "--json", cwd=ws).stdout)
    assert opened["pairs"] == 20  # each prompt's two draws: one against the base, the other against production
    db = f"sqlite:///{ws / 'data/review/review.db'}"
    shown = [i for row in _sql(db, "select first_image, second_image from pairs") for i in row]
    assert len(set(shown)) == len(shown)  # no image address shared by two pairs (the candidate's would be)
    files = _sql(db, "select p.comparison, p.record, f.path, s.path from pairs p join images f on f.id = p.first_image"
                     " join images s on s.id = p.second_image where p.repeat_of is null")
    assert sorted(c for c, *_ in files) == ["base"] * 10 + ["production"] * 10
    assert {r for c, r, *_ in files if c == "base"} == {r for c, r, *_ in files if c == "production"}  # every prompt
    pictures = [sha256_file(ws / path) for *_, first, second in files for path in (first, second)]
    assert len(set(pictures)) == len(pictures)  # no picture in two pairs: the candidate's is not given away
    client, tokens, _ = _app(ws, invited=6)
    _balanced(client.url)
    _reviews(client, tokens, lambda k, cand, versus: cand if versus == "base" or insiders_prefer == "candidate"
             else 1 - cand)
    results = json.loads(scoft_here("review", "results", "--culture", "KOR", "--json", cwd=ws).stdout)
    assert results["candidate_vs_base"]["preference"] == 1.0 and results["candidate_vs_base"]["ratings"] == 60
    assert results["candidate_vs_production"]["preference"] == (1.0 if promoted else 0.0)
    out = scoft_here("review", "close", "--culture", "KOR", cwd=ws)
    entry = registry.read(ws, "KOR")
    assert (entry["production"]["lora_sha256"] != production["lora_sha256"]) == promoted, out.stdout
    if promoted:  # the new production's judged images are kept for the next candidate's campaign
        assert (ws / production_images_dir("KOR", entry["production"]["lora_sha256"]) / "index.json").is_file()
    else:
        assert "failed: not worse than production" in entry["history"][-1]["reason"]


def test_a_teams_review_store_on_postgresql_decides_the_same_way(tmp_path, postgres):
    """The whole campaign on a real PostgreSQL server (Debian's packages): schema, blind pairs, invitations,
    ratings through the API, the repeated pair, results and the gate."""
    from scoft import registry

    url = postgres.database("review_gate")
    ws = _workspace(tmp_path, kor_prompts=10)
    write_params(ws / "params.yaml", {"review.database_url": url})
    client, tokens, links = _app(ws, invited=6, url=url)
    assert _sql(url, "select version_num from alembic_version") == [("0002",)]
    assert len(_sql(url, "select id from pairs where repeat_of is null")) == 20
    _balanced(url)
    _reviews(client, tokens, lambda k, cand, _: cand if (k + cand) % 7 else 1 - cand)
    results = json.loads(scoft_here("review", "results", "--culture", "KOR", "--json", cwd=ws).stdout)
    assert results["candidate_vs_base"]["ratings"] == 120 and results["candidate_vs_base"]["reviewers"] == 6
    assert set(results["self_consistency"]["reviewers"]) == {link["reviewer"] for link in links}
    out = scoft_here("review", "close", "--culture", "KOR", cwd=ws)
    assert out.returncode == 0 and "promoted" in out.stdout, out.stdout + out.stderr
    assert registry.read(ws, "KOR")["production"]["by"].startswith("insiders (review campaign ")
    assert _sql(url, "select count(*) from ratings") == [(126,)]  # never deleted: 120 + 6 repeats


def test_a_store_of_the_first_schema_is_brought_up_to_date_with_its_ratings_kept(tmp_path):
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import create_engine

    from scoft.review.store import MIGRATIONS, open_store

    url = f"sqlite:///{tmp_path / 'old.db'}"
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with create_engine(url).begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0001")
    for query in ["insert into campaigns values ('c1', 'KOR', 'ab', '', 'e', '2026-01-01 00:00:00', 'open')",
                  "insert into images values ('i1', 'c1', 'scoft', 'a.png'), ('i2', 'c1', 'base', 'b.png')",
                  "insert into pairs values ('p1', 'c1', 'base', 'a prompt', 7, 'k1', 'i1', 'i2', 1)",
                  "insert into reviewers values ('r-1', 'c1', 'f00', '2026-01-01 00:00:00', null)",
                  "insert into ratings values (1, 'p1', 'r-1', 0, null, 0, 0, '2026-01-02 00:00:00')"]:
        _sql(url, query)
    open_store(url)
    assert _sql(url, "select version_num from alembic_version") == [("0002",)]
    assert _sql(url, "select pair_id, better from ratings") == [("p1", 0)]
    assert _sql(url, "select repeat_of, reviewer_id from pairs") == [(None, None)]


def test_a_production_without_kept_images_is_said_and_the_campaign_pairs_against_the_base(tmp_path):
    from scoft import registry

    ws = _workspace(tmp_path)
    (ws / "earlier").mkdir()
    (ws / "earlier/pytorch_lora_weights.safetensors").write_bytes(b"production")
    registry.promote(ws, "KOR", ws / "earlier", "rec0", by="alice", reason="by hand")  # no images kept
    out = scoft_here("review", "open", "--culture", "KOR", cwd=ws)
    assert out.returncode == 0 and "4 pairs (candidate" in out.stdout and "against base)" in out.stdout
    assert "no pairs against production: no images of it on these prompts were kept" in out.stdout


def test_people_decide_only_on_a_candidate_that_passed_the_rules(tmp_path):
    """Before, `review open` opened a campaign for a candidate still being trained or one the gate had
    just rejected, and the insiders' verdict promoted it with no lineage record."""
    from scoft import registry

    ws = _workspace(tmp_path)
    lora = ws / "models/lora/KOR/pytorch_lora_weights.safetensors"
    lora.write_bytes(b"retrained, not judged yet")  # the retrain run has not reached its promote step
    out = scoft_here("review", "open", "--culture", "KOR", cwd=ws)
    assert out.returncode == 1 and "has not been judged by the promotion rules" in out.stderr
    registry.reject(ws, "KOR", sha256_file(lora), "rec2", by="promotion rules (params.yaml)", reason="failed: gain")
    out = scoft_here("review", "open", "--culture", "KOR", cwd=ws)
    assert out.returncode == 1 and "was rejected by promotion rules" in out.stderr and "failed: gain" in out.stderr
    assert not (ws / "data/review/review.db").is_file() or _sql(f"sqlite:///{ws / 'data/review/review.db'}",
                                                                "select id from campaigns") == []
    with pytest.raises(registry.RegistryError, match="without a lineage record"):
        registry.promote(ws, "KOR", ws / "models/lora/KOR", "", by="insiders", reason="preferred")


def test_an_insiders_reject_of_what_was_promoted_by_hand_meanwhile_says_it_stays_and_how_to_roll_back(tmp_path):
    from scoft import registry

    ws = _workspace(tmp_path, kor_prompts=3)
    client, tokens, _ = _app(ws, invited=5)
    registry.promote(ws, "KOR", ws / "models/lora/KOR", "rec1", by="alice", reason="by hand")  # while reviewed
    _reviews(client, tokens, lambda k, cand, _: 1 - cand)  # the insiders prefer the base
    out = scoft_here("review", "close", "--culture", "KOR", cwd=ws)
    assert out.returncode == 0 and "rejected" in out.stdout
    assert "it is production already (promote by alice" in out.stdout and "scoft models rollback KOR" in out.stdout
    entry = registry.read(ws, "KOR")
    assert entry["history"][-1]["action"] == "reject" and entry["history"][-1]["lineage"] == "rec1"
    assert entry["production"]["by"] == "alice" and registry.history_problems(ws, "KOR") == []


def test_the_app_trusts_before_it_reads_and_validates_answers_exactly(tmp_path):
    """Found by a hostile probe: 100 MB bodies read whole before the token was checked (the server grew
    by 530 MB), a JSON array nested 100,000 deep gave a 500, `better: 1.0` was stored."""
    client, tokens, _ = _app(_workspace(tmp_path))
    auth = {"Authorization": f"Bearer {tokens[0]}"}
    big = b"[" * (2 * 2**20)
    assert client.post("/api/v1/ratings", content=big).status_code == 413  # refused unread, whoever sends it
    assert client.post("/api/v1/ratings", content=big, headers=auth).status_code == 413
    assert client.post(f"/r/{tokens[0]}/rate", content=big,
                       headers={"content-type": "application/x-www-form-urlencoded"}).status_code == 413
    assert client.post("/api/v1/ratings", json={"pair": "x"}).status_code == 401  # the token before the body
    deep = client.post("/api/v1/ratings", content=b"[" * 3000 + b"]" * 3000, headers=auth)
    assert deep.status_code in (400, 413) and deep.json()["error"]
    pair = client.get("/api/v1/next", headers=auth).json()["pair"]
    for better in (1.0, True, "1", -1):
        body = {"pair": pair, "better": better, "more_stereotyped": None, "offensive": [False, False]}
        assert client.post("/api/v1/ratings", json=body, headers=auth).status_code == 422, better
    assert sqlite3.connect(tmp_path / "data/review/review.db").execute("select count(*) from ratings").fetchone() == \
        (0,)


def test_no_inline_code_no_framing_secure_cookies_and_addresses_from_the_public_url(tmp_path):
    client, tokens, _ = _app(_workspace(tmp_path), public_url="https://review.example.org")
    page = client.get(f"/r/{tokens[0]}")
    policy = page.headers["content-security-policy"]
    assert "unsafe-inline" not in policy and "frame-ancestors 'none'" in policy
    assert page.headers["x-frame-options"] == "DENY" and "<script>" not in page.text and "<style>" not in page.text
    assert client.get("/static/review.js").headers["content-type"].startswith("text/javascript")
    assert "Secure" in page.headers["set-cookie"] and "HttpOnly" in page.headers["set-cookie"]
    shown = client.get("/api/v1/next", headers={"Authorization": f"Bearer {tokens[0]}", "Host": "evil.example"})
    assert all(url.startswith("https://review.example.org/img/") for url in shown.json()["images"])


def test_a_reviewers_repeated_pair_shows_its_images_to_that_reviewer_only(tmp_path):
    client, tokens, _ = _app(_workspace(tmp_path))
    url = f"sqlite:///{tmp_path / 'data/review/review.db'}"
    repeats = _sql(url, "select p.first_image, r.id from pairs p join reviewers r on r.id = p.reviewer_id "
                        "where p.repeat_of is not null")
    assert len(repeats) == 2
    from scoft.review.campaigns import token_hash

    by_token = {reviewer: t for t in tokens for reviewer, digest in _sql(url, "select id, token_sha256 from reviewers")
                if digest == token_hash(t)}
    (image, owner), (_, other) = repeats
    assert client.get(f"/img/{image}", headers={"Authorization": f"Bearer {by_token[owner]}"}).status_code == 200
    assert client.get(f"/img/{image}", headers={"Authorization": f"Bearer {by_token[other]}"}).status_code == 404
