"""Helpers the tests share: an offline ingest with the suite's usual options, tiny sampler settings."""

from __future__ import annotations

from pathlib import Path

# Two sampler steps at 32 px: enough to exercise guidance and batching, cheap on 2 cores.
TINY_SAMPLING = {"steps": 2, "guidance_scale": 4.5, "resolution": 32}


def ingest_offline(sources: list, out: str | Path, **overrides) -> dict:
    """scoft.ccub.ingest with the fallback captioner, no progress output, a quarter held out and a
    quarter of rows allowed to be rejected; keyword arguments override any of these."""
    from scoft.captions import FallbackCaptioner
    from scoft.ccub import ingest

    options = dict(heldout_fraction=0.25, max_pixels=10**7, max_rejected_fraction=0.25,
                   captioner=FallbackCaptioner(), progress=lambda m: None)
    return ingest([str(s) for s in sources], out, **{**options, **overrides})
