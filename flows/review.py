"""The review-close flow (CPU, on a schedule and when a reviewer finishes a campaign): every open
insiders' campaign is judged by the insiders' gate; a decided one promotes or rejects its candidate
through the registry, and the registry's LoRAs are tracked and pushed."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from scoft import registry
from scoft.config import load_params
from scoft.registry import LORAS_DIR
from scoft.review.campaigns import CampaignError
from scoft.review.results import campaign_markdown, close_campaign, outcome
from scoft.review.store import open_store
from tasks.dvc import dvc, push

COMPLETED = "scoft.review.completed"  # the app's event when a reviewer has rated every pair


@task(name="close-campaign", task_run_name="close-campaign@{culture}")
def close_culture(workdir: str, culture: str) -> dict | None:
    """The culture's open campaign judged now; None when it has none."""
    root = Path(workdir)
    params = load_params(root / "params.yaml")
    with open_store(params.review.database_url, root)() as session:
        try:
            with registry.transaction(root, culture):
                verdict = close_campaign(session, root, culture, params)
        except CampaignError:
            return None
    create_markdown_artifact(key=f"scoft-review-{culture.lower()}", description=f"{culture}: insiders' review",
                             markdown=campaign_markdown(verdict["results"], verdict, params.review.public_url))
    get_run_logger().info("%s: %s: %s", culture, outcome(verdict), verdict["reason"])
    return {"decided": verdict["decided"], "promote": verdict["promote"], "reason": verdict["reason"]}


@flow(name="review-close", log_prints=True)
def review_close(workdir: str = ".") -> dict:
    """Judge every configured culture's open campaign; track and push a new production LoRA."""
    cultures = load_params(Path(workdir) / "params.yaml").validate_.cultures
    outcomes = {c: o for c in cultures if (o := close_culture(workdir, c)) is not None}
    if any(o["promote"] for o in outcomes.values()):
        dvc(["add", "-q", str(LORAS_DIR)], workdir, "track the registry's LoRAs")
        push(workdir)
    return outcomes
