"""Safe file IO: whole-or-nothing writes, content hashes and guarded image decoding."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import io
import json
import os
import shutil
import tempfile
import threading
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


HASH_ROWS = 256  # rows hashed at a time: a 25 MP image's pixels are not copied whole (75 MB, twice)


def pixel_hash(image: Image.Image) -> str:
    """sha256 of an RGB image's size and pixels: stable across PNG encoders, recomputable from disk.
    Fed a band of rows at a time (the same bytes in the same order as the whole image's)."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    h = hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode())
    for top in range(0, rgb.height, HASH_ROWS):
        h.update(rgb.crop((0, top, rgb.width, min(top + HASH_ROWS, rgb.height))).tobytes())
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
    (Pillow's convert("RGB") clips 16-bit values, so a 16-bit PNG would come out all white).
    Scaled in integers: a float64 copy of a large 16-bit image took 8 bytes a pixel, several times."""
    im = ImageOps.exif_transpose(im)
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        values = np.asarray(im)
        if im.mode == "F":  # taken as 0..255
            gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        else:
            # 16-bit files decode to I;16, or to I (32-bit) from some formats
            full_scale = 65535 if im.mode.startswith("I;16") or values.max() > 255 else 255
            values = np.clip(values, 0, full_scale).astype(np.uint32)
            gray = ((values * 255 + full_scale // 2) // full_scale).astype(np.uint8)  # rounded, in integers
        return Image.fromarray(gray, mode="L").convert("RGB")
    return im.convert("RGB")


def decoded_bytes(data: bytes) -> int:
    """What decoding `data` holds in memory at most (its source pixels and the RGB copy), read from the
    header alone; 0 when the header is unreadable (decode_rgb then says why)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                return im.width * im.height * 8
    except Exception:  # noqa: BLE001 - any unreadable header: the decode that follows names the problem
        return 0


@functools.cache  # loaded once: release_freed_memory runs after every ingested image
def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return None


M_ARENA_MAX = -8  # glibc's mallopt parameter


def limit_malloc_arenas(arenas: int = 2) -> None:
    """At most `arenas` glibc malloc arenas in this process. Pillow allocates a large image in 16 MB blocks,
    below glibc's mmap threshold, so each thread that decodes one keeps its own arena of freed blocks: 8
    fetching threads took 1.9 GB of RSS for 25 MP images under a 256 MiB decode budget (bench/ingest_scale.py)."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(M_ARENA_MAX, arenas)


def release_freed_memory() -> None:
    """Hand the memory of images already freed back to the system (glibc keeps it for reuse otherwise)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


class DecodeBudget:
    """A bound on the bytes of decoded images that threads hold at once, so that an ingest's peak
    memory follows the size of its largest images, never the number of its rows. An image larger than
    the whole budget waits until it can have all of it."""

    def __init__(self, capacity: int):
        self.capacity, self.used = capacity, 0
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def hold(self, nbytes: int):
        nbytes = min(nbytes, self.capacity)
        with self._changed:
            self._changed.wait_for(lambda: self.used + nbytes <= self.capacity)
            self.used += nbytes
        try:
            yield
        finally:
            with self._changed:
                self.used -= nbytes
                self._changed.notify_all()


def load_rgb(path: str | Path, max_pixels: int) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise BadImage(f"{path}: no such file")
    return decode_rgb(path.read_bytes(), max_pixels, str(path))


def dvc_dir_hash(folder: str | Path, known: dict[str, str] | None = None) -> str:
    """The hash DVC gives a folder (its `.dir` md5), built by dvc-data as `dvc commit` builds it, so
    `scoft ingest` can report the new version without a DVC call (the tests check it against dvc.lock).
    `known`: md5s by relative path that the caller computed as it wrote the files."""
    return _dvc_tree(folder, known).hash_info.value


def file_md5s(folder: str | Path, known: dict[str, str] | None = None) -> dict[str, str]:
    """md5 of every file under `folder` by relative path, as DVC records them."""
    return {"/".join(key): hash_info.value for key, _, hash_info in _dvc_tree(folder, known)}


def _dvc_tree(folder: str | Path, known: dict[str, str] | None):
    """dvc-data's tree of `folder`. Inside a DVC repository it reads a file only when DVC's state
    database holds no md5 for its inode, mtime and size (a file hard-linked into a new version keeps
    all three: at 10,000 images, reading every file again was half of an unchanged re-ingest); the
    `known` md5s are saved into that database first, so a file just written is not read back."""
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_data.hashfile.hash_info import HashInfo
    from dvc_objects.fs.local import LocalFileSystem

    folder = str(Path(folder).resolve())
    try:
        repo = Repo(Repo.find_root(folder))
    except NotDvcRepoError:  # a folder outside any repository: every file is read
        with tempfile.TemporaryDirectory() as odb_dir:
            return build(HashFileDB(LocalFileSystem(), odb_dir), folder, LocalFileSystem(), "md5", dry_run=True)[2]
    with repo:
        if known:
            repo.state.save_many(((os.path.join(folder, rel), HashInfo("md5", md5), None)
                                  for rel, md5 in known.items()), repo.fs)
        return build(repo.cache.local, folder, repo.fs, "md5", dry_run=True, ignore=repo.dvcignore)[2]


def process_umask() -> int:
    """The umask, read without changing it (os.umask can only set it, racing other threads)."""
    with contextlib.suppress(OSError, StopIteration, ValueError):
        with open("/proc/self/status", encoding="ascii") as f:
            return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _as_created(path_or_fd, mode: int) -> None:
    """mkstemp and mkdtemp create owner-only files; give them what open() and mkdir() would."""
    (os.fchmod if isinstance(path_or_fd, int) else os.chmod)(path_or_fd, mode & ~process_umask())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_swap(target: str | Path) -> list[str]:
    """Finish what a process killed inside `atomic_dir` left: if it died between its two renames,
    `target` is missing and its previous version waits as `.NAME.old-PID`: put it back. Remove the
    temporary folders of dead processes. Returns what was done, for the log."""
    target = Path(target)
    done = []
    if not target.parent.is_dir():
        return done
    for stray in sorted(target.parent.glob(f".{target.name}.*-*")):
        kind, _, rest = stray.name[len(target.name) + 2:].partition("-")
        pid = rest.split("-")[0]
        if kind not in ("old", "tmp") or not pid.isdigit() or _pid_alive(int(pid)):
            continue  # not ours, or its process is still swapping
        if kind == "old" and not target.exists():
            os.replace(stray, target)
            done.append(f"restored {target} from {stray.name}, left by a process killed mid-swap")
        else:
            shutil.rmtree(stray, ignore_errors=True)
            done.append(f"removed {stray.name}, left by a process killed mid-swap")
    return done


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder that replaces `target` only if the block succeeds.

    On any error the temporary folder is removed and `target` is left exactly as it was. A kill at
    any point leaves either version recoverable: `recover_swap` (run here first) finishes the job.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_swap(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    _as_created(tmp, 0o777)
    try:
        yield tmp
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC and not e.filename:
            raise OSError(e.errno, e.strerror, str(target)) from e  # name what a full disk stopped
        raise
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | Path, data: bytes | memoryview) -> None:
    """Write `path` whole or not at all: a temporary file beside it, then a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        _as_created(fd, 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC and not e.filename:
            raise OSError(e.errno, e.strerror, str(path)) from e  # name the file a full disk stopped
        raise


def write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows))


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
