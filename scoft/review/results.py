"""What insiders said about a campaign: the share of ratings preferring the candidate, with an interval
that respects how ratings cluster (by reviewer and by prompt), agreement between reviewers, and the
stereotype answers and offensive flags with their prompts.

A rating's positions (0, 1) are turned into "the candidate" or "the other model" through the pair's
drawn order; "can't tell" counts as half a preference (a tie). A pair rated twice by one reviewer
counts once, by its last answer. Each reviewer's repeated pair (shown again, images swapped) counts
only towards their self-consistency: whether they said the same of it both times.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from scoft.paths import BASE, PRODUCTION
from scoft.render import markdown_text
from scoft.review.campaigns import REVIEW_DIR
from scoft.review.store import Campaign, Pair, Rating, Reviewer
from scoft.stats import two_way_cluster_bootstrap_ci

BOOTSTRAP, SEED = 2000, 0


def last_answers(session: Session, campaign: Campaign) -> list[tuple[Rating, Pair]]:
    """Each reviewer's last answer to each pair of the campaign, revoked reviewers' included (what they
    said before being revoked was said)."""
    rows = session.execute(select(Rating, Pair).join(Pair, Rating.pair_id == Pair.id)
                           .where(Pair.campaign_id == campaign.id).order_by(Rating.id)).all()
    last = {(r.reviewer_id, p.id): (r, p) for r, p in rows}
    return list(last.values())


def _for_candidate(position: int | None, candidate_first: bool) -> float:
    """1 when the position is the candidate's, 0 the other's, 0.5 for can't tell."""
    if position is None:
        return 0.5
    return 1.0 if (position == 0) == candidate_first else 0.0


COMPARISONS = ("candidate_vs_base", "candidate_vs_production")


def comparisons(results: dict) -> list[tuple[str, dict]]:
    """(the candidate's opponent, its block) for each comparison the campaign has."""
    return [(name.removeprefix("candidate_vs_"), results[name]) for name in COMPARISONS if name in results]


def outcome(verdict: dict) -> str:
    return "still open" if not verdict["decided"] else "promoted" if verdict["promote"] else "rejected"


def campaign_results(session: Session, campaign: Campaign) -> dict:
    """What insiders said, by comparison (`candidate_vs_base`, and `candidate_vs_production` where the
    campaign has pairs against production), with each reviewer's self-consistency and the offensive flags."""
    answers = last_answers(session, campaign)
    shown = [(r, p) for r, p in answers if p.repeat_of is None]
    flags = [{"prompt": p.prompt, "model": "candidate" if (first == p.candidate_first) else "other",
              "reviewer": r.reviewer_id}
             for r, p in shown for first, flagged in ((True, r.offensive_first), (False, r.offensive_second))
             if flagged]
    comparisons = {f"candidate_vs_{other}": _comparison([(r, p) for r, p in shown if p.comparison == other])
                   for other in (BASE, PRODUCTION) if other == BASE or any(p.comparison == other for _, p in shown)}
    return {
        "campaign": campaign.id, "culture": campaign.culture, "status": campaign.status,
        "candidate_sha256": campaign.candidate_sha256, "lineage": campaign.lineage, **comparisons,
        "self_consistency": _self_consistency(answers),
        "offensive": {"candidate": sum(f["model"] == "candidate" for f in flags),
                      "other": sum(f["model"] == "other" for f in flags), "flags": flags},
        "invited": len(session.scalars(select(Reviewer.id).where(Reviewer.campaign_id == campaign.id)).all()),
        "pairs": len(session.scalars(select(Pair.id).where(Pair.campaign_id == campaign.id,
                                                          Pair.repeat_of.is_(None))).all()),
    }


def _comparison(answers: list[tuple[Rating, Pair]]) -> dict:
    """The share of answers preferring the candidate, its interval clustered by reviewer and by prompt
    (the held-out record), reviewers, ratings, agreement and the stereotype answers."""
    reviewers = sorted({r.reviewer_id for r, _ in answers})
    preference = np.array([_for_candidate(r.better, p.candidate_first) for r, p in answers])
    stereotyped = np.array([_for_candidate(r.more_stereotyped, p.candidate_first) for r, p in answers])
    interval = two_way_cluster_bootstrap_ci(preference, np.array([r.reviewer_id for r, _ in answers]),
                                            np.array([p.record for _, p in answers]), BOOTSTRAP, SEED) \
        if answers else None
    return {"preference": float(preference.mean()) if answers else None,
            "interval": list(interval) if interval else None, "reviewers": len(reviewers), "ratings": len(answers),
            "agreement_alpha": _agreement(answers, reviewers),
            "candidate_more_stereotyped": float(stereotyped.mean()) if answers else None}


def _self_consistency(answers: list[tuple[Rating, Pair]]) -> dict:
    """For each reviewer who answered their repeated pair and its first showing: whether both answers
    name the same model as better (or both say can't tell); and the share of reviewers who did."""
    said = {(r.reviewer_id, p.id): _for_candidate(r.better, p.candidate_first) for r, p in answers}
    by_reviewer = {r.reviewer_id: said[(r.reviewer_id, p.repeat_of)] == said[(r.reviewer_id, p.id)]
                   for r, p in answers if p.repeat_of is not None and (r.reviewer_id, p.repeat_of) in said}
    return {"reviewers": dict(sorted(by_reviewer.items())),
            "share": sum(by_reviewer.values()) / len(by_reviewer) if by_reviewer else None}


def _agreement(answers: list[tuple[Rating, Pair]], reviewers: list[str]) -> float | None:
    """Krippendorff's alpha (nominal) on which image each reviewer preferred (candidate, other, can't
    tell), pairs rated by two or more reviewers; None where it is undefined."""
    import krippendorff

    pairs = sorted({p.id for _, p in answers})
    table = np.full((len(reviewers), len(pairs)), np.nan)
    row, col = {r: i for i, r in enumerate(reviewers)}, {p: j for j, p in enumerate(pairs)}
    for r, p in answers:
        table[row[r.reviewer_id], col[p.id]] = _for_candidate(r.better, p.candidate_first) * 2  # 0, 1, 2
    rated_twice = (~np.isnan(table)).sum(axis=0) >= 2
    if len(reviewers) < 2 or rated_twice.sum() < 1 or len(np.unique(table[:, rated_twice][~np.isnan(
            table[:, rated_twice])])) < 2:
        return None
    return float(krippendorff.alpha(reliability_data=table[:, rated_twice], level_of_measurement="nominal"))


def insiders_verdict(results: dict, rules, deadline_passed: bool) -> dict:
    """The insiders' gate on a campaign's results (review.* rules): `decided` False while it waits for
    reviews before its deadline; otherwise `promote` and the reason the registry's history keeps."""
    c = results["candidate_vs_base"]
    said = (f"insiders: {c['preference']:.2f} [{c['interval'][0]:.2f}, {c['interval'][1]:.2f}], "
            if c["interval"] else "insiders: no interval, ") + f"{c['reviewers']} reviewers, {c['ratings']} ratings"
    if c["reviewers"] < rules.min_reviewers or c["interval"] is None:
        if not deadline_passed:
            return {"decided": False, "promote": False, "reason": f"{said}; waiting for promotion.min_reviewers "
                                                                  f"({rules.min_reviewers})"}
        return {"decided": True, "promote": False, "reason": f"not enough reviews by the deadline ({said})"}
    outcomes = [
        {"rule": "insiders prefer it", "passed": c["interval"][0] > rules.min_insider_preference,
         "detail": f"lower bound {c['interval'][0]:.3f}, promotion.min_insider_preference "
                   f"{rules.min_insider_preference}"},
        {"rule": "offensive flags", "passed": results["offensive"]["candidate"] <= rules.max_offensive_flags,
         "detail": f"{results['offensive']['candidate']} on the candidate's images, at most "
                   f"{rules.max_offensive_flags}"},
    ]
    if (versus := results.get("candidate_vs_production")) is not None:
        # production stays unless insiders prefer the candidate to it at least as often as not
        upper = versus["interval"][1] if versus["interval"] else None
        outcomes.append({"rule": "not worse than production", "passed": upper is not None and upper >= 0.5,
                         "detail": f"candidate over production {versus['preference']:.2f}, upper bound "
                                   f"{upper:.3f} (at least 0.5)" if upper is not None else "no ratings of it"})
    failed = [o["rule"] for o in outcomes if not o["passed"]]
    return {"decided": True, "promote": not failed, "rules": outcomes,
            "reason": said + (f"; failed: {', '.join(failed)}" if failed else "")}


def _into_lineage(root, key: str, decision: dict, signing_key: str | None) -> None:
    """The insiders' decision, results and the export's hash into the candidate's lineage record (resealed,
    and signed again where signing is configured), so that `scoft lineage verify` checks the export."""
    from scoft.lineage import LINEAGE_DIR, read_record, rewrite_record

    path = root / LINEAGE_DIR / f"{key}.json"
    if not key or not path.is_file():
        return
    record = read_record(str(path))
    files = {**record.get("files", {}), "insiders review": decision["insiders"]["export"]}
    rewrite_record(path, {**record, "insiders": {k: decision[k] for k in ("promote", "rules")} |
                          {"results": {k: v for k, v in decision["insiders"].items() if k != "export"}},
                          "files": files}, root, signing_key)


def close_campaign(session: Session, root, culture: str, params) -> dict:
    """Judge the culture's open campaign now: enough reviews (or its deadline passed) decide, through the
    registry like the automatic gate (promote or reject, the history saying why); the campaign closes.
    Otherwise it stays open and the verdict says what it waits for."""
    import datetime as dt

    from scoft import registry
    from scoft.io import sha256_file
    from scoft.paths import LORA_FILE, culture_paths
    from scoft.promotion import promote_judged
    from scoft.review.campaigns import open_campaign_of

    campaign = open_campaign_of(session, culture)
    results = campaign_results(session, campaign)
    opened = campaign.opened_at if campaign.opened_at.tzinfo else campaign.opened_at.replace(tzinfo=dt.UTC)
    deadline_passed = dt.datetime.now(dt.UTC) > opened + dt.timedelta(days=params.review.deadline_days)
    verdict = insiders_verdict(results, params.promotion, deadline_passed)
    if not verdict["decided"]:
        return {**verdict, "results": results}
    root = Path(root)
    lora_dir = culture_paths(culture, not params.train.lora_per_culture)["lora"]
    current = root / lora_dir / LORA_FILE
    by = f"insiders (review campaign {campaign.id})"
    decision = {"promote": verdict["promote"], "insiders": {**results["candidate_vs_base"],
                "offensive": {k: results["offensive"][k] for k in ("candidate", "other")},
                "self_consistency": results["self_consistency"]["share"],
                **({"versus_production": results["candidate_vs_production"]}
                   if "candidate_vs_production" in results else {})},
                "rules": verdict.get("rules", []), "lineage": campaign.lineage,
                "lora_sha256": campaign.candidate_sha256, "lora_dir": str(lora_dir)}
    if verdict["promote"] and (not current.is_file() or sha256_file(current) != campaign.candidate_sha256):
        verdict = {**verdict, "promote": False, "reason": f"{verdict['reason']}; but {lora_dir} is no longer the "
                                                          "reviewed LoRA (retrained since): nothing promoted"}
        decision["promote"] = False
    export = REVIEW_DIR / culture / f"{campaign.id}.csv"
    decision["insiders"]["export"] = {str(export): export_csv(session, campaign, root / export)}
    _into_lineage(root, campaign.lineage, decision, params.lineage.signing_key)
    production = registry.read(root, culture)["production"]
    in_production = production is not None and production["lora_sha256"] == campaign.candidate_sha256
    if in_production:  # someone promoted it by hand while the insiders were still reviewing it
        said = (f"it is production already ({production['action']} by {production['by']} at {production['at']})")
        if verdict["promote"]:
            verdict = {**verdict, "reason": f"{verdict['reason']}; {said}: nothing to do"}
        else:
            verdict = {**verdict, "reason": f"{verdict['reason']}; but {said}, and stays so until someone rolls it "
                                            f"back: `scoft models rollback {culture} --reason ...`"}
    if verdict["promote"] and not in_production:
        promote_judged(root, culture, str(lora_dir), campaign.lineage, by, verdict["reason"], decision,
                       params.lineage.signing_key, campaign.evaluation)
    elif not verdict["promote"]:
        registry.reject(root, culture, campaign.candidate_sha256, campaign.lineage, by=by, reason=verdict["reason"],
                        decision=decision)
    campaign.status = "closed"
    session.commit()
    return {**verdict, "results": results}


EXPORT_COLUMNS = ["campaign", "reviewer", "pair", "repeat_of", "record", "prompt", "seed", "comparison",
                  "candidate_position", "better", "more_stereotyped", "offensive_first", "offensive_second", "at"]


def export_csv(session: Session, campaign: Campaign, path) -> str:
    """Every rating of the campaign (none is ever deleted), reviewers by their pseudonymous ids, as CSV
    written whole; returns its sha256, which the lineage record keeps."""
    import csv
    import io

    from scoft.io import atomic_write_text, sha256_file

    rows = session.execute(select(Rating, Pair).join(Pair, Rating.pair_id == Pair.id)
                           .where(Pair.campaign_id == campaign.id).order_by(Rating.id)).all()
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(EXPORT_COLUMNS)
    for r, p in rows:
        writer.writerow([campaign.id, r.reviewer_id, p.id, p.repeat_of or "", p.record, p.prompt, p.seed, p.comparison,
                         0 if p.candidate_first else 1, "" if r.better is None else r.better,
                         "" if r.more_stereotyped is None else r.more_stereotyped, int(r.offensive_first),
                         int(r.offensive_second), r.at.isoformat()])
    atomic_write_text(path, out.getvalue())
    return sha256_file(path)


_RESULTS_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>{{ r.culture }}: insiders' review</title>
<style>body{font-family:sans-serif;max-width:52rem;margin:1rem auto;padding:0 1rem}
table{border-collapse:collapse;width:100%}td,th{border-bottom:1px solid #ddd;padding:.35rem;text-align:left}
.bar{position:relative;height:.9rem;background:#eee;width:12rem}.ci{position:absolute;height:100%;background:#9bc}
.mid{position:absolute;left:50%;height:100%;border-left:1px dashed #333}.pt{position:absolute;height:100%;
border-left:3px solid #124}</style></head><body>
<h1>{{ r.culture }}: insiders' review</h1>
<p>Campaign <code>{{ r.campaign }}</code> ({{ r.status }}), candidate LoRA <code>{{ r.candidate_sha256[:16] }}</code>,
{{ r.invited }} reviewers invited.</p>
<table><tr><th>candidate against</th><th>preferred</th><th>95% interval (reviewers and prompts resampled)</th>
<th>reviewers</th><th>ratings</th><th>agreement (alpha)</th><th>candidate more stereotyped</th></tr>
{% for name, c in comparisons %}<tr><td>{{ name }}</td>
<td>{{ "%.2f"|format(c.preference) if c.preference is not none else "no ratings" }}</td>
<td>{% if c.interval %}<div class="bar">
<div class="ci" style="left:{{ 100 * c.interval[0] }}%;width:{{ 100 * (c.interval[1] - c.interval[0]) }}%"></div>
<div class="mid"></div><div class="pt" style="left:{{ 100 * c.preference }}%"></div></div>
[{{ "%.2f"|format(c.interval[0]) }}, {{ "%.2f"|format(c.interval[1]) }}]{% else %}none{% endif %}</td>
<td>{{ c.reviewers }}</td><td>{{ c.ratings }}</td>
<td>{{ "%.2f"|format(c.agreement_alpha) if c.agreement_alpha is not none else "undefined" }}</td>
<td>{{ "%.2f"|format(c.candidate_more_stereotyped) if c.candidate_more_stereotyped is not none else "" }}</td></tr>
{% endfor %}</table>
<p>How to read this: <b>preferred</b> is the share of answers that chose the candidate's picture (a "can't
tell" counts half); the candidate is better when the whole interval is above 0.5 (the dashed line).
<b>Agreement (alpha)</b> is Krippendorff's alpha: 1 when reviewers answer every pair alike, 0 when they agree
no more than chance would, below 0 when they disagree more than chance; low agreement with a clear preference
means reviewers differ pair by pair but lean the same way overall.{% if min_reviewers %} The gate decides
once {{ min_reviewers }} reviewers have rated: {{ rated_by }} have{% if rated_by < min_reviewers %}, so it waits
for {{ min_reviewers - rated_by }} more{% endif %}.{% endif %}</p>
<h2>Self-consistency on a repeated pair</h2>
<p>{{ consistent }} of {{ r.self_consistency.reviewers|length }} reviewers gave the same answer both times.</p>
<ul>{% for who, same in r.self_consistency.reviewers.items() %}<li>{{ who }}: {{ "same answer" if same
else "changed answer" }}</li>{% endfor %}</ul>
<h2>Offensive flags</h2><p>{{ r.offensive.candidate }} on the candidate's images, {{ r.offensive.other }} on the
other model's.</p>
<ul>{% for f in r.offensive.flags %}<li>{{ f.model }}: {{ f.prompt }}</li>{% endfor %}</ul>
</body></html>"""


def results_page(results: dict, min_reviewers: int | None = None) -> str:
    """The results as an HTML page for the team running the review (never shown to reviewers): each
    comparison's preference and interval drawn against 0.5, agreement (explained), self-consistency,
    flags, and how many reviewers the gate still needs (promotion.min_reviewers). Autoescaped: prompts
    come from the community's captions."""
    from jinja2 import Environment, select_autoescape

    env = Environment(autoescape=select_autoescape(default=True))
    rated_by = max((c["reviewers"] for _, c in comparisons(results)), default=0)
    return env.from_string(_RESULTS_PAGE).render(r=results, comparisons=comparisons(results),
                                                 consistent=sum(results["self_consistency"]["reviewers"].values()),
                                                 min_reviewers=min_reviewers, rated_by=rated_by)


def campaign_markdown(results: dict, verdict: dict, public_url: str) -> str:
    """The campaign as operators see it in the Prefect UI (the scoft-review-<c> artifact): where reviewers
    go, how far they got, what they said so far and what the gate decided or waits for."""
    rated = sum(c["ratings"] for _, c in comparisons(results))
    expected = results["invited"] * results["pairs"]
    lines = [f"# {results['culture']}: {outcome(verdict)}", "",
             f"Campaign `{results['campaign']}` ({results['status']}): {rated} of {expected} ratings"
             f" from {results['invited']} invited reviewers ({results['pairs']} pairs each); the app: "
             f"{public_url}", "", "| candidate against | preferred | 95% interval | reviewers | ratings |",
             "|---|---|---|---|---|"]
    for opponent, c in comparisons(results):
        shown = f"{c['preference']:.2f}" if c["preference"] is not None else "no ratings yet"
        interval = f"[{c['interval'][0]:.2f}, {c['interval'][1]:.2f}]" if c["interval"] else ""
        lines.append(f"| {opponent} | {shown} | {interval} | {c['reviewers']} | {c['ratings']} |")
    consistent = results["self_consistency"]["reviewers"]
    lines += ["", f"Self-consistent on their repeated pair: {sum(consistent.values())} of {len(consistent)} "
                  f"reviewers. Offensive flags: {results['offensive']['candidate']} on the candidate's images.",
              "", markdown_text(verdict["reason"]), ""]
    return "\n".join(lines)
