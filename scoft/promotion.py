"""The promotion gate: does a culture's candidate LoRA beat the base (and production) by enough to ship?

Every rule reads the culture's evaluation (reports/metrics/<C>.json: the base and the candidate on the
same held-out prompts and seeds, intervals by bootstrap over prompts) and gives an outcome with its
numbers; the candidate is promoted only when every rule passes. A rule that cannot be judged (too few
prompts for an interval, a metric the evaluation could not measure) fails: nothing ships unmeasured.
"""

from __future__ import annotations

import json
from pathlib import Path

from scoft import registry
from scoft.config import Params, PromotionParams
from scoft.evaluate import BASE
from scoft.io import sha256_file, sha256_json, write_json
from scoft.paths import CCUB_DIR, LORA_FILE, PROMOTION_DIR, culture_paths
from scoft.render import markdown_text

CANDIDATE = "scoft"  # the evaluate stage's name for the culture's new LoRA


def _rule(name: str, passed: bool, detail: str) -> dict:
    return {"rule": name, "passed": bool(passed), "detail": detail}


def failed_rules(decision: dict) -> list[str]:
    return [o["rule"] for o in decision["rules"] if not o["passed"]]


def _distance_gain(metrics: dict, culture: str) -> dict:
    """The candidate's paired improvement over the base in distance to the held-out images ({} if none)."""
    return metrics.get("per_culture", {}).get(culture, {}).get("improvement", {}).get(CANDIDATE) or {}


def _distance_rule(metrics: dict, culture: str, rules: PromotionParams) -> dict:
    """The distance to the held-out images: the paired improvement over the base, interval above the bar."""
    gain = _distance_gain(metrics, culture)
    name = "distance to held-out images better than the base"
    if gain.get("ci95_low") is None:
        why = (gain.get("insufficient") or metrics.get("per_culture", {}).get(culture, {}).get("insufficient")
               or "no paired improvement measured")
        return _rule(name, False, f"cannot be judged: {why}")
    return _rule(name, gain["ci95_low"] > rules.min_distance_gain,
                 f"improvement {gain['mean']:.4f} [{gain['ci95_low']:.4f}, {gain['ci95_high']:.4f}], "
                 f"its interval's low end must exceed {rules.min_distance_gain}")


def _retrieval_rule(metrics: dict, culture: str) -> dict:
    """Culture retrieval accuracy: not worse than the base beyond the interval of their paired difference."""
    improvement = metrics.get("retrieval_accuracy", {}).get("improvement", {})
    name = "retrieval accuracy not worse than the base"
    gain = improvement.get("per_culture", {}).get(culture, {}).get(CANDIDATE)
    if not gain or gain.get("ci95_high") is None:
        return _rule(name, False, "cannot be judged: no paired retrieval interval for this culture")
    return _rule(name, gain["ci95_high"] >= 0,
                 f"candidate minus base {gain['mean']:+.3f} [{gain['ci95_low']:+.3f}, {gain['ci95_high']:+.3f}]: "
                 "worse only when the whole interval is below 0")


def _memorisation_rule(metrics: dict, rules: PromotionParams) -> dict:
    block = metrics.get("memorisation", {}).get(CANDIDATE, {})
    name = "memorisation under the threshold"
    if "overall" not in block:
        return _rule(name, False, f"cannot be judged: {block.get('insufficient', 'not measured')}")
    share = block["overall"]["mean"]
    return _rule(name, share <= rules.max_memorisation,
                 f"share of images nearer a training image than held-out images are: {share:.3f}, "
                 f"at most {rules.max_memorisation}")


def _generic_rule(metrics: dict, rules: PromotionParams) -> dict:
    """Prompts naming no culture: the spread of retrieved cultures must not collapse."""
    models = metrics.get("generic_prompts", {}).get("models", {})
    name = "generic-prompt entropy not collapsed"
    if BASE not in models or CANDIDATE not in models:
        return _rule(name, False, "cannot be judged: no generic-prompt distribution")
    base, candidate = models[BASE]["entropy_bits"], models[CANDIDATE]["entropy_bits"]
    floor = rules.min_generic_entropy_ratio * base
    return _rule(name, candidate >= floor,
                 f"{candidate:.3f} bits against the base's {base:.3f} (at least {floor:.3f})")


def _production_rule(metrics: dict, culture: str, production: dict | None, evaluation_key: str) -> dict:
    """Against the current production LoRA: its improvement over the same base, measured on the same
    held-out records (same prompts and seeds), must be beaten beyond the candidate's interval."""
    name = "better than production"
    if production is None:
        return _rule(name, True, "no production LoRA yet")
    if production.get("decision", {}).get("evaluation_key") != evaluation_key:
        return _rule(name, True, "not comparable: production was evaluated on other held-out records (judged "
                                 "against the base only)")
    gain = _distance_gain(metrics, culture)
    bar = production.get("decision", {}).get("distance_gain")
    if gain.get("ci95_low") is None or bar is None:
        return _rule(name, False, "cannot be judged: an improvement without an interval")
    return _rule(name, gain["ci95_low"] > bar,
                 f"candidate's improvement interval low end {gain['ci95_low']:.4f} against production's "
                 f"improvement {bar:.4f} on the same held-out records")


def decide(metrics: dict, culture: str, rules: PromotionParams, production: dict | None,
           evaluation_key: str) -> dict:
    """Every rule's outcome and the decision: promote only when all pass."""
    outcomes = [_distance_rule(metrics, culture, rules), _retrieval_rule(metrics, culture),
                _memorisation_rule(metrics, rules), _generic_rule(metrics, rules),
                _production_rule(metrics, culture, production, evaluation_key)]
    return {"culture": culture, "promote": all(o["passed"] for o in outcomes), "rules": outcomes,
            "distance_gain": _distance_gain(metrics, culture).get("mean"), "evaluation_key": evaluation_key}


def decision_markdown(decision: dict, awaiting_review: bool = False) -> str:
    """What an operator (or the reviewer asked to approve) reads at a glance in the Prefect UI."""
    verdict = "AWAITING REVIEW" if awaiting_review else "PROMOTED" if decision["promote"] else "REJECTED"
    lines = [f"# {decision['culture']}: {verdict}", "", "| rule | outcome | detail |", "|---|---|---|"]
    lines += [f"| {o['rule']} | {'pass' if o['passed'] else '**fail**'} | {markdown_text(o['detail'])} |"
              for o in decision["rules"]]
    review = decision.get("review")
    if awaiting_review:
        lines += ["", "Every rule passed. Approve or reject in this flow run's Resume form, with a comment."]
    elif review and review["approve"] is None:
        lines += ["", f"No review came in time: nothing promoted ({markdown_text(review['comment'])})."]
    elif review:
        verdict = "approved" if review["approve"] else "rejected"
        lines += ["", f"Review by {markdown_text(review['reviewer'])}: {verdict}, {markdown_text(review['comment'])}"]
    return "\n".join(lines) + "\n"


def evaluation_key(params: Params, ccub_dir: str | Path, culture: str) -> str:
    """What makes two evaluations of a culture comparable prompt by prompt: its held-out records, the
    base model, the sampler and seeds, and the judging backbone."""
    from scoft.ccub import read_heldout

    held = sorted((r.id, r.sha256, r.caption) for r in read_heldout(ccub_dir) if r.culture == culture)
    return sha256_json({"heldout": held, "model": params.model.model_dump(), "evaluate": params.evaluate.model_dump(),
                        "backbone": params.features.evaluation})[:16]


RULES_BY = "promotion rules (params.yaml)"


def judge(root: str | Path, culture: str, params: Params, lineage_key: str) -> dict:
    """Judge a culture's candidate LoRA (models/lora/<C>, or models/lora/joint when it serves every
    culture) on its evaluation, writing nothing. A candidate already judged (same LoRA bytes) is not
    judged again: its decision comes back with `already_judged` (when)."""
    root = Path(root)
    paths = culture_paths(culture, joint=not params.train.lora_per_culture)
    digest = sha256_file(root / paths["lora"] / LORA_FILE)
    entry = registry.read(root, culture)
    judged = [e for e in entry["history"] if e["lora_sha256"] == digest and "decision" in e]
    if judged:
        return {**judged[-1]["decision"], "already_judged": judged[-1]["at"]}
    metrics = json.loads((root / paths["metrics"]).read_text(encoding="utf-8"))
    decision = decide(metrics, culture, params.promotion, entry["production"],
                      evaluation_key(params, root / CCUB_DIR, culture))
    decision["lora_sha256"], decision["lineage"], decision["lora_dir"] = digest, lineage_key, str(paths["lora"])
    return decision


def with_review(decision: dict, approve: bool | None, reviewer: str, comment: str) -> dict:
    """The decision after a reviewer's answer (`approve` None: none came in time). The rules' verdict
    stands in `rules`; `promote` is the outcome: every rule passed and the reviewer approved."""
    review = {"approve": approve, "reviewer": reviewer, "comment": comment}
    return {**decision, "promote": bool(decision["promote"] and approve), "review": review}


def record_verdict(root: str | Path, culture: str, decision: dict) -> dict:
    """Promote the judged candidate or record its rejection in the registry (by the rules, or by the
    reviewer when the decision has a review), and write reports/promotion/<C>.json."""
    root = Path(root)
    review = decision.get("review")
    if review is None:
        by = RULES_BY
        reason = "every rule passed" if decision["promote"] else "failed: " + "; ".join(failed_rules(decision))
    elif review["approve"] is None:
        by, reason = RULES_BY, f"no reviewer answered within the approval time-out ({review['comment']})"
    else:
        verdict = "approved" if review["approve"] else "rejected"
        by, reason = review["reviewer"] or "reviewer", review["comment"] or verdict
    if decision["promote"]:
        registry.promote(root, culture, root / decision["lora_dir"], decision["lineage"], by=by,
                         reason=reason, decision=decision)
    else:
        registry.reject(root, culture, decision["lora_sha256"], decision["lineage"], by=by, reason=reason,
                        decision=decision)
    write_json(root / PROMOTION_DIR / f"{culture}.json", decision)
    return decision


def gate(root: str | Path, culture: str, params: Params, lineage_key: str) -> dict:
    """The promote step of one culture without review: judge its candidate and record the verdict."""
    decision = judge(root, culture, params, lineage_key)
    return decision if "already_judged" in decision else record_verdict(root, culture, decision)
