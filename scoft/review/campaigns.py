"""Opening a campaign for a culture's candidate LoRA, and inviting or revoking its reviewers.

A campaign pairs, for each of the culture's held-out prompts and seeds, the candidate's image with
the base model's, both taken from the evaluation's own images (reports/eval/<C>/images: no new GPU
work), or with production's where the culture has a production LoRA: the images it was judged on
when it shipped, or sampled again by the promote step on the current prompts (kept under
reports/review/<C>/production/<sha>). Each of the candidate's images is in one pair only: a prompt's
draws (seeds) take turns against the base and against production, so no picture a reviewer sees twice
gives the candidate away. Each pair's order is drawn at random once; every image is shown
under an opaque random id. Each invitation is a secret token of 192 random bits, stored only as its
sha256, and comes with one of the campaign's pairs shown again at the end, images swapped: how
consistent the reviewer is with themself.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import shutil
from pathlib import Path

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from scoft import registry
from scoft.io import atomic_dir, sha256_file, write_json
from scoft.paths import BASE, CANDIDATE, IMAGES_DIR, LORA_FILE, PRODUCTION, culture_paths
from scoft.review.store import Campaign, Image, Pair, Rating, Reviewer, _now

REVIEW_DIR = Path("reports/review")  # by culture: the campaigns' exports and production's kept images


def production_images_dir(culture: str, lora_sha256: str) -> Path:
    """Where the images a production LoRA was judged on are kept (write_judged_images' layout)."""
    return REVIEW_DIR / culture / "production" / lora_sha256[:16]


def keep_as_production(root: Path, culture: str, lora_sha256: str, evaluation_dir: str | Path) -> None:
    """A candidate just promoted: its judged images of `culture` (in evaluation_dir) kept as production's,
    so that the next candidate's campaign pairs against them on the same prompts and seeds."""
    source = root / evaluation_dir / IMAGES_DIR
    if not (source / "index.json").is_file():
        return  # evaluated before images were kept: the next campaign says it has no production pairs
    entries = [e for e in json.loads((source / "index.json").read_text(encoding="utf-8"))["images"]
               if e["culture"] == culture]
    with atomic_dir(root / production_images_dir(culture, lora_sha256)) as tmp:
        (tmp / PRODUCTION).mkdir()
        for e in entries:
            shutil.copyfile(source / CANDIDATE / f"{e['i']:04d}.png", tmp / PRODUCTION / f"{e['i']:04d}.png")
        write_json(tmp / "index.json", {"models": [PRODUCTION], "images": entries})


def _production_entries(root: Path, culture: str, candidate_sha256: str) -> tuple[Path, dict] | None:
    """Production's kept images by (record, prompt, seed), and their folder; None when the culture has
    no production LoRA, the candidate is production itself, or no images of it were kept."""
    from scoft import registry

    production = registry.read(root, culture)["production"]
    if production is None or production["lora_sha256"] == candidate_sha256:
        return None
    folder = production_images_dir(culture, production["lora_sha256"])
    if not (root / folder / "index.json").is_file():
        return None
    index = json.loads((root / folder / "index.json").read_text(encoding="utf-8"))
    return folder, {(e["record"], e["prompt"], e["seed"]): e for e in index["images"]}


class CampaignError(ValueError):
    """A campaign that cannot be opened or an invitation that cannot be made, with the reason."""


def open_campaign(session: Session, root: str | Path, culture: str, joint: bool = False) -> tuple[Campaign, int]:
    """The open campaign for the culture's current candidate (opened now if there is none) and its
    number of pairs. People decide only on a candidate that passed the rules: one the registry records
    as awaiting them (judged, with its lineage record); any other is refused, saying where it stands."""
    root = Path(root)
    paths = culture_paths(culture, joint)
    lora, images = root / paths["lora"] / LORA_FILE, root / paths["eval"] / IMAGES_DIR
    if not lora.is_file():
        raise CampaignError(f"{culture}: no candidate LoRA in {paths['lora']} (run `scoft run` first)")
    if not (images / "index.json").is_file():
        raise CampaignError(f"{culture}: the evaluation kept no images ({images}/index.json): evaluate again")
    digest = sha256_file(lora)
    existing = session.scalars(select(Campaign).where(Campaign.culture == culture, Campaign.status == "open",
                                                      Campaign.candidate_sha256 == digest)).first()
    if existing is not None:
        return existing, _pair_count(session, existing)
    waiting = registry.awaiting(root, culture, digest)
    if waiting is None:
        raise CampaignError(_not_awaiting(root, culture, digest))
    index = json.loads((images / "index.json").read_text(encoding="utf-8"))
    if not {CANDIDATE, BASE} <= set(index["models"]):
        raise CampaignError(f"{culture}: the evaluation's images hold {index['models']}, not {CANDIDATE} and {BASE}")
    entries = [e for e in index["images"] if e["culture"] == culture]
    if not entries:
        raise CampaignError(f"{culture}: the evaluation judged no held-out prompt of {culture}")
    campaign = Campaign(id=secrets.token_hex(8), culture=culture, candidate_sha256=digest, opened_at=_now(),
                        lineage=waiting["lineage"], status="open", evaluation=str(paths["eval"]))
    session.add(campaign)
    production = _production_entries(root, culture, digest)
    for e, against_production in _turns(entries):
        candidate = paths["eval"] / IMAGES_DIR / CANDIDATE / f"{e['i']:04d}.png"
        if against_production and production and (theirs := production[1].get((e["record"], e["prompt"], e["seed"]))):
            _pair(session, campaign, e, candidate, PRODUCTION, production[0] / PRODUCTION / f"{theirs['i']:04d}.png")
        else:
            _pair(session, campaign, e, candidate, BASE, paths["eval"] / IMAGES_DIR / BASE / f"{e['i']:04d}.png")
    session.commit()
    return campaign, len(entries)


def _turns(entries: list[dict]) -> list[tuple[dict, bool]]:
    """Each entry (a prompt's draw) and whether it is the turn of production: a prompt's seeds alternate,
    starting from the base on one prompt and from production on the next, so both comparisons see every
    prompt when it has two or more draws, and half the prompts each when it has one."""
    by_record: dict[str, list[dict]] = {}
    for e in sorted(entries, key=lambda e: (e["record"], e["seed"])):
        by_record.setdefault(e["record"], []).append(e)
    return [(e, (r + k) % 2 == 1) for r, draws in enumerate(by_record.values()) for k, e in enumerate(draws)]


def _not_awaiting(root: Path, culture: str, digest: str) -> str:
    """Why the candidate `digest` is not for people to decide on now."""
    about = [e for e in registry.read(root, culture)["history"] if e["lora_sha256"] == digest]
    if not about:
        return (f"{culture}: candidate {digest[:12]} has not been judged by the promotion rules (its retrain run is "
                "still running, or stopped before its promote step): people decide only on a candidate that passed "
                "them; open the campaign once `scoft run` has judged it")
    last = about[-1]
    if last["action"] == "reject":
        return (f"{culture}: candidate {digest[:12]} was rejected by {last['by']} ({last['reason']}): people decide "
                "only on a candidate that passed the rules")
    return (f"{culture}: candidate {digest[:12]} is already production ({last['action']} by {last['by']} at "
            f"{last['at']}): nothing to decide; `scoft models rollback {culture}` takes it out")


def _image(session: Session, campaign: Campaign, model: str, path: Path) -> Image:
    image = Image(id=secrets.token_urlsafe(16), campaign_id=campaign.id, model=model, path=str(path))
    session.add(image)
    return image


def _pair(session: Session, campaign: Campaign, entry: dict, candidate: Path, comparison: str, other: Path) -> None:
    """The candidate's image against the other model's for one prompt and seed, in an order drawn now.
    Each pair shows its images under ids of its own: the candidate's image, shown against the base and
    against production, must not be recognisable by its address as the one the two pairs share."""
    candidate_first = secrets.randbelow(2) == 1
    shown = _image(session, campaign, CANDIDATE, candidate), _image(session, campaign, comparison, other)
    first, second = shown if candidate_first else shown[::-1]
    session.add(Pair(id=secrets.token_urlsafe(12), campaign_id=campaign.id, comparison=comparison,
                     prompt=entry["prompt"], seed=entry["seed"], record=entry["record"], first_image=first.id,
                     second_image=second.id, candidate_first=candidate_first))


def opponents(session: Session, campaign: Campaign) -> list[str]:
    """The models the campaign's candidate is paired against ("base", and "production" where it is)."""
    return sorted(set(session.scalars(select(Pair.comparison).where(Pair.campaign_id == campaign.id)).all()))


def _pair_count(session: Session, campaign: Campaign) -> int:
    return len(session.scalars(select(Pair.id).where(Pair.campaign_id == campaign.id,
                                                     Pair.repeat_of.is_(None))).all())


def open_campaign_of(session: Session, culture: str) -> Campaign:
    """The culture's open campaign; none is a CampaignError saying how to open one."""
    return latest_campaign(session, culture, only_open=True)


def latest_campaign(session: Session, culture: str, only_open: bool = False) -> Campaign:
    """The culture's latest campaign (open or closed, or open only); none is a CampaignError saying how
    to open one."""
    query = select(Campaign).where(Campaign.culture == culture)
    if only_open:
        query = query.where(Campaign.status == "open")
    campaign = session.scalars(query.order_by(Campaign.opened_at.desc())).first()
    if campaign is None:
        kind = "open review campaign" if only_open else "review campaign"
        raise CampaignError(f"{culture}: no {kind} (`scoft review open --culture {culture}`)")
    return campaign


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def invite(session: Session, campaign: Campaign, count: int, public_url: str) -> list[dict]:
    """`count` invitations to the campaign: their pseudonymous reviewer ids and links (the only place
    the tokens appear). Each reviewer also gets one pair drawn at random to see again, images swapped."""
    if not 1 <= count <= 1000:
        raise CampaignError(f"--count {count}: between 1 and 1000 invitations at a time")
    pairs = session.scalars(select(Pair).where(Pair.campaign_id == campaign.id, Pair.repeat_of.is_(None))).all()
    out = []
    for _ in range(count):
        token = secrets.token_urlsafe(24)  # 192 random bits
        reviewer = Reviewer(id="r-" + secrets.token_hex(4), campaign_id=campaign.id, token_sha256=token_hash(token),
                            invited_at=_now())
        session.add(reviewer)
        again = pairs[secrets.randbelow(len(pairs))]
        # the same two images swapped, under new addresses: nothing but the pictures says it is a repeat
        first, second = (session.get(Image, again.second_image), session.get(Image, again.first_image))
        first, second = (_image(session, campaign, first.model, Path(first.path)),
                         _image(session, campaign, second.model, Path(second.path)))
        session.add(Pair(id=secrets.token_urlsafe(12), campaign_id=campaign.id, comparison=again.comparison,
                         prompt=again.prompt, seed=again.seed, record=again.record, first_image=first.id,
                         second_image=second.id, candidate_first=not again.candidate_first,
                         repeat_of=again.id, reviewer_id=reviewer.id))
        out.append({"reviewer": reviewer.id, "url": f"{public_url.rstrip('/')}/r/{token}"})
    session.commit()
    return out


def revoke(session: Session, reviewer_id: str) -> Reviewer:
    """The reviewer's token opens nothing from now on; the ratings already given stay."""
    reviewer = session.get(Reviewer, reviewer_id)
    if reviewer is None:
        raise CampaignError(f"no reviewer {reviewer_id!r}")
    if reviewer.revoked_at is None:
        reviewer.revoked_at = _now()
        session.commit()
    return reviewer


class NotInvited(PermissionError):
    """A token that opens nothing: unknown or malformed (status 401), revoked or of a closed campaign (403)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


TOKEN_CHARS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def reviewer_for(session: Session, token: str | None) -> Reviewer:
    """The reviewer a token belongs to, if it opens anything now."""
    if not token or len(token) > 64 or not set(token) <= TOKEN_CHARS:
        raise NotInvited("not a valid invitation link", 401)
    reviewer = session.scalars(select(Reviewer).where(Reviewer.token_sha256 == token_hash(token))).first()
    if reviewer is None:
        raise NotInvited("not a valid invitation link", 401)
    if reviewer.revoked_at is not None:
        raise NotInvited("this invitation was withdrawn", 403)
    if session.get(Campaign, reviewer.campaign_id).status != "open":
        raise NotInvited("this review has closed; thank you", 403)
    return reviewer


def _pairs_in_order(session: Session, reviewer: Reviewer) -> list[Pair]:
    """The campaign's pairs in an order of the reviewer's own (so reviewers do not all start alike), then
    the reviewer's repeated pair, last so that it comes well after its first showing."""
    pairs = session.scalars(select(Pair).where(Pair.campaign_id == reviewer.campaign_id, or_(
        Pair.reviewer_id.is_(None), Pair.reviewer_id == reviewer.id))).all()
    return sorted(pairs, key=lambda p: (p.repeat_of is not None,
                                        hashlib.sha256(f"{reviewer.id}:{p.id}".encode()).hexdigest()))


def next_pair(session: Session, reviewer: Reviewer) -> tuple[Pair | None, int, int]:
    """The reviewer's next unrated pair (None when done), how many they rated and how many there are."""
    pairs = _pairs_in_order(session, reviewer)
    rated = set(session.scalars(select(Rating.pair_id).where(Rating.reviewer_id == reviewer.id)).all())
    left = [p for p in pairs if p.id not in rated]
    return (left[0] if left else None), len(pairs) - len(left), len(pairs)


class BadRating(ValueError):
    """A rating that is not stored, with the reason (status 404: not the reviewer's pair; 422: malformed)."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


def rate(session: Session, reviewer: Reviewer, pair_id, better, more_stereotyped, offensive) -> Rating:
    """Store one answer to one of the reviewer's pairs (0 and 1: positions as shown; None: can't tell)."""
    pair = session.get(Pair, pair_id) if isinstance(pair_id, str) else None
    if pair is None or pair.campaign_id != reviewer.campaign_id or pair.reviewer_id not in (None, reviewer.id):
        raise BadRating("no such pair in your review", 404)
    for name, value in (("better", better), ("more_stereotyped", more_stereotyped)):
        if value is not None and (type(value) is not int or value not in (0, 1)):  # not 1.0, not True
            raise BadRating(f"{name} must be 0, 1 or null (positions of the two images)")
    two_flags = isinstance(offensive, list | tuple) and len(offensive) == 2
    if not (two_flags and all(isinstance(x, bool) for x in offensive)):
        raise BadRating("offensive must be two booleans, one per image")
    rating = Rating(pair_id=pair.id, reviewer_id=reviewer.id, better=better, more_stereotyped=more_stereotyped,
                    offensive_first=offensive[0], offensive_second=offensive[1], at=_now())
    session.add(rating)
    session.commit()
    return rating


def image_for(session: Session, reviewer: Reviewer, image_id: str) -> Path:
    """The file of an image of the reviewer's campaign (relative to the workspace)."""
    image = session.get(Image, image_id) if isinstance(image_id, str) else None
    if image is None or image.campaign_id != reviewer.campaign_id:
        raise BadRating("no such image in your review", 404)
    shown_in = session.scalars(select(Pair.reviewer_id).where(
        or_(Pair.first_image == image.id, Pair.second_image == image.id))).all()
    if shown_in and all(viewer not in (None, reviewer.id) for viewer in shown_in):  # another's repeated pair
        raise BadRating("no such image in your review", 404)
    return Path(image.path)
