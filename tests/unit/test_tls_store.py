"""The certificate store nginx loads at every handshake (appliance.tls_store), with real
openssl keys and certificates: a renewal with the same key replaces fullchain.pem in the
key's directory, a new key gets a new directory made whole before it appears, nothing that
does not match its key or has expired gets in, and `commit` keeps the newest two."""

from __future__ import annotations

import os
import subprocess
from datetime import datetime
from pathlib import Path

import pytest

from appliance import tls_store
from appliance.paths import Paths
from appliance.tls_store import TlsError


def ossl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_key(path: Path) -> Path:
    ossl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path))
    return path


def make_cert(path: Path, key: Path, serial: int, days: int = 30) -> Path:
    ossl(
        "req", "-x509", "-new", "-key", str(key), "-subj", "/CN=pbx.test", "-days", str(days),
        "-set_serial", str(serial), "-out", str(path),
    )  # fmt: skip
    return path


def make_expired(path: Path, key: Path) -> Path:
    """openssl 3.0's req cannot backdate; python3-cryptography (certbot's) can."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    private = serialization.load_pem_private_key(key.read_bytes(), password=None)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "old")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())  # type: ignore[arg-type]
        .serial_number(7)
        .not_valid_before(datetime(2020, 1, 1))
        .not_valid_after(datetime(2020, 2, 1))
        .sign(private, hashes.SHA256())  # type: ignore[arg-type]
    )
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    return Paths(tmp_path / "root")


def test_same_key_renewal_replaces_the_chain_in_place(paths: Paths, tmp_path: Path) -> None:
    key = make_key(tmp_path / "k.pem")
    first = tls_store.place(paths, make_cert(tmp_path / "c1.pem", key, 1), key, kind="acme")
    assert first.created and first.chain_changed
    tls_store.commit(paths, first.dir)
    assert tls_store.current(paths) == first.dir
    assert (first.dir / "privkey.pem").stat().st_mode & 0o777 == 0o640
    assert (first.dir / "fullchain.pem").stat().st_mode & 0o777 == 0o644
    inode = (first.dir / "privkey.pem").stat().st_ino

    again = tls_store.place(paths, tmp_path / "c1.pem", key, kind="acme")
    assert (again.created, again.chain_changed) == (False, False)

    renewed = tls_store.place(paths, make_cert(tmp_path / "c2.pem", key, 2), key, kind="acme")
    assert renewed.dir == first.dir and not renewed.created and renewed.chain_changed
    assert (first.dir / "fullchain.pem").read_bytes() == (tmp_path / "c2.pem").read_bytes()
    assert (first.dir / "privkey.pem").stat().st_ino == inode  # the key file is untouched
    assert tls_store.origin(first.dir)["cert"] == str(tmp_path / "c2.pem")


def test_a_new_key_gets_a_new_directory_and_commit_keeps_two(paths: Paths, tmp_path: Path) -> None:
    dirs = []
    for i in range(3):
        key = make_key(tmp_path / f"k{i}.pem")
        placed = tls_store.place(
            paths, make_cert(tmp_path / f"c{i}.pem", key, i + 1), key, kind="acme"
        )
        assert placed.created and placed.dir not in dirs
        dirs.append(placed.dir)
        tls_store.commit(paths, placed.dir)
    assert tls_store.current(paths) == dirs[2]
    left = sorted(p.name for p in paths.tls_served.iterdir())
    assert left == sorted(["current", dirs[1].name, dirs[2].name])
    assert not any(n.startswith(".new-") for n in os.listdir(paths.tls_served))


def test_a_certificate_for_another_key_is_refused(paths: Paths, tmp_path: Path) -> None:
    key, other = make_key(tmp_path / "k.pem"), make_key(tmp_path / "o.pem")
    cert = make_cert(tmp_path / "c.pem", other, 1)
    with pytest.raises(TlsError, match="do not match"):
        tls_store.place(paths, cert, key, kind="acme")
    assert not paths.tls_served.exists() or not any(paths.tls_served.iterdir())


def test_an_expired_certificate_or_garbage_is_refused(paths: Paths, tmp_path: Path) -> None:
    key = make_key(tmp_path / "k.pem")
    make_expired(tmp_path / "old.pem", key)
    with pytest.raises(TlsError, match="expired"):
        tls_store.place(paths, tmp_path / "old.pem", key, kind="acme")
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    with pytest.raises(TlsError, match="is not a certificate"):
        tls_store.place(paths, tmp_path / "junk.pem", key, kind="acme")
    with pytest.raises(TlsError, match="is not a private key"):
        tls_store.place(
            paths, make_cert(tmp_path / "c.pem", key, 1), tmp_path / "junk.pem", kind="x"
        )


def test_leaf_der_is_the_first_certificate_of_the_chain(tmp_path: Path) -> None:
    key = make_key(tmp_path / "k.pem")
    a = make_cert(tmp_path / "a.pem", key, 1).read_bytes()
    b = make_cert(tmp_path / "b.pem", key, 2).read_bytes()
    assert tls_store.leaf_der(a + b) == tls_store.leaf_der(a) != tls_store.leaf_der(b)
    with pytest.raises(TlsError):
        tls_store.leaf_der(b"nothing")


def test_the_directory_is_named_after_the_public_key() -> None:
    pem = "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"
    assert tls_store.key_dir_name(pem) == tls_store.key_dir_name(pem.replace("\n", "\r\n"))
    assert tls_store.key_dir_name(pem).startswith("key-") and len(tls_store.key_dir_name(pem)) == 20
