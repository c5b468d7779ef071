"""Signatures on what ships: each lineage record and each production LoRA is signed at promotion with
OpenSSF model-signing's elliptic-curve key pair (offline, no transparency log), and checked by
`scoft lineage verify` and at every load of a production LoRA. A hash alone proves nothing against
someone who can rewrite the hash too; a signature needs the private key, which never enters the
repository (params.yaml `lineage.signing_key` names where it is kept)."""

from __future__ import annotations

import os
from pathlib import Path

SIGNING_KEY, VERIFY_KEY = "lineage.signing_key", "lineage.verify_key"


class SigningError(ValueError):
    """A signature that cannot be made as configured (no key file, a key inside the repository)."""


def signature_of(path: str | Path) -> Path:
    """Where the signature of a file or folder lies: beside it, `<name>.sig`."""
    path = Path(path)
    return path.with_name(path.name + ".sig")


def _key(setting: str, value: str, root: Path, private: bool) -> Path:
    key = Path(value).expanduser()
    key = key if key.is_absolute() else (root / key)
    if not key.is_file():
        raise SigningError(f"{setting}: {value}: no such key file (a PEM elliptic-curve "
                           f"{'private' if private else 'public'} key)")
    if private and key.resolve().is_relative_to(root.resolve()):
        raise SigningError(f"{setting}: {value} lies inside the project folder {root.resolve()}: keep the private "
                           "key outside the repository (e.g. ~/.config/scoft/signing-key.pem)")
    return key


def sign(path: str | Path, signing_key: str, root: str | Path = ".") -> Path:
    """Sign the file or folder `path` with the private key `signing_key`; returns the signature's path
    (written whole: a temporary file, then a rename)."""
    from model_signing import signing

    key, target = _key(SIGNING_KEY, signing_key, Path(root), private=True), signature_of(path)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        signing.Config().use_elliptic_key_signer(private_key=key).sign(Path(path), tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def signature_problem(path: str | Path, verify_key: str, root: str | Path = ".") -> str | None:
    """Why the signature of `path` does not hold under the public key `verify_key`, or None."""
    from model_signing import verifying

    path, signature = Path(path), signature_of(path)
    if not signature.is_file():
        return f"{path}: not signed ({signature.name} is missing)"
    try:
        key = _key(VERIFY_KEY, verify_key, Path(root), private=False)
        verifying.Config().use_elliptic_key_verifier(public_key=key).verify(path, signature)
    except SigningError as e:
        return str(e)
    except (ValueError, OSError) as e:  # model-signing says ValueError for a mismatch of content or key
        reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        return f"{path}: its signature does not verify ({reason})"
    return None


def trusted_verify_key(lineage, root: str | Path = ".", own_key: str | None = None,
                       unsigned: bool = False) -> tuple[str | None, str | None]:
    """The public key an audit checks signatures with, and why the audit cannot trust what it checks
    (None when it can). `lineage`: params.yaml's lineage section. An auditor's `own_key` (kept outside
    the workspace) is trusted as given; the workspace's verify_key only when its file's sha256 is the
    one params.yaml pins, since a key pair of anyone's own, its public half swapped into the workspace,
    would otherwise bless records it re-signed. No verify key is a problem unless `unsigned` says the
    auditor means it; a signing key without a verify key always is."""
    from scoft.io import sha256_file

    if own_key is not None:
        return own_key, None
    if lineage.verify_key is None:
        if lineage.signing_key is not None:
            return None, (f"{SIGNING_KEY} is set but {VERIFY_KEY} is null: the signatures made are never "
                          "checked; set verify_key (and verify_key_sha256)")
        if unsigned:
            return None, None
        return None, (f"{VERIFY_KEY} is null: no signature is checked, so a record rewritten with its hashes "
                      "passes; sign (lineage.signing_key, verify_key) or pass --unsigned to verify an unsigned "
                      "workspace on purpose")
    try:
        key = _key(VERIFY_KEY, lineage.verify_key, Path(root), private=False)
    except SigningError as e:
        return None, str(e)
    actual = sha256_file(key)
    if lineage.verify_key_sha256 is None:
        return None, (f"{VERIFY_KEY} {lineage.verify_key} is not pinned: set lineage.verify_key_sha256 to its "
                      f"sha256 ({actual}) in params.yaml, or pass your own copy with --key")
    if actual != lineage.verify_key_sha256:
        return None, (f"{VERIFY_KEY} {lineage.verify_key} has sha256 {actual[:16]}, params.yaml pins "
                      f"{lineage.verify_key_sha256[:16]}: the key was replaced; nothing it verifies is trusted")
    return str(key), None
