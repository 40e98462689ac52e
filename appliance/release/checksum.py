"""Is this the artifact that was built? `verify` recomputes its sha256 in chunks and compares
it with the `.sha256` beside it; when a key is configured, a detached signature
`<artifact>.sig` must verify too (openssl).

Each of these files is opened as a regular file through no link another user owns
(appliance.safefs.open_input: a fifo, a device or a directory is refused before a byte is
read), the small ones are read within a bound, and openssl reads only copies of them and
the artifact's own fd: what it checks is what was hashed."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from appliance import safefs
from appliance.errors import UsageError
from appliance.run import run_bytes

CHUNK = 1024 * 1024
MAX_SUMS = 64 << 10  # a .sha256 of one artifact is one line
MAX_SIG = 64 << 10  # a signature, a public key: a few KiB
CHECKSUM_RE = re.compile(r"([0-9a-fA-F]{64})(?:[ \t]+\*?(.+))?")


def checksum_line(digest: str, artifact_name: str) -> str:
    """One line in `sha256sum` format (two spaces: text mode, as sha256sum writes it)."""
    return f"{digest}  {artifact_name}\n"


def sha256_file(path: Path) -> str:
    fd = _open(path, "artifact")
    try:
        return safefs.sha256_fd(fd)
    finally:
        os.close(fd)


def _open(path: Path, what: str) -> int:
    try:
        return safefs.open_input(path)
    except FileNotFoundError:
        raise UsageError(f"{safefs.shown(path)}: no such {what}") from None
    except OSError as e:
        raise UsageError(f"{safefs.shown(path)}: {e.strerror}") from None


def _read_small(path: Path, limit: int, what: str) -> bytes | None:
    """A small regular file's bytes; None when it does not exist."""
    try:
        return safefs.read_input(path, limit)
    except FileNotFoundError:
        return None
    except safefs.TooLarge:
        raise UsageError(
            f"{path}: larger than {limit} bytes; not a {what}",
            hint="copy the artifact again together with its .sha256",
        ) from None
    except OSError as e:
        raise UsageError(f"{path}: {e.strerror}") from None


def parse_checksum(text: str, artifact_name: str) -> str | None:
    """The hex digest a `sha256sum` line gives for artifact_name, or None if it gives none."""
    lines = text.strip().splitlines()
    m = CHECKSUM_RE.fullmatch(lines[0].strip()) if lines else None
    if m is None or (m.group(2) is not None and m.group(2).strip() != artifact_name):
        return None
    return m.group(1).lower()


def verify(artifact: Path, *, key: Path | None = None) -> str:
    """Check artifact against the .sha256 beside it and, when a key is configured, against the
    detached signature `<artifact>.sig`. Returns the sha256."""
    fd = _open(artifact, "artifact")
    try:
        return _verify(artifact, fd, key)
    finally:
        os.close(fd)


def _verify(artifact: Path, fd: int, key: Path | None) -> str:
    actual = safefs.sha256_fd(fd)
    sums = artifact.with_name(f"{artifact.name}.sha256")
    raw = _read_small(sums, MAX_SUMS, "sha256sum line")
    expected = None if raw is None else parse_checksum(raw.decode(errors="replace"), artifact.name)
    if expected != actual:
        shown = expected or f"nothing usable in {sums.name}"
        raise UsageError(
            f"{artifact.name}: checksum mismatch: expected {shown}, got {actual}",
            hint=f"copy the artifact again together with {sums.name}",
        )
    if key is not None:
        sig = artifact.with_name(f"{artifact.name}.sig")
        copies = {}
        for path, what in ((key, "verification key"), (sig, "signature")):
            data = _read_small(path, MAX_SIG, what)
            if data is None:
                raise UsageError(f"{path}: {what} missing", hint="a key is configured: sign it")
            copies[what] = data
        with tempfile.TemporaryDirectory(prefix="aipbx-verify-") as tmp:
            key_copy, sig_copy = Path(tmp, "key.pem"), Path(tmp, "artifact.sig")
            key_copy.write_bytes(copies["verification key"])
            sig_copy.write_bytes(copies["signature"])
            argv = ["openssl", "dgst", "-sha256", "-verify", str(key_copy)]
            os.lseek(fd, 0, os.SEEK_SET)  # openssl reads the artifact that was hashed
            proc = run_bytes([*argv, "-signature", str(sig_copy)], stdin=fd, check=False)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).decode(errors="replace").strip().splitlines()
            raise UsageError(
                f"{artifact.name}: signature verification failed"
                + (f": {tail[-1]}" if tail else ""),
                hint=f"the artifact is not signed by the key {key}",
            )
    return actual
