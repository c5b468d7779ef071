"""Safe file IO: whole-or-nothing writes, content hashes and guarded image decoding."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps


class BadImage(ValueError):
    """An image that is missing, undecodable, too large or otherwise unusable."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj) -> str:
    """Hash of a JSON-able object, independent of key order."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def pixel_hash(image: Image.Image) -> str:
    """sha256 of an RGB image's size and pixels: stable across PNG encoders, recomputable from disk."""
    rgb = image.convert("RGB")
    h = hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode())
    h.update(rgb.tobytes())
    return h.hexdigest()


def decode_rgb(data: bytes, max_pixels: int, where: str) -> Image.Image:
    """Decode image bytes fully and return RGB, refusing empty input, bombs, truncation and non-images."""
    if not data:
        raise BadImage(f"{where}: empty file")
    try:
        with warnings.catch_warnings():  # our own cap below is the one that decides
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
        with im:
            # The header gives the size before any pixel is decoded: refuse bombs here.
            if im.width * im.height > max_pixels:
                raise BadImage(f"{where}: {im.width}x{im.height} exceeds the pixel cap {max_pixels}")
            im.load()
            return as_displayed_rgb(im)
    except BadImage:
        raise
    except Image.DecompressionBombError as e:
        raise BadImage(f"{where}: exceeds the pixel cap ({e})") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImage(f"{where}: cannot decode image ({e})") from e


def as_displayed_rgb(im: Image.Image) -> Image.Image:
    """RGB as a viewer shows the image: EXIF orientation applied, high bit depth scaled to 8 bits
    (Pillow's convert("RGB") clips 16-bit values, so a 16-bit PNG would come out all white)."""
    im = ImageOps.exif_transpose(im)
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        values = np.asarray(im, dtype=np.float64)
        # 16-bit files decode to I;16, or to I (32-bit) from some formats; F is taken as 0..255.
        full_scale = 65535.0 if im.mode != "F" and (im.mode.startswith("I;16") or values.max() > 255) else 255.0
        gray = np.clip(np.rint(values * (255.0 / full_scale)), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    return im.convert("RGB")


def load_rgb(path: str | Path, max_pixels: int) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise BadImage(f"{path}: no such file")
    return decode_rgb(path.read_bytes(), max_pixels, str(path))


def dvc_dir_hash(folder: str | Path) -> str:
    """The hash DVC 3 gives a folder (its `.dir` md5): md5 of the sorted JSON list of file md5s.

    Computed here so `scoft ingest` can report the new version without a DVC call; the tests check
    that it equals what dvc.lock records.
    """
    folder = Path(folder)
    entries = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h = hashlib.md5()
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        entries.append({"md5": h.hexdigest(), "relpath": path.relative_to(folder).as_posix()})
    entries.sort(key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode("utf-8")).hexdigest() + ".dir"


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder that replaces `target` only if the block succeeds.

    On any error the temporary folder is removed and `target` is left exactly as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary shared folder
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows))


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
