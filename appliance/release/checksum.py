"""Is this the artifact that was built? `verify` recomputes its sha256 in chunks and compares
it with the `.sha256` beside it; when a key is configured, a detached signature
`<artifact>.sig` must verify too (openssl)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from appliance.errors import UsageError
from appliance.run import run

CHUNK = 1024 * 1024
CHECKSUM_RE = re.compile(r"([0-9a-fA-F]{64})(?:[ \t]+\*?(.+))?")


def checksum_line(digest: str, artifact_name: str) -> str:
    """One line in `sha256sum` format (two spaces: text mode, as sha256sum writes it)."""
    return f"{digest}  {artifact_name}\n"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


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
    if not artifact.is_file():
        raise UsageError(f"{artifact}: no such artifact")
    actual = sha256_file(artifact)
    sums = artifact.with_name(f"{artifact.name}.sha256")
    try:
        expected = parse_checksum(sums.read_text(errors="replace"), artifact.name)
    except FileNotFoundError:
        expected = None
    if expected != actual:
        shown = expected or f"nothing usable in {sums.name}"
        raise UsageError(
            f"{artifact.name}: checksum mismatch: expected {shown}, got {actual}",
            hint=f"copy the artifact again together with {sums.name}",
        )
    if key is not None:
        sig = artifact.with_name(f"{artifact.name}.sig")
        for path, what in ((key, "verification key"), (sig, "signature")):
            if not path.is_file():
                raise UsageError(f"{path}: {what} missing", hint="a key is configured: sign it")
        argv = ["openssl", "dgst", "-sha256", "-verify", str(key), "-signature", str(sig)]
        proc = run([*argv, str(artifact)], check=False)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()
            raise UsageError(
                f"{artifact.name}: signature verification failed"
                + (f": {tail[-1]}" if tail else ""),
                hint=f"the artifact is not signed by the key {key}",
            )
    return actual
