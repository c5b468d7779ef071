"""The reviewers' app: one pair at a time at a reviewer's link, and the same through a JSON API.

Pages work without JavaScript (plain form posts, protected against cross-site requests by a per-reviewer
token in the form and a SameSite cookie) and, with it, from the keyboard (1 / 2 / 0 choose the better
image or "can't tell", q / w / e the more stereotyped, z / x flag an image, Enter sends). Images are
served under opaque random ids to a reviewer of their campaign only, with nothing in the URL, headers
or page that tells the models apart. The JSON API authenticates by the invitation token as a bearer
header: GET /api/v1/next, POST /api/v1/ratings.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path

from fastapi import FastAPI, Form, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from jinja2 import DictLoader, Environment, select_autoescape
from limits import RateLimitItemPerMinute
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter
from sqlalchemy.orm import sessionmaker

from scoft.review.campaigns import BadRating, NotInvited, image_for, next_pair, rate, reviewer_for

COOKIE = "scoft_review"
_PAGES = {
    "pair.html": """<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>Review</title>
<link rel="stylesheet" href="/static/review.css"></head>
<body><p class="progress">Pair {{ done + 1 }} of {{ total }}</p>
<details class="about"><summary>What is this?</summary><p>A new image model is being trained to depict your
culture as your community does. Each pair shows two pictures made for the description above them, by the new
model and by another, in a random order: nobody here knows which is which. Pick the one that depicts the
culture better. Your answers, with other community reviewers', decide whether the new model is used.</p>
</details><h1>{{ prompt }}</h1>
<form method="post" action="/r/{{ token }}/rate"><input type="hidden" name="pair" value="{{ pair }}">
<input type="hidden" name="csrf" value="{{ csrf }}">
<div class="pair">{% for src in images %}<figure><img src="{{ src }}" alt="image {{ loop.index }}">
<figcaption><label><input type="checkbox" name="offensive_{{ loop.index0 }}" value="1"> image {{ loop.index }}
is offensive</label></figcaption></figure>{% endfor %}</div>
<fieldset><legend>Which image better depicts the culture for this prompt?</legend>
<label><input type="radio" name="better" value="0" required> image 1</label>
<label><input type="radio" name="better" value="1"> image 2</label>
<label><input type="radio" name="better" value=""> can't tell</label></fieldset>
<fieldset><legend>Which is more stereotyped?</legend>
<label><input type="radio" name="more_stereotyped" value="0" required> image 1</label>
<label><input type="radio" name="more_stereotyped" value="1"> image 2</label>
<label><input type="radio" name="more_stereotyped" value=""> can't tell</label></fieldset>
<button type="submit">Send</button></form>
<p class="keys">Keys: <kbd>1</kbd> <kbd>2</kbd> <kbd>0</kbd> better image 1, image 2, can't tell;
<kbd>q</kbd> <kbd>w</kbd> <kbd>e</kbd> more stereotyped image 1, image 2, can't tell; <kbd>z</kbd> <kbd>x</kbd>
offensive image 1, image 2; <kbd>Enter</kbd> sends.</p>
<script src="/static/review.js"></script>
</body></html>""",
    "message.html": """<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>Review</title></head>
<body><h1>{{ title }}</h1><p>{{ text }}</p></body></html>""",
}
# Served as files of their own, so that the page's Content-Security-Policy allows no inline code at all.
# Both images side by side on any screen (a 390 px phone included), touch targets of at least 44 px, and
# the keyboard hints only where there is a keyboard and a fine pointer.
_STATIC = {"review.css": ("text/css", """body{font-family:sans-serif;max-width:60rem;margin:.5rem auto;padding:0 .75rem}
h1{font-size:1.15rem;margin:.4rem 0}.progress{margin:.2rem 0;color:#444}.about{margin:.2rem 0;color:#333}
.about summary{min-height:44px;line-height:44px;cursor:pointer}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:.5rem}.pair figure{margin:0;min-width:0}
.pair img{width:100%;max-height:45vh;object-fit:contain;image-rendering:pixelated;border:1px solid #ccc}
fieldset{margin:.5rem 0}label{display:inline-flex;align-items:center;gap:.4rem;min-height:44px;padding:0 .6rem}
input[type=radio],input[type=checkbox]{width:1.4rem;height:1.4rem}
button{min-height:44px;min-width:44px;padding:0 1.4rem;font-size:1rem}.keys{color:#555;font-size:.85rem}
@media (hover: none), (pointer: coarse){.keys{display:none}}"""),
           "review.js": ("text/javascript", """
const keys = {"1": ["better", "0"], "2": ["better", "1"], "0": ["better", ""],
              "q": ["more_stereotyped", "0"], "w": ["more_stereotyped", "1"], "e": ["more_stereotyped", ""]};
document.addEventListener("keydown", e => {
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  const choice = keys[e.key.toLowerCase()], flag = {"z": 0, "x": 1}[e.key.toLowerCase()];
  if (choice) document.querySelector(`input[name=${choice[0]}][value="${choice[1]}"]`).checked = true;
  else if (flag !== undefined) { const box = document.querySelector(`input[name=offensive_${flag}]`);
                                 box.checked = !box.checked; }
  else if (e.key === "Enter") document.querySelector("form").requestSubmit();
  else return;
  e.preventDefault();
});
""")}
_TEMPLATES = Environment(loader=DictLoader(_PAGES), autoescape=select_autoescape(default=True))
# Nothing of the app's own in the headers; no caching or sniffing of what a reviewer sees.
# No inline style or script, no framing by another site (clickjacking a reviewer's answer).
_HEADERS = {"Cache-Control": "private, no-store", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
            "X-Frame-Options": "DENY",
            "Content-Security-Policy": "default-src 'none'; img-src 'self'; style-src 'self'; script-src 'self'; "
                                       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"}
MAX_BODY = 4096  # bytes: a rating (API or form) is a few hundred; anything larger is refused unread (413)
# Guessing tokens: an address with this many unknown or revoked tokens in a minute is refused (429), good
# tokens included, until the minute has passed (196 guesses a second were answered). Behind a proxy every
# reviewer shares its address: put the limit there instead.
FAILED_TOKENS_PER_MINUTE = 20
# A reviewer rates one pair in seconds; a script flooding the store with one token is refused (429).
RATINGS_PER_MINUTE = 60


class TooMany(NotInvited):
    def __init__(self, message: str):
        super().__init__(message, 429)


def create_app(sessions: sessionmaker, root: str | Path, public_url: str | None = None,
               failed_tokens_per_minute: int = FAILED_TOKENS_PER_MINUTE,
               ratings_per_minute: int = RATINGS_PER_MINUTE) -> FastAPI:
    """The app on the review store `sessions`, serving images from the workspace `root`, reached by
    reviewers at `public_url` (review.public_url): the addresses it gives out are built from it, never
    from a request's Host header, and its cookie is Secure when it is https."""
    app = FastAPI(title="scoft review", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_BodyLimit, limit=MAX_BODY)
    root, secret = Path(root), secrets.token_bytes(32)
    secure = bool(public_url) and public_url.startswith("https://")
    limiter = MovingWindowRateLimiter(MemoryStorage())
    failures, ratings = RateLimitItemPerMinute(failed_tokens_per_minute), RateLimitItemPerMinute(ratings_per_minute)

    def invited(session, token: str | None, request: Request):
        """The reviewer a token opens; refused for an address that has guessed too often this minute."""
        address = request.client.host if request.client else "unknown"
        if not limiter.test(failures, address):
            raise TooMany("too many links that open nothing from this address: wait a minute and try again")
        try:
            return reviewer_for(session, token)
        except NotInvited:
            limiter.hit(failures, address)
            raise

    def rating_allowed(reviewer) -> bool:
        return limiter.hit(ratings, reviewer.id)

    @app.get("/static/{name}")
    def static(name: str):
        if name not in _STATIC:
            return Response(status_code=404, headers=_HEADERS)
        media, text = _STATIC[name]
        return Response(text, media_type=media, headers={**_HEADERS, "Cache-Control": "no-cache"})

    def csrf(reviewer_id: str) -> str:
        return hmac.new(secret, reviewer_id.encode(), hashlib.sha256).hexdigest()

    def page(name: str, status: int = 200, **values) -> HTMLResponse:
        return HTMLResponse(_TEMPLATES.get_template(name).render(**values), status_code=status, headers=_HEADERS)

    def refused(e: NotInvited) -> HTMLResponse:
        return page("message.html", e.status, title="This link opens nothing", text=str(e))

    @app.get("/r/{token}")
    def review_page(token: str, request: Request):
        with sessions() as session:
            try:
                reviewer = invited(session, token, request)
            except NotInvited as e:
                return refused(e)
            pair, done, total = next_pair(session, reviewer)
            if pair is None:
                return page("message.html", title="Thank you", text=f"You rated all {total} pairs.")
            response = page("pair.html", token=token, pair=pair.id, prompt=pair.prompt, done=done, total=total,
                            images=[f"/img/{pair.first_image}", f"/img/{pair.second_image}"], csrf=csrf(reviewer.id))
        response.set_cookie(COOKIE, token, httponly=True, samesite="strict", path="/", secure=secure)  # its images
        return response

    @app.post("/r/{token}/rate")
    def rate_form(token: str, request: Request, pair: str = Form(""), csrf_field: str = Form("", alias="csrf"),
                  better: str = Form(""), more_stereotyped: str = Form(""), offensive_0: str = Form(""),
                  offensive_1: str = Form("")):
        with sessions() as session:
            try:
                reviewer = invited(session, token, request)
            except NotInvited as e:
                return refused(e)
            if not hmac.compare_digest(csrf_field, csrf(reviewer.id)):
                return page("message.html", 403, title="Not sent", text="this form did not come from your review page")
            if not rating_allowed(reviewer):
                return page("message.html", 429, title="Not stored", text="too many answers this minute: wait a moment")
            try:
                rate(session, reviewer, pair, _position(better), _position(more_stereotyped),
                     [offensive_0 == "1", offensive_1 == "1"])
            except BadRating as e:
                return page("message.html", e.status, title="Not stored", text=str(e))
            _announce_if_done(session, reviewer)
        return RedirectResponse(f"/r/{token}", status_code=303, headers=_HEADERS)

    @app.get("/img/{image_id}")
    def image(image_id: str, request: Request):
        with sessions() as session:
            try:
                reviewer = invited(session, _bearer(request) or request.cookies.get(COOKIE), request)
                path = image_for(session, reviewer, image_id)
            except NotInvited as e:
                return Response(status_code=e.status, headers=_HEADERS)
            except BadRating as e:
                return Response(status_code=e.status, headers=_HEADERS)
        # the bytes under the opaque id: no file name, date or ETag that could tell the models apart
        return Response((root / path).read_bytes(), media_type="image/png", headers=_HEADERS)

    @app.get("/api/v1/next")
    def api_next(request: Request):
        with sessions() as session:
            try:
                reviewer = invited(session, _bearer(request), request)
            except NotInvited as e:
                return JSONResponse({"error": str(e)}, status_code=e.status, headers=_HEADERS)
            pair, done, total = next_pair(session, reviewer)
        if pair is None:
            return Response(status_code=204, headers=_HEADERS)
        base = (public_url or str(request.base_url)).rstrip("/")
        return JSONResponse({"pair": pair.id, "prompt": pair.prompt, "progress": {"done": done, "total": total},
                             "images": [f"{base}/img/{pair.first_image}", f"{base}/img/{pair.second_image}"]},
                            headers=_HEADERS)

    @app.post("/api/v1/ratings")
    async def api_rate(request: Request):
        with sessions() as session:  # the token first: nothing of the body is read for a stranger
            try:
                reviewer = invited(session, _bearer(request), request)
            except NotInvited as e:
                return JSONResponse({"error": str(e)}, status_code=e.status, headers=_HEADERS)
            if not rating_allowed(reviewer):
                return JSONResponse({"error": f"more than {ratings_per_minute} ratings this minute: wait a moment"},
                                    status_code=429, headers=_HEADERS)
        try:
            body = await request.json()
        except (ValueError, RecursionError):  # not JSON, or nested deeper than a parser goes
            return JSONResponse({"error": "the body is not JSON (a rating object)"}, status_code=400,
                                headers=_HEADERS)
        with sessions() as session:
            reviewer = reviewer_for(session, _bearer(request))
            if not isinstance(body, dict):
                return JSONResponse({"error": "the body must be a JSON object"}, status_code=422, headers=_HEADERS)
            try:
                rate(session, reviewer, body.get("pair"), body.get("better"), body.get("more_stereotyped"),
                     body.get("offensive", [False, False]))
            except BadRating as e:
                return JSONResponse({"error": str(e)}, status_code=e.status, headers=_HEADERS)
            _announce_if_done(session, reviewer)
        return JSONResponse({"stored": True}, status_code=201, headers=_HEADERS)

    return app


class _BodyLimit:
    """Refuse a request body over `limit` bytes with 413 before the app reads it: by its Content-Length,
    or, sent in chunks, as soon as it passes the limit. Unauthenticated 100 MB posts were read whole."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await self._refuse(send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._refuse(send)

    async def _refuse(self, send):
        response = JSONResponse({"error": f"the body is over {self.limit} bytes"}, status_code=413, headers=_HEADERS)
        await response({"type": "http"}, None, send)


class _TooLarge(Exception):
    pass


def _announce_if_done(session, reviewer) -> None:
    """When a reviewer has rated every pair, tell Prefect (`scoft.review.completed`), whose review-close
    deployment then judges the campaign; only where a Prefect server is configured (PREFECT_API_URL)."""
    import os

    if not os.environ.get("PREFECT_API_URL") or next_pair(session, reviewer)[0] is not None:
        return  # (the environment first: finding the next pair reads the whole campaign)
    from prefect.events import emit_event

    emit_event(event="scoft.review.completed", resource={"prefect.resource.id": f"scoft.review.{reviewer.campaign_id}"},
               payload={"campaign": reviewer.campaign_id, "reviewer": reviewer.id})


def _position(value: str) -> int | None:
    """A form's radio value: "0" or "1" (the image's position), anything else "can't tell"."""
    return int(value) if value in ("0", "1") else None


def _bearer(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None
