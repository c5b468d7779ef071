"""The promotion gate: does a culture's candidate LoRA beat the base (and production) by enough to ship?

Every rule reads the culture's evaluation (reports/metrics/<C>.json: the base and the candidate on the
same held-out prompts and seeds, per-prompt gains with their categories) and gives an outcome with its
numbers; the candidate is promoted only when every rule passes. The primary rule is a one-sided paired
sign-flip test held over the cultures of one retrain by Holm's step-down (`hold_family`), so that its
false-promotion rate is known (bench/gate_power.py); the others can each fail on their own evidence.
A rule that cannot be judged (too few prompts, a metric the evaluation could not measure, production
not measurable on the current held-out records) fails: nothing ships unmeasured.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from scoft import registry
from scoft.config import Params, PromotionParams
from scoft.io import sha256_file, sha256_json, write_json
from scoft.paths import BASE, CANDIDATE, CCUB_DIR, LORA_FILE, PROMOTION_DIR, culture_paths
from scoft.render import markdown_text
from scoft.stats import holm, sign_flip_p, sign_flip_units, smallest_p
from scoft.text import visible


def _rule(name: str, passed: bool, detail: str) -> dict:
    return {"rule": name, "passed": bool(passed), "detail": detail}


def failed_rules(decision: dict) -> list[str]:
    return [o["rule"] for o in decision["rules"] if not o["passed"]]


def _block(metrics: dict, culture: str) -> dict:
    return metrics.get("per_culture", {}).get(culture, {})


def _distance_gain(metrics: dict, culture: str) -> dict:
    """The candidate's paired improvement over the base in distance to the held-out images ({} if none)."""
    return _block(metrics, culture).get("improvement", {}).get(CANDIDATE) or {}


SIGNIFICANCE = "distance to held-out images better than the base"


def significance(metrics: dict, culture: str, rules: PromotionParams) -> dict:
    """The primary test's inputs and one-sided p (H0: mean gain <= min_gain), or why it has none."""
    gain = _distance_gain(metrics, culture)
    if not gain.get("gains"):
        return {"p": None, "why": (gain.get("insufficient") or _block(metrics, culture).get("insufficient")
                                   or "no per-prompt gains measured")}
    gains = np.asarray(gain["gains"]) - rules.min_gain
    clusters = np.asarray(gain["categories"]) if rules.test_unit == "category" and "categories" in gain else None
    units = sign_flip_units(clusters, len(gains))
    p = sign_flip_p(gains, clusters)
    return {"p": p, "units": units, "unit": rules.test_unit, "why": f"{units} {rules.test_unit}(s): a sign-flip "
            "test needs 2", **{k: gain.get(k) for k in ("mean", "ci95_low", "ci95_high")}}


def _significance_rule(sig: dict, rules: PromotionParams, family: int = 1, p_adjusted: float | None = None) -> dict:
    """The primary rule: the one-sided sign-flip test of the per-prompt gains, Holm-adjusted over the
    `family` of cultures judged together (p_adjusted; alone, the raw p)."""
    if sig["p"] is None:
        return _rule(SIGNIFICANCE, False, f"cannot be judged: {sig['why']}")
    adjusted = sig["p"] if p_adjusted is None else p_adjusted
    floor = smallest_p(sig["units"])
    reachable = "" if floor <= rules.alpha / family else \
        f"; {sig['units']} {sig['unit']}s cannot reach it (smallest p {floor:.3g})"
    interval = "" if sig["ci95_low"] is None else f" [{sig['ci95_low']:.4f}, {sig['ci95_high']:.4f}]"
    return _rule(SIGNIFICANCE, adjusted <= rules.alpha,
                 f"gain {sig['mean']:.4f}{interval} over {sig['units']} {sig['unit']}s; one-sided p {sig['p']:.3g}, "
                 f"Holm over {family} culture(s) {adjusted:.3g}, at most {rules.alpha} "
                 f"(H0: gain <= {rules.min_gain}){reachable}")


def _coverage_rule(metrics: dict, culture: str) -> dict:
    """Every category the culture trains on has held-out records: what is not judged is not passed."""
    name = "every trained category judged"
    coverage = metrics.get("coverage", {}).get(culture)
    if coverage is None:
        return _rule(name, False, "cannot be judged: the evaluation reports no category coverage")
    unjudged = coverage["unjudged"]
    return _rule(name, not unjudged, f"no held-out record for {', '.join(unjudged)}" if unjudged
                 else f"held-out records in each of {', '.join(coverage['trained'])}")


def _retrieval_rule(metrics: dict, culture: str) -> dict:
    """Culture retrieval accuracy (secondary): not worse than the base beyond the interval of their
    paired difference."""
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
    base = metrics.get("memorisation", {}).get(BASE, {}).get("overall", {}).get("mean")
    against = "" if base is None else f" (base {base:.3f})"
    return _rule(name, share <= rules.max_memorisation,
                 f"share of images nearer a training image than 90% of held-out images are: {share:.3f}{against}, "
                 f"at most {rules.max_memorisation}")


def _generic_rule(metrics: dict, culture: str, rules: PromotionParams) -> dict:
    """Prompts naming no culture must not be taken over by the candidate's culture."""
    models = metrics.get("generic_prompts", {}).get("models", {})
    name = "generic prompts not taken over by the culture"
    if BASE not in models or CANDIDATE not in models:
        return _rule(name, False, "cannot be judged: no generic-prompt distribution")
    base = models[BASE]["shares"].get(culture, 0.0)
    candidate = models[CANDIDATE]["shares"].get(culture, 0.0)
    return _rule(name, candidate - base <= rules.max_generic_takeover,
                 f"generic images drawn as {culture}: {candidate:.2f} against the base's {base:.2f} (rise at most "
                 f"{rules.max_generic_takeover}); entropy {models[CANDIDATE]['entropy_bits']:.3f} bits against "
                 f"{models[BASE]['entropy_bits']:.3f}")


def candidate_distances(metrics: dict, culture: str) -> dict[str, float]:
    """The candidate's per-prompt distances by held-out record id ({} when not reported)."""
    return (_block(metrics, culture).get("distances") or {}).get(CANDIDATE, {})


def _production_rule(metrics: dict, culture: str, production: dict | None, production_distances: dict | None,
                     rules: PromotionParams) -> dict:
    """Against the current production LoRA, prompt by prompt on the current held-out records (production
    measured again when it was judged on others): a one-sided sign-flip test at alpha."""
    name = "better than production"
    if production is None:
        return _rule(name, True, "no production LoRA yet")
    candidate = candidate_distances(metrics, culture)
    if not production_distances or not candidate:
        return _rule(name, False, "cannot be judged: production has no distances on the current held-out records")
    shared = sorted(set(candidate) & set(production_distances))
    if set(shared) != set(candidate):
        return _rule(name, False, "cannot be judged: production was measured on other held-out records")
    gains = np.array([production_distances[k] - candidate[k] for k in shared])
    p = sign_flip_p(gains)
    if p is None:
        return _rule(name, False, f"cannot be judged: {len(gains)} prompt(s)")
    return _rule(name, p <= rules.alpha, f"candidate closer than production by {gains.mean():.4f} on {len(gains)} "
                                         f"prompts, one-sided p {p:.3g}, at most {rules.alpha}")


def decide(metrics: dict, culture: str, rules: PromotionParams, production: dict | None,
           evaluation_key: str, production_distances: dict | None = None) -> dict:
    """Every rule's outcome and the decision: promote only when all pass. Judged alone (a family of one);
    `hold_family` then holds the primary test over the cultures of one retrain."""
    sig = significance(metrics, culture, rules)
    outcomes = [_significance_rule(sig, rules), _coverage_rule(metrics, culture),
                _retrieval_rule(metrics, culture), _memorisation_rule(metrics, rules),
                _generic_rule(metrics, culture, rules),
                _production_rule(metrics, culture, production, production_distances, rules)]
    return {"culture": culture, "promote": all(o["passed"] for o in outcomes), "rules": outcomes,
            "distance_gain": _distance_gain(metrics, culture).get("mean"), "significance": sig,
            "distances": candidate_distances(metrics, culture), "evaluation_key": evaluation_key,
            "thresholds": rules.model_dump()}


def hold_family(decisions: dict[str, dict], rules: PromotionParams) -> dict[str, dict]:
    """The primary test over the cultures judged together (one retrain): Holm's step-down on their
    p-values, so that the chance that any no-effect LoRA of the retrain reaches production stays at
    most alpha. Decisions judged before (already_judged) keep their verdict and are not in the family."""
    fresh = {c: d for c, d in decisions.items() if "already_judged" not in d}
    adjusted = holm({c: d["significance"]["p"] for c, d in fresh.items()})
    out = dict(decisions)
    for culture, d in fresh.items():
        rule = _significance_rule(d["significance"], rules, len(fresh), adjusted[culture])
        outcomes = [rule, *d["rules"][1:]]
        out[culture] = {**d, "rules": outcomes, "promote": all(o["passed"] for o in outcomes),
                        "p_holm": adjusted[culture], "family": sorted(fresh)}
    return out


def decision_markdown(decision: dict, awaiting_review: bool = False) -> str:
    """What an operator (or the reviewer asked to approve) reads at a glance in the Prefect UI."""
    verdict = "AWAITING REVIEW" if awaiting_review else "PROMOTED" if decision["promote"] else "REJECTED"
    lines = [f"# {decision['culture']}: {verdict}", "", "| rule | outcome | detail |", "|---|---|---|"]
    lines += [f"| {o['rule']} | {'pass' if o['passed'] else '**fail**'} | {markdown_text(o['detail'])} |"
              for o in decision["rules"]]
    review = decision.get("review")
    if awaiting_review:
        lines += ["", "Every rule passed. Approve or reject in the approve-candidate flow run's Resume form, with a "
                  "comment."]
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
    key = evaluation_key(params, root / CCUB_DIR, culture)
    decision = decide(metrics, culture, params.promotion, entry["production"], key,
                      production_distances(root, culture, params, entry["production"], key))
    decision["lora_sha256"], decision["lineage"], decision["lora_dir"] = digest, lineage_key, str(paths["lora"])
    decision["evaluation_dir"] = str(paths["eval"])  # its judged images become production's when it ships
    return decision


def production_distances(root: Path, culture: str, params: Params, production: dict | None,
                         key: str) -> dict[str, float] | None:
    """Production's per-prompt distances on the current held-out records: those it was judged on when
    they are the current ones (same evaluation key), otherwise measured again now (scoft.evaluate)."""
    if production is None:
        return None
    judged = production.get("decision") or {}
    if judged.get("evaluation_key") == key and judged.get("distances"):
        return judged["distances"]
    if not (root / production["lora_dir"] / LORA_FILE).is_file():
        return None  # the rule then says it cannot be judged: `dvc pull registry/loras.dvc` brings it
    from scoft.evaluate import prompt_distances
    from scoft.review.campaigns import production_images_dir

    # loaded through the registry, which refuses a LoRA that is not the one it recorded; its images are
    # kept for the insiders' review pairs against production
    return prompt_distances(params, registry.production_lora(root, culture, params.lineage.verify_key),
                            root / CCUB_DIR, culture, keep=root / production_images_dir(culture,
                                                                                        production["lora_sha256"]))


def with_review(decision: dict, approve: bool | None, reviewer: str, comment: str) -> dict:
    """The decision after a reviewer's answer (`approve` None: none came in time). The rules' verdict
    stands in `rules`; `promote` is the outcome: every rule passed and the reviewer approved."""
    # typed in the Prefect UI's form: kept whole in meaning, bounded and with controls made visible, so
    # that recording it cannot fail after the decision (the registry refuses the raw forms)
    review = {"approve": approve, "reviewer": visible(reviewer, registry.MAX_BY - 40),
              "comment": visible(comment, registry.MAX_REASON - 40)}
    return {**decision, "promote": bool(decision["promote"] and approve), "review": review}


def promote_judged(root: Path, culture: str, lora_dir: str, lineage_key: str, by: str, reason: str, decision: dict,
                   signing_key: str | None, evaluation_dir: str | None) -> dict:
    """Make a judged candidate (the one in lora_dir, evaluated in its culture's evaluation folder) the
    production model: the registry's copy, signed where lineage.signing_key is set, and the images it
    was judged on kept as production's, for the next candidate's review pairs against it."""
    from scoft.review.campaigns import keep_as_production

    entry = registry.promote(root, culture, root / lora_dir, lineage_key, by=by, reason=reason, decision=decision)
    if signing_key:  # lineage.signing_key: the production LoRA as the registry holds it
        from scoft.signing import sign

        sign(root / entry["production"]["lora_dir"], signing_key, root)
    if evaluation_dir:
        keep_as_production(root, culture, entry["production"]["lora_sha256"], evaluation_dir)
    return entry


def record_verdict(root: str | Path, culture: str, decision: dict, signing_key: str | None = None) -> dict:
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
        promote_judged(root, culture, decision["lora_dir"], decision["lineage"], by, reason, decision, signing_key,
                       decision.get("evaluation_dir"))
    else:
        registry.reject(root, culture, decision["lora_sha256"], decision["lineage"], by=by, reason=reason,
                        decision=decision)
    write_json(root / PROMOTION_DIR / f"{culture}.json", decision)
    return decision


def gate(root: str | Path, culture: str, params: Params, lineage_key: str) -> dict:
    """The promote step of one culture without review (a family of one): judge its candidate and record
    the verdict."""
    decision = judge(root, culture, params, lineage_key)
    return decision if "already_judged" in decision else record_verdict(root, culture, decision,
                                                                        params.lineage.signing_key)
