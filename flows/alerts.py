"""Alerts: Prefect automations that call a webhook (an operators' chat channel, a pager) when a
culture's candidate LoRA is rejected or a retrain run fails or crashes. `scoft alerts --webhook URL`
installs them on the server that PREFECT_API_URL names; installing again replaces them."""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

from prefect.automations import Automation
from prefect.blocks.webhook import Webhook
from prefect.events.actions import CallWebhook
from prefect.events.schemas.automations import EventTrigger, Posture

from scoft.config import redact_credentials
from tasks.promote import REJECTED

WEBHOOK_BLOCK = "scoft-alerts"
MODEL_REJECTED, RETRAIN_FAILED = "scoft: model rejected", "scoft: retrain failed"

# JSON bodies, rendered by the server from the triggering event (Prefect's Jinja templates).
_REJECTED_BODY = """{"alert": "model rejected", "culture": {{ event.payload.culture | tojson }},
 "lora_sha256": {{ event.payload.lora_sha256 | tojson }}, "lineage": {{ event.payload.lineage | tojson }},
 "failed_rules": {{ event.payload.failed_rules | tojson }}, "review": {{ event.payload.review | tojson }}}"""
_FAILED_BODY = """{"alert": "retrain {{ event.event.split('.')[-1] | lower }}",
 "flow_run": {{ event.resource.name | tojson }}, "flow_run_id": {{ event.resource.id.split('.')[-1] | tojson }},
 "state": {{ event.event | tojson }}}"""


def _automations(block_id) -> list[Automation]:
    rejected = EventTrigger(expect={REJECTED}, match={"prefect.resource.id": "scoft.model.*"},
                            posture=Posture.Reactive, threshold=1, within=0)
    # Any run of the retrain flow, whichever deployment (on update, weekly) or `scoft run` started it.
    failed = EventTrigger(expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed"},
                          match={"prefect.resource.id": "prefect.flow-run.*"},
                          match_related={"prefect.resource.role": "flow", "prefect.resource.name": "retrain"},
                          posture=Posture.Reactive, threshold=1, within=0)
    return [
        Automation(name=MODEL_REJECTED, description="A culture's candidate LoRA did not reach production",
                   trigger=rejected, actions=[CallWebhook(block_document_id=block_id, payload=_REJECTED_BODY)]),
        Automation(name=RETRAIN_FAILED, description="A retrain run failed or crashed",
                   trigger=failed, actions=[CallWebhook(block_document_id=block_id, payload=_FAILED_BODY)]),
    ]


class BadWebhook(ValueError):
    """A webhook URL the alerts must not call."""


def check_webhook(url: str, allow_private: bool = False, allow_networks: tuple[str, ...] = ()) -> str:
    """`url` when it is an http(s) URL whose host resolves to addresses ingest may reach too (public ones,
    or inside `ingest.allow_networks`: scoft.fetch's outbound-address policy); any other (a cloud's
    metadata service, an admin port on the server's own host) only with `allow_private` (Prefect's
    webhook block allows them by default)."""
    from scoft.fetch import AddressNotAllowed, checked_addresses
    from scoft.text import visible

    shown = visible(redact_credentials(url), 200)
    parsed = urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise BadWebhook(f"{shown}: not an http(s) URL with a host")
    try:
        checked_addresses(parsed.hostname, parsed.port or 443, allow_networks)
    except AddressNotAllowed:
        if not allow_private:
            raise BadWebhook(f"{shown}: address not allowed (a private, loopback or link-local address, outside "
                             "ingest.allow_networks); pass --allow-private if the alerts should go there") from None
    except (socket.gaierror, UnicodeError, ValueError) as e:
        raise BadWebhook(f"{shown}: its host does not resolve ({e})") from e
    return url


def install_alerts(webhook_url: str, allow_private: bool = False,
                   allow_networks: tuple[str, ...] = ()) -> list[Automation]:
    """Save the webhook as the `scoft-alerts` block and (re)create the two automations calling it."""
    check_webhook(webhook_url, allow_private, allow_networks)
    block_id = Webhook(url=webhook_url, method="POST", headers={"Content-Type": "application/json"},
                       allow_private_urls=allow_private).save(WEBHOOK_BLOCK, overwrite=True)
    return replace_automations(_automations(block_id))


def replace_automations(automations: list[Automation]) -> list[Automation]:
    """Create these automations, each replacing the one of the same name on the server."""
    installed = []
    for automation in automations:
        try:
            Automation.read(name=automation.name).delete()
        except ValueError:  # not installed yet
            pass
        installed.append(automation.create())
    return installed
