"""params.yaml as typed objects: a wrong value fails at start, naming the key and the reason."""

from __future__ import annotations

import re
import reprlib
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PARAMS_FILE = "params.yaml"


class ConfigError(ValueError):
    """params.yaml is missing, unreadable or holds a bad value."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# A hub repository id as the hub accepts it: an optional owner, a name; no "--" or "..".
_HUB_ID = re.compile(r"(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}")


def _location(*builtins: str):
    """A weights location: one of the built-in names, an existing folder, or a well-formed hub id.
    Checked when params load, so a typo fails at start with its key, not an hour into a stage."""

    def check(value: str) -> str:
        if value in builtins or Path(value).expanduser().is_dir():
            return value
        if _HUB_ID.fullmatch(value) and "--" not in value and ".." not in value and not value.endswith("."):
            return value
        raise ValueError(f"{value!r} is neither {' nor '.join(repr(b) for b in builtins)}, an existing folder, "
                         "nor a hub id (owner/name)")

    return AfterValidator(check)


# A URL's userinfo: everything from the scheme's "://" to the authority's LAST "@" (the authority ends
# at "/", "?", "#" or a space), as URL parsers read it: a password may hold "@" itself.
_URL_CREDENTIALS = re.compile(r"(?<=://)[^/?#\s]*@")


def redact_credentials(text: str) -> str:
    """`text` with the user:password part of any URL in it replaced by ***."""
    return _URL_CREDENTIALS.sub("***@", text)


def _no_credentials(value: str | None) -> str | None:
    if value and _URL_CREDENTIALS.search(value):
        raise ValueError("holds credentials (user:password@ in the URL); give them through the environment "
                         "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) or an AWS profile, never in a URL")
    return value


CredentialFreeURL = Annotated[str, AfterValidator(_no_credentials)]


def _network(value: str) -> str:
    import ipaddress

    try:
        return str(ipaddress.ip_network(value, strict=True))
    except ValueError as e:
        raise ValueError(f"{value!r} is not a CIDR network such as 10.20.0.0/16 ({e})") from None


Network = Annotated[str, AfterValidator(_network)]

# Seeds feed torch.Generator.manual_seed after being combined with step numbers (seed * 1_000_003 + ...):
# 32 bits keep every derived seed inside the 64 bits torch accepts.
Seed = Annotated[int, Field(ge=0, lt=2**32)]
# CCUB's category codes (docs/SCOFT.md); a new one is added here, reviewed like any code change.
CATEGORIES = ("ARCH", "CLOTH", "CITIES", "FOOD", "DANCE", "PEOPLE", "RELIG", "ART", "FESTIVAL", "NATURE", "DAILY")


class ModelParams(_Section):
    # "tiny": the planted-bias base the `base` stage builds into models/base (scoft/planted.py);
    # "tiny-random": the same architecture with seeded random weights (fast tests of the mechanics).
    base: Annotated[str, _location("tiny", "tiny-random")] = "tiny"
    revision: str | None = None
    seed: Seed = 0
    resolution: int = Field(32, ge=16, le=2048)
    # Longest wait for any hub request to make progress (connect, or the next bytes of a download).
    hub_stall_timeout_s: float = Field(30, gt=0)

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, v: int) -> int:
        if v % 8:
            raise ValueError("must be a multiple of 8 (the VAE downsamples by powers of two)")
        return v


class PlantedParams(_Section):
    """How the planted-bias base is pretrained (scoft/planted.py); used when model.base is "tiny"."""

    images_per_prompt: int = Field(24, ge=1)  # web images per (culture or generic, category)
    truth_share: float = Field(0.0, ge=0, lt=0.5)  # of a culture's web images, the share in its true palette
    vae_steps: int = Field(1200, ge=1)
    unet_steps: int = Field(1000, ge=1)
    vae_batch_size: int = Field(8, ge=1)
    batch_size: int = Field(8, ge=1)  # the UNet's
    vae_lr: float = Field(2e-3, gt=0)
    unet_lr: float = Field(2e-3, gt=0)
    offset_noise: float = Field(0.2, ge=0)  # std of the per-channel constant added to the UNet's noise
    judge_steps: int = Field(1000, ge=1)  # the planted judge's training steps (scoft/judge.py), built beside the base
    web_encoder_steps: int = Field(1000, ge=1)  # SimCLR steps of the web encoder (scoft/web_encoder.py), beside it too
    # a stopped build resumes from its last checkpoint (scoft/checkpoints.py): at most this much is lost
    checkpoint_every_s: float = Field(60.0, ge=0)


Backbone = Literal["lpips-vgg", "lpips-alex", "lpips-squeeze", "dinov2", "clip", "dinov2+clip", "colour-histogram",
                   "planted-judge", "planted-attributes", "web-ssl", "web-ssl-lpips"]
Attribute = Literal["category", "form", "palette"]


class FeatureParams(_Section):
    perceptual: Backbone = "web-ssl-lpips"  # L_P
    contrastive: Backbone = "web-ssl"  # D of L_C
    evaluation: Backbone = "planted-attributes"  # the evaluation metric's distance
    judge: str = "models/base/judge"  # where planted-judge and planted-attributes load from (built by `base`)
    web_encoder: str = "models/base/web_encoder"  # where web-ssl and web-ssl-lpips load from (built by `base`)
    # planted-attributes: how much each of the judge's attributes counts in the distance
    attribute_weights: dict[Attribute, Annotated[float, Field(ge=0)]] = {"category": 0.2, "form": 0.4, "palette": 0.4}
    # per transformers backbone: "tiny" (seeded, offline), a hub id or a local folder
    weights: dict[Literal["dinov2", "clip"], Annotated[str, _location("tiny")]] = {"dinov2": "tiny", "clip": "tiny"}
    lpips_pretrained_backbone: bool = False

    def weights_for(self, kind: str) -> str:
        return self.weights.get(kind, "tiny")

    @field_validator("attribute_weights")
    @classmethod
    def _some_weight(cls, weights: dict) -> dict:
        if not any(w > 0 for w in weights.values()):
            raise ValueError("at least one attribute must weigh more than 0")
        return weights


class IngestParams(_Section):
    sources: list[CredentialFreeURL] = Field(["data/sample"], min_length=1)
    heldout_fraction: float = Field(0.25, gt=0, lt=1)
    max_image_pixels: int = Field(40_000_000, gt=0)
    max_image_bytes: int = Field(50 * 1024 * 1024, gt=0)
    max_rejected_fraction: float = Field(0.25, ge=0, le=1)
    connect_timeout_s: float = Field(5, gt=0)
    read_timeout_s: float = Field(20, gt=0)
    retries: int = Field(3, ge=0)
    backoff_s: float = Field(0.5, ge=0)
    max_redirects: int = Field(5, ge=0)
    download_deadline_s: float = Field(60, gt=0)
    workers: int = Field(8, ge=1)
    max_decoded_bytes: int = Field(1 << 30, ge=1 << 20)
    captioner: Annotated[str, _location("fallback")] = "fallback"
    s3_endpoint_url: CredentialFreeURL | None = None
    allow_networks: list[Network] = []

    def fetch_policy(self):
        from scoft.fetch import FetchPolicy

        return FetchPolicy(connect_timeout_s=self.connect_timeout_s, read_timeout_s=self.read_timeout_s,
                           retries=self.retries, backoff_s=self.backoff_s, max_redirects=self.max_redirects,
                           max_bytes=self.max_image_bytes, deadline_s=self.download_deadline_s,
                           allow_networks=tuple(self.allow_networks))


def is_alpha3(code: str) -> bool:
    """An ISO 3166-1 alpha-3 country code, as CCUB names cultures."""
    import pycountry

    return len(code) == 3 and code.isalpha() and code.isupper() and pycountry.countries.get(alpha_3=code) is not None


def _alpha3(code: str) -> str:
    if not is_alpha3(code):
        raise ValueError(f"{code!r} is not an ISO 3166-1 alpha-3 country code")
    return code


def _category(code: str) -> str:
    if code not in CATEGORIES:
        raise ValueError(f"{code!r} is not a known CCUB category ({', '.join(CATEGORIES)})")
    return code


class ValidateParams(_Section):
    cultures: list[Annotated[str, AfterValidator(_alpha3)]] = Field(min_length=1)
    categories: list[Annotated[str, AfterValidator(_category)]] = Field(min_length=1)
    min_images_per_culture: int = Field(8, ge=1)
    min_images_per_category: int = Field(1, ge=1)
    min_heldout_per_culture: int = Field(1, ge=1)
    min_side: int = Field(32, ge=1)
    max_side: int = Field(8192, ge=1)
    min_aspect: float = Field(0.25, gt=0)
    max_aspect: float = Field(4.0, gt=0)
    caption_min_chars: int = Field(8, ge=1)
    caption_max_chars: int = Field(400, ge=1)

    @model_validator(mode="after")
    def _ranges(self):
        for low, high in (("min_side", "max_side"), ("min_aspect", "max_aspect"),
                          ("caption_min_chars", "caption_max_chars")):
            if getattr(self, low) > getattr(self, high):
                raise ValueError(f"{low} ({getattr(self, low)}) is above {high} ({getattr(self, high)})")
        return self


class NegativeParams(_Section):
    per_image: int = Field(2, ge=0)
    steps: int = Field(4, ge=1)
    guidance_scale: float = Field(4.5, ge=0)
    batch_size: int = Field(8, ge=1)
    seed: Seed = 1024
    depth_guided: bool = False
    controlnet: Annotated[str, _location("tiny")] = "tiny"
    depth_estimator: Annotated[str, _location("simple")] = "simple"
    control_scale: float = Field(1.0, ge=0)


class LossWeights(_Section):
    ldm: float = Field(0.7, ge=0)
    memorization: float = Field(0.3, ge=0)
    perceptual: float = Field(0.01, ge=0)
    contrastive: float = Field(0.05, ge=0)


LOSS_SETS = ("ldm", "ldm+mem", "ldm+mem+perceptual", "ldm+mem+perceptual+contrastive")


class TrainParams(_Section):
    seed: Seed = 1024
    # true: one LoRA per culture, on its records only (the paper); false: one joint LoRA on every
    # culture's records, which serves each culture's prompts (dvc.yaml's train_joint stage).
    lora_per_culture: bool = True
    # The paper's ablations: LDM fine-tune, +M, +MP, +MPC (the full method).
    losses: Literal[LOSS_SETS] = LOSS_SETS[-1]
    max_steps: int = Field(300, ge=1)
    checkpoint_every: int = Field(100, ge=0)  # optimizer steps between resumable checkpoints; 0: none
    num_processes: int = Field(1, ge=1)  # >1: the stage runs through `accelerate launch`
    gradient_checkpointing: bool = False
    batch_size: int = Field(2, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(1e-2, ge=0)
    lr_scheduler: Literal["cosine", "constant", "linear"] = "cosine"
    max_grad_norm: float = Field(1.0, gt=0)
    lora_rank: int = Field(4, ge=1)
    lora_alpha: int = Field(4, ge=1)
    # peft target_modules: the UNet modules that get an adapter (diffusers names)
    lora_targets: list[str] = Field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"], min_length=1)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    loss_weights: LossWeights = LossWeights()
    pixel_loss_every: int = Field(4, ge=1)
    sampler_steps: int = Field(2, ge=1)
    sampler_guidance: float = Field(4.5, ge=0)
    # ddim: deterministic, evenly spaced; ddpm: the reference's stochastic sampler. The gradient that
    # reaches the first prediction differs between them (their updates differ), so the pixel
    # loss weights tuned for one do not carry over to the other unchanged. dpm-solver++: DPM-Solver++(2M),
    # nearer the long sampler's estimate for the same UNet calls (bench/x0_estimate.py).
    sampler: Literal["ddim", "ddpm", "dpm-solver++"] = "dpm-solver++"
    contrastive_form: Literal["difference", "hinge"] = "difference"
    contrastive_margin: float = Field(0.1, ge=0)
    random_flip: bool = True
    empty_prompt_share: float = Field(0.3, ge=0, lt=1)  # of training captions replaced by "" (caption dropout)

    def uses(self, loss: str) -> bool:
        """Whether a loss term (ldm, mem, perceptual, contrastive) is on, by the loss set and its weight."""
        weight = {"ldm": self.loss_weights.ldm, "mem": self.loss_weights.memorization,
                  "perceptual": self.loss_weights.perceptual, "contrastive": self.loss_weights.contrastive}[loss]
        return loss in self.losses.split("+") and weight > 0


class EvaluateParams(_Section):
    steps: int = Field(8, ge=1)
    guidance_scale: float = Field(4.5, ge=0)
    seed: Seed = 7
    samples_per_prompt: int = Field(4, ge=1)
    bootstrap: int = Field(1000, ge=10)


class RemoteParams(_Section):
    # s3://bucket/prefix on S3 or any S3-compatible store; null keeps the local folder remote of
    # .dvc/config. Credentials come only from the environment or an AWS profile.
    url: CredentialFreeURL | None = None
    endpoint_url: CredentialFreeURL | None = None
    profile: str | None = None

    @field_validator("url")
    @classmethod
    def _s3_only(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith("s3://"):
            raise ValueError("must be an s3://bucket/prefix URL (or null for the local folder remote)")
        return v


class OrchestrationParams(_Section):
    stage_retries: int = Field(1, ge=0)
    stage_retry_delay_s: float = Field(10, ge=0)
    stage_timeout_s: float = Field(3600, gt=0)
    # "flow/deployment" that runs one culture's chain (flows/retrain.py: retrain_culture): the retrain
    # fans out one such run per culture over that deployment's workers; None: the chains run in order here.
    culture_deployment: str | None = Field(None, pattern=r"^[^/]+/[^/]+$")
    culture_run_timeout_s: float = Field(6 * 3600, gt=0)  # waiting for one culture's run, retries included
    # A retrain run started this many times (its retries and `scoft recovery`'s restarts after crashes
    # together) fails at its next start instead of running: a run that crashes every time stops.
    max_attempts: int = Field(4, ge=1)
    # `scoft run` ends the run (exit 1) when the Prefect API has not answered for this long
    api_lost_after_s: float = Field(30, gt=0, le=3600)


class PromotionParams(_Section):
    """The gate a culture's candidate LoRA must pass to become production (scoft/promotion.py)."""

    # The primary rule: a one-sided paired sign-flip test of the candidate's per-prompt gain over the
    # base (H0: gain <= min_gain), Holm-adjusted across the cultures judged in one retrain, at
    # `alpha`: a no-effect LoRA reaches production in at most alpha of retrains (bench/gate_power.py).
    alpha: float = Field(0.05, gt=0, le=0.2)
    test_unit: Literal["prompt", "category"] = "prompt"  # category: flip a category's prompts together
    # the smallest gain worth shipping (H0: gain <= min_gain), in features.evaluation's units: chosen for
    # planted-attributes on the tuning split (bench/metric_balance.py --split tuning: a tenth of the
    # smallest one-attribute correction's gain); another evaluation distance needs its own
    min_gain: float = Field(0.033, ge=0, le=1)
    # share of images nearer a training image than 90% of held-out images are (about 0.1 without copying)
    max_memorisation: float = Field(0.3, gt=0, lt=1)
    # prompts naming no culture: the share drawn as the candidate's culture may rise by at most this
    max_generic_takeover: float = Field(0.25, ge=0, lt=1)
    # The insiders' gate (`scoft review close`, scoft/review/results.py): the lower bound of the 95% interval
    # of the share of ratings preferring the candidate over the base (clustered by reviewer and by prompt)
    # must be above min_insider_preference (0.5: insiders prefer it, beyond chance), from at least
    # min_reviewers reviewers, with at most max_offensive_flags flags on the candidate's images.
    min_insider_preference: float = Field(0.5, ge=0.5, lt=1)
    min_reviewers: int = Field(5, ge=2, le=1000)
    max_offensive_flags: int = Field(0, ge=0)
    # true: a candidate that passes every automatic rule goes before cultural insiders: the retrain run
    # opens a review campaign (scoft/review), records the candidate as awaiting insider review and ends;
    # `scoft review close` (or the review-close deployment) then promotes or rejects it.
    insider_review: bool = False
    # true: a candidate that passes every rule waits for one person's approve or reject (with a comment)
    # in the Prefect UI: the retrain run records it as awaiting approval and ends, and the approve-candidate
    # flow (flows/approval.py) suspends, holding no worker, for at most approval_timeout_s; without an
    # answer nothing is promoted.
    require_approval: bool = False
    approval_timeout_s: int = Field(86400, ge=1)


class LineageParams(_Section):
    # Signing (scoft/signing.py, OpenSSF model-signing with an elliptic-curve key pair, offline): at each
    # promotion step the lineage record, and a promoted LoRA, are signed with signing_key, a PEM private
    # key kept outside the repository (a path inside the project folder is refused). verify_key, the
    # PEM public key (it may be committed), makes `scoft lineage verify` and every load of a production
    # LoRA check the signatures. null: nothing is signed, and `scoft lineage verify` says so as a problem
    # (--unsigned accepts it on purpose). verify_key_sha256 pins the verify key (the sha256 of its file):
    # a key swapped inside the workspace, with records re-signed by its pair, is named, not trusted.
    signing_key: str | None = None
    verify_key: str | None = None
    verify_key_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")


def _no_database_password(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception as e:  # noqa: BLE001 - any unparsable URL: said without echoing it
        raise ValueError("not a database URL (e.g. sqlite:///data/review/review.db, "
                         "postgresql+psycopg://user@host/db)") from e
    if parsed.password is not None:
        raise ValueError("holds a password: give it through the environment (PGPASSWORD) or ~/.pgpass, never here")
    return url


class ReviewParams(_Section):
    # Cultural insiders' review (scoft/review): the database of campaigns and ratings (an SQLite file in
    # the workspace, or postgresql+psycopg://user@host/db for a team's deployment; a password comes from
    # the environment's PGPASSWORD or ~/.pgpass, never this file), and the base of the reviewers' links.
    database_url: Annotated[str, AfterValidator(_no_database_password)] = "sqlite:///data/review/review.db"
    public_url: CredentialFreeURL = Field("http://127.0.0.1:8700", pattern=r"^https?://[^\s/]+")
    # A campaign without enough reviews (promotion.min_reviewers) this long after it opened is rejected.
    deadline_days: float = Field(14, gt=0, le=365)


class Params(_Section):
    model: ModelParams = ModelParams()
    planted: PlantedParams = PlantedParams()
    features: FeatureParams = FeatureParams()
    ingest: IngestParams = IngestParams()
    validate_: ValidateParams = Field(alias="validate")
    negatives: NegativeParams = NegativeParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    remote: RemoteParams = RemoteParams()
    orchestration: OrchestrationParams = OrchestrationParams()
    lineage: LineageParams = LineageParams()
    review: ReviewParams = ReviewParams()
    promotion: PromotionParams = PromotionParams()

    @model_validator(mode="after")
    def _joint_lora_trains_here(self) -> Params:
        if self.orchestration.culture_deployment and not self.train.lora_per_culture:
            raise ValueError("orchestration.culture_deployment fans out one LoRA per culture; with "
                             "train.lora_per_culture false the one joint LoRA trains in the retrain run: "
                             "set culture_deployment to null")
        return self

    @model_validator(mode="after")
    def _planted_backbones_have_their_base(self) -> Params:
        """The judge's and the web encoder's backbones are built by the `base` stage into models/base, for
        model.base: tiny only: with another base, say so now rather than in the train or evaluate stage."""
        from scoft.paths import BASE_DIR

        if self.model.base == "tiny":
            return self
        f = self.features
        folders = {"planted-judge": ("judge", f.judge), "planted-attributes": ("judge", f.judge),
                   "web-ssl": ("web_encoder", f.web_encoder), "web-ssl-lpips": ("web_encoder", f.web_encoder)}
        for role in ("perceptual", "contrastive", "evaluation"):
            name = getattr(f, role)
            key, folder = folders.get(name, (None, None))
            if folder is not None and Path(folder).is_relative_to(BASE_DIR):
                raise ValueError(
                    f"features.{role}: {name} needs features.{key} ({folder}), which the `base` stage builds for "
                    f"model.base: tiny only, not {self.model.base!r}: name a backbone with weights of its own "
                    f"(profiles/reference.yaml) or point features.{key} at a planted build")
        return self

    def sampling(self, stage: Literal["negatives", "evaluate"]) -> dict:
        """A stage's sampler settings as scoft.negatives.generate takes them (and cache keys record them)."""
        s = getattr(self, stage)
        return {"steps": s.steps, "guidance_scale": s.guidance_scale, "resolution": self.model.resolution}


SHOWN_ERRORS = 20
# A value is echoed in a bounded form: the whole repr of a YAML alias bomb was a 53 MB message.
_ECHO = reprlib.Repr()
_ECHO.maxlevel, _ECHO.maxdict, _ECHO.maxlist, _ECHO.maxstring, _ECHO.maxlong, _ECHO.maxother = 2, 4, 4, 80, 40, 80


def _describe(err: ValidationError, path: Path) -> str:
    lines = [f"{path}: {err.error_count()} bad value(s)"]
    for e in err.errors()[:SHOWN_ERRORS]:
        key = ".".join(str(p) for p in e["loc"])[:200]
        lines.append(redact_credentials(f"  {key}: {e['msg'][:300]} (got {_ECHO.repr(e.get('input'))})"))
    if err.error_count() > SHOWN_ERRORS:
        lines.append(f"  ... and {err.error_count() - SHOWN_ERRORS} more")
    return "\n".join(lines)


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: not found (run scoft from the project folder)") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {str(e)[:500]}") from e
    except (ValueError, RecursionError) as e:  # e.g. an integer of more than 4,300 digits
        raise ConfigError(f"{path}: a value cannot be read: {str(e)[:300]}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_describe(e, path)) from e


def with_overrides(params: Params, assignments: list[str]) -> Params:
    """params with `section.key=value` assignments applied (values read as YAML: 3e-4, [a, b], true),
    validated like params.yaml, for sweeps and ablations that change a few keys."""
    raw = params.model_dump(by_alias=True)
    for assignment in assignments:
        key, sep, value = assignment.partition("=")
        *parents, leaf = key.strip().split(".")
        if not sep or not parents:
            raise ConfigError(f"{assignment!r}: expected section.key=value")
        node = raw
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"{assignment!r}: no section {key.rsplit('.', 1)[0]!r}")
            node = node[part]
        node[leaf] = yaml.safe_load(value)
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_describe(e, Path("overrides"))) from e
