"""The review store: campaigns, their images and pairs, reviewers and ratings.

SQLAlchemy over `review.database_url` (an SQLite file in the workspace by default, PostgreSQL by URL
for a team's deployment). The schema is versioned with Alembic (scoft/review/migrations): `open_store`
brings a database to the current version before anything is read or written. Ratings are never
deleted or updated: a pair rated twice keeps both rows, and the last one counts.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from sqlalchemy import Boolean, DateTime, ForeignKey, Integer, String, Text, create_engine
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

MIGRATIONS = Path(__file__).parent / "migrations"


class StoreUnavailable(RuntimeError):
    """The review database cannot be reached or brought up to date (the URL shown without its password)."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Base(DeclarativeBase):
    pass


class Campaign(Base):
    """A culture's candidate LoRA put before insiders: pairs of its images against the base model's."""

    __tablename__ = "campaigns"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    culture: Mapped[str] = mapped_column(String(3), index=True)
    candidate_sha256: Mapped[str] = mapped_column(String(64))
    lineage: Mapped[str] = mapped_column(String(128))
    evaluation: Mapped[str] = mapped_column(Text)  # the folder whose images it shows
    opened_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)
    status: Mapped[str] = mapped_column(String(16), default="open")  # open | closed


class Image(Base):
    """An image shown to reviewers under an opaque random id; which model made it stays here."""

    __tablename__ = "images"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    campaign_id: Mapped[str] = mapped_column(ForeignKey("campaigns.id"), index=True)
    model: Mapped[str] = mapped_column(String(32))  # "scoft" (the candidate) or "base"
    path: Mapped[str] = mapped_column(Text)


class Pair(Base):
    """One prompt and seed: the candidate's image and the other model's, in a position drawn at random.
    A repeat (`repeat_of`) shows one reviewer (`reviewer_id`) a pair again, its images swapped."""

    __tablename__ = "pairs"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    campaign_id: Mapped[str] = mapped_column(ForeignKey("campaigns.id"), index=True)
    comparison: Mapped[str] = mapped_column(String(16))  # "base" or "production": the candidate's opponent
    prompt: Mapped[str] = mapped_column(Text)
    seed: Mapped[int] = mapped_column(Integer)
    record: Mapped[str] = mapped_column(String(64))  # the held-out CCUB record the prompt comes from
    first_image: Mapped[str] = mapped_column(ForeignKey("images.id"))
    second_image: Mapped[str] = mapped_column(ForeignKey("images.id"))
    candidate_first: Mapped[bool] = mapped_column(Boolean)
    repeat_of: Mapped[str | None] = mapped_column(String(32), nullable=True)
    reviewer_id: Mapped[str | None] = mapped_column(String(32), nullable=True, index=True)  # a repeat's only viewer


class Reviewer(Base):
    """An invitation: a pseudonymous id and the sha256 of its secret token (the token is never stored)."""

    __tablename__ = "reviewers"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    campaign_id: Mapped[str] = mapped_column(ForeignKey("campaigns.id"), index=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    invited_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Rating(Base):
    """One answer to one pair, positions as shown (0: first image, 1: second); never deleted."""

    __tablename__ = "ratings"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    pair_id: Mapped[str] = mapped_column(ForeignKey("pairs.id"), index=True)
    reviewer_id: Mapped[str] = mapped_column(ForeignKey("reviewers.id"), index=True)
    better: Mapped[int | None] = mapped_column(Integer, nullable=True)  # None: can't tell
    more_stereotyped: Mapped[int | None] = mapped_column(Integer, nullable=True)
    offensive_first: Mapped[bool] = mapped_column(Boolean, default=False)
    offensive_second: Mapped[bool] = mapped_column(Boolean, default=False)
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)


def shown_url(url: str) -> str:
    """The database URL as it may be printed: without its password."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparsable URL is shown as unparsable, never echoed
        return "(an unparsable database URL)"


def open_store(url: str, root: str | Path = ".") -> sessionmaker:
    """Sessions on the review database at `url` (an SQLite file relative to the workspace `root`), its
    schema migrated to the current version first."""
    from alembic import command
    from alembic.config import Config

    try:
        if url.startswith("sqlite:///") and not Path(make_url(url).database).is_absolute():
            url = f"sqlite:///{Path(root).resolve() / make_url(url).database}"
        if url.startswith("sqlite:///"):
            Path(make_url(url).database).parent.mkdir(parents=True, exist_ok=True)
        engine: Engine = create_engine(url)
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
    except (SQLAlchemyError, OSError, ValueError, ImportError) as e:  # ImportError: no driver for the URL
        raise StoreUnavailable(f"review database {shown_url(url)}: {type(e).__name__}: "
                               f"{str(e).splitlines()[0][:200] if str(e) else ''}") from e
    return sessionmaker(engine, expire_on_commit=False)
