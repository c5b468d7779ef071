"""Generic captions (SCoFT's `blip_text`) for records that come without one.

A real run names a captioning model (a BLIP model id or folder, loaded through transformers). The
offline profile uses a deterministic fallback built from the category; the manifest records which
one wrote each caption (`generic_caption_source`), so a fallback is never mistaken for a model's.
"""

from __future__ import annotations

import threading

from PIL import Image

FALLBACK = "fallback"
_CATEGORY_NOUNS = {
    "ARCH": "a building", "CLOTH": "a person wearing clothes", "CITIES": "a city street", "FOOD": "a plate of food",
    "DANCE": "people dancing", "PEOPLE": "a group of people", "RELIG": "a place of worship", "ART": "a work of art",
    "FESTIVAL": "a festival", "NATURE": "a landscape", "DAILY": "an everyday scene",
}


class FallbackCaptioner:
    """Deterministic, model-free: 'a photo of <what the category shows>'."""

    source = FALLBACK

    def __call__(self, image: Image.Image, category: str) -> str:
        return f"a photo of {_CATEGORY_NOUNS.get(category, 'a scene')}"


class BlipCaptioner:
    """An image-captioning model through transformers (e.g. Salesforce/blip-image-captioning-base)."""

    def __init__(self, model_id: str, max_new_tokens: int = 30):
        from transformers import BlipForConditionalGeneration, BlipProcessor

        from scoft.hub import loading

        with loading("ingest.captioner", model_id):
            self.processor = BlipProcessor.from_pretrained(model_id)
            self.model = BlipForConditionalGeneration.from_pretrained(model_id).eval()
        self.max_new_tokens = max_new_tokens
        self.source = f"model:{model_id}"
        self._lock = threading.Lock()  # one generate() at a time when called from fetch threads

    def __call__(self, image: Image.Image, category: str) -> str:
        import torch

        with self._lock, torch.no_grad():
            inputs = self.processor(images=image, return_tensors="pt")
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens)
        return self.processor.decode(out[0], skip_special_tokens=True).strip()


def make_captioner(name: str):
    return FallbackCaptioner() if name == FALLBACK else BlipCaptioner(name)
