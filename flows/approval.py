"""The approve-candidate flow (CPU): one person's approve or reject, in the Prefect UI, of a candidate
that passed every automatic rule (promotion.require_approval).

The retrain run records the candidate as awaiting approval, announces it (scoft.model.awaiting-approval)
and ends; this deployment's trigger starts a run that suspends with a Resume form. While suspended no
process runs and no worker is held: Prefect schedules the run again once the form is answered, and the
run, starting over, finds the answer under the same key and records it. No answer within
promotion.approval_timeout_s: Prefect fails the suspended run, and nothing ships (the registry still
says "await").
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.flow_runs import suspend_flow_run
from prefect.input import RunInput
from pydantic import Field

from scoft import registry
from scoft.config import load_params
from scoft.lineage import LINEAGE_DIR
from scoft.promotion import failed_rules, with_review
from tasks.dvc import dvc, push
from tasks.promote import promotion_artifact_key, record_decision


class Review(RunInput):
    """The reviewer's answer, typed in the flow run's Resume form."""

    approve: bool = Field(description="Promote this LoRA to production?")
    reviewer: str = Field(description="Your name, for the registry history")
    comment: str = Field(description="Why: it goes to the registry history and the lineage")


@flow(name="approve-candidate", flow_run_name="approve-{culture}-{lora_sha256:.16}")
def approve_candidate(culture: str, lora_sha256: str, workdir: str = ".") -> dict:
    """Ask for approval of the culture's waiting candidate and record the answer: promoted (its LoRA
    tracked and pushed) or rejected, by the reviewer, with their comment."""
    root = Path(workdir)
    waiting = registry.awaiting(root, culture, lora_sha256)
    if waiting is None or not waiting.get("decision", {}).get("awaiting_approval"):
        raise ValueError(f"{culture}: LoRA {lora_sha256[:16]} is not awaiting approval (see `scoft models show "
                         f"{culture}`)")
    form = Review.with_initial_data(
        description=f"**{culture}**: LoRA `{lora_sha256[:16]}` passed every promotion rule (see the "
                    f"`{promotion_artifact_key(culture)}` artifact and reports/eval/{culture}/report.html). Approve "
                    "it for production or reject it, with a comment.")
    answer = suspend_flow_run(wait_for_input=form, timeout=load_params(root / "params.yaml").promotion.
                              approval_timeout_s, key=f"approve-{culture.lower()}-{lora_sha256[:16]}")
    judged = {k: v for k, v in waiting["decision"].items() if k != "awaiting_approval"}
    judged["promote"] = not failed_rules(judged)  # every rule passed: that is why it waited
    decision = with_review(judged, answer.approve, answer.reviewer, answer.comment)
    decision = record_decision(workdir, culture, root / LINEAGE_DIR / f"{waiting['lineage']}.json", decision)
    if decision["promote"] and (root / ".dvc").is_dir():  # a DVC workspace: the new production LoRA pushed
        dvc(["add", "-q", str(registry.LORAS_DIR)], workdir, "track the registry's LoRAs")
        push(workdir)
    return decision
