"""Downloads from the Hugging Face hub (base model, ControlNet, depth estimator, feature and caption
models) with a stall limit.

huggingface_hub (2.4 here) passes `timeout=None` on some calls (model_info, which diffusers calls first), so
a hub that accepts the connection and never answers would hang a stage until its own time limit (an
hour). Every request through huggingface_hub gets a bound on each connect, read and write instead;
a slow download that keeps receiving bytes is never cut.
"""

from __future__ import annotations

import contextlib

import httpx2
from huggingface_hub import get_session, set_client_factory


class _StallLimitedTransport(httpx2.HTTPTransport):
    def __init__(self, stall_s: float):
        super().__init__()
        self.stall_s = stall_s

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        given = request.extensions.get("timeout") or {}
        request.extensions["timeout"] = {
            key: given.get(key) or self.stall_s for key in ("connect", "read", "write", "pool")
        }
        return super().handle_request(request)


def limit_hub_stalls(stall_s: float) -> None:
    """Make every huggingface_hub request fail after `stall_s` seconds without progress. The hub's own
    request hooks (its headers, offline mode) are taken from the client it builds, not its private modules."""
    hooks = get_session().event_hooks
    set_client_factory(lambda: httpx2.Client(transport=_StallLimitedTransport(stall_s), follow_redirects=True,
                                             event_hooks=hooks))


class ModelUnavailable(RuntimeError):
    """A configured model location holds no loadable model (a missing folder, an unknown or uncached
    hub id): a configuration error that retrying cannot fix."""


class HubUnreachable(RuntimeError):
    """The hub stopped answering (stall limit reached, connection refused): may pass, worth a retry."""


@contextlib.contextmanager
def loading(key: str, location: str):
    """Name the params key when the model at `location` cannot be found or the hub does not answer."""
    try:
        yield
    except httpx2.TransportError as e:
        raise HubUnreachable(f"{key}: {location!r}: the hub did not answer ({type(e).__name__}: {e}); "
                             "model.hub_stall_timeout_s bounds each wait") from e
    except OSError as e:  # what diffusers and transformers raise for a missing folder or repository
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise ModelUnavailable(f"{key}: cannot load {location!r}: {first}") from e
