"""The promote step: each culture's candidate LoRA judged by the rules of params.yaml, and the verdict
in the registry, the lineage record, the UI and the event stream. A candidate that passed every rule
can be sent on instead of promoted: to cultural insiders (a review campaign) or to one person's
approval in the Prefect UI (the approve-candidate flow, flows/approval.py); either way this run ends
and nothing waits here for people."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.events import emit_event

from scoft import registry
from scoft.config import PromotionParams, load_params
from scoft.io import write_json
from scoft.lineage import add_promotion, rewrite_record
from scoft.paths import PROMOTION_DIR
from scoft.promotion import RULES_BY, decision_markdown, failed_rules, hold_family, judge, record_verdict

PROMOTED, REJECTED = "scoft.model.promoted", "scoft.model.rejected"


def promotion_artifact_key(culture: str) -> str:
    return f"scoft-promotion-{culture.lower()}"


@task(name="judge")
def judge_candidate(workdir: str, culture: str, lineage_path: Path) -> dict:
    """The rules' decision on the culture's candidate (nothing written yet); a candidate judged before
    (same LoRA) keeps its verdict."""
    root = Path(workdir)
    decision = judge(root, culture, load_params(root / "params.yaml"), Path(lineage_path).stem)
    if "already_judged" in decision:
        get_run_logger().info("%s: LoRA %s was judged on %s (%s): nothing new", culture, decision["lora_sha256"][:12],
                              decision["already_judged"], "promoted" if decision["promote"] else "rejected")
    return decision


@task(name="promote")
def record_decision(workdir: str, culture: str, lineage_path: Path, decision: dict) -> dict:
    """Promote or reject as decided, and say so: registry, lineage record, artifact, event, log."""
    if "already_judged" in decision:
        return decision
    root = Path(workdir)
    signing_key = load_params(root / "params.yaml").lineage.signing_key
    decision = record_verdict(root, culture, decision, signing_key)
    _add_verdict(root, lineage_path, decision, signing_key)
    create_markdown_artifact(key=promotion_artifact_key(culture), markdown=decision_markdown(decision),
                             description=f"{culture}: the candidate LoRA against the promotion rules")
    failed = failed_rules(decision)
    review = decision.get("review")
    emit_event(event=PROMOTED if decision["promote"] else REJECTED,
               resource={"prefect.resource.id": f"scoft.model.{culture}.{decision['lora_sha256'][:16]}",
                         "prefect.resource.name": f"SCoFT LoRA {culture}", "scoft.culture": culture},
               payload={"culture": culture, "lora_sha256": decision["lora_sha256"], "lineage": decision["lineage"],
                        "failed_rules": failed, "review": review})
    why = "; ".join(failed) if failed else f"review: {review['comment']}" if review else ""
    get_run_logger().info("%s: %s%s", culture, "promoted to production" if decision["promote"] else "rejected",
                          f" ({why})" if why and not decision["promote"] else "")
    return decision


def _record_waiting(root: Path, culture: str, lineage_path: Path, decision: dict, reason: str) -> None:
    """A candidate that passed every rule and now waits for people: 'await' in the registry (production
    unchanged), reports/promotion/<C>.json and the lineage record's promotion say so."""
    registry.await_review(root, culture, decision["lora_sha256"], decision["lineage"], by=RULES_BY, reason=reason,
                          decision=decision)
    _report_waiting(root, culture, lineage_path, decision, reason)


def _report_waiting(root: Path, culture: str, lineage_path: Path, decision: dict, reason: str) -> None:
    """reports/promotion/<C>.json and the lineage record's promotion say the candidate waits for people."""
    write_json(root / PROMOTION_DIR / f"{culture}.json", decision)
    _add_verdict(root, lineage_path, decision, load_params(root / "params.yaml").lineage.signing_key)
    get_run_logger().info("%s: %s", culture, reason)


def _add_verdict(root: Path, lineage_path: Path, decision: dict, signing_key: str | None) -> None:
    """The lineage record with the verdict (or the wait) added, resealed and signed again."""
    record = json.loads(Path(lineage_path).read_text(encoding="utf-8"))
    rewrite_record(lineage_path, add_promotion(record, decision, root), root, signing_key)


@task(name="insider-review")
def send_to_insiders(workdir: str, culture: str, lineage_path: Path, decision: dict) -> dict:
    """promotion.insider_review: open the review campaign for a candidate that passed every rule, record
    it as awaiting insider review (registry, lineage, artifact) and return: no run waits for people."""
    from scoft.review.campaigns import open_campaign
    from scoft.review.store import open_store

    root = Path(workdir)
    params = load_params(root / "params.yaml")
    decision = {**decision, "promote": False}
    # first on record as judged and awaiting people: a campaign opens only on such a candidate
    registry.await_review(root, culture, decision["lora_sha256"], decision["lineage"], by=RULES_BY,
                          reason="every rule passed: awaiting insider review", decision=decision)
    with open_store(params.review.database_url, root)() as session:
        campaign, pairs = open_campaign(session, root, culture, joint=not params.train.lora_per_culture)
    decision["awaiting_insiders"] = campaign.id
    _report_waiting(root, culture, lineage_path, decision, f"awaiting insider review: campaign {campaign.id}, "
                                                          f"{pairs} pairs (scoft review invite/close)")
    create_markdown_artifact(key=f"scoft-review-{culture.lower()}", description=f"{culture}: insiders' review",
                             markdown=f"# {culture}: awaiting insider review\n\nCampaign `{campaign.id}`, {pairs} "
                             f"pairs of the candidate `{decision['lora_sha256'][:16]}` against the base model "
                             "(and production, where there is one). Invite reviewers with `scoft review invite "
                             f"--culture {culture} --count N` (links under {params.review.public_url}); `scoft "
                             f"review close --culture {culture}` decides once they have rated.\n")
    return decision


AWAITING_APPROVAL = "scoft.model.awaiting-approval"  # starts the approve-candidate deployment


@task(name="ask-for-approval")
def ask_for_approval(workdir: str, culture: str, lineage_path: Path, decision: dict) -> dict:
    """promotion.require_approval: record the candidate as awaiting approval and announce it; the
    approve-candidate flow, started by that event, suspends until a person answers in the Prefect UI.
    This run (and its GPU worker) goes on at once."""
    root = Path(workdir)
    decision = {**decision, "promote": False, "awaiting_approval": True}
    _record_waiting(root, culture, lineage_path, decision, "awaiting approval in the Prefect UI (the "
                                                           "approve-candidate flow run's Resume form)")
    create_markdown_artifact(key=promotion_artifact_key(culture),
                             markdown=decision_markdown(decision, awaiting_review=True),
                             description=f"{culture}: the candidate passed every rule and waits for approval")
    emit_event(event=AWAITING_APPROVAL,
               resource={"prefect.resource.id": f"scoft.model.{culture}.{decision['lora_sha256'][:16]}",
                         "prefect.resource.name": f"SCoFT LoRA {culture}", "scoft.culture": culture},
               payload={"culture": culture, "lora_sha256": decision["lora_sha256"], "lineage": decision["lineage"]})
    return decision


def promote_cultures(workdir: str, lineage_paths: dict[str, Path], rules: PromotionParams) -> dict[str, dict]:
    """The promote step inside the retrain flow: judge every culture's candidate, hold the primary test
    over them together (Holm: at most alpha of retrains ship a no-effect LoRA), send a candidate that
    passed every rule to insiders or to a person's approval when params.yaml asks, and record each verdict."""
    decisions = {c: judge_candidate(workdir, c, path) for c, path in lineage_paths.items()}
    decisions = hold_family(decisions, rules)
    for culture, decision in decisions.items():
        if rules.insider_review and decision["promote"] and "already_judged" not in decision:
            decisions[culture] = send_to_insiders(workdir, culture, lineage_paths[culture], decision)
            continue
        if rules.require_approval and decision["promote"] and "already_judged" not in decision:
            decisions[culture] = ask_for_approval(workdir, culture, lineage_paths[culture], decision)
            continue
        decisions[culture] = record_decision(workdir, culture, lineage_paths[culture], decision)
    return decisions


def promote_culture(workdir: str, culture: str, lineage_path: Path, rules: PromotionParams) -> dict:
    """One culture's promote step (a family of one)."""
    return promote_cultures(workdir, {culture: lineage_path}, rules)[culture]
