"""PostgreSQL: the appliance's role and database, created with SCRAM in Debian's cluster.
SQL goes to psql on stdin as the postgres user; the password never appears in an argv."""

from __future__ import annotations

import base64
import hashlib
import hmac

from appliance.config import Database
from appliance.run import run


def _psql(sql: str, *, db: str = "postgres", secrets: tuple[str, ...] = ()) -> str:
    argv = [
        "runuser",
        "-u",
        "postgres",
        "--",
        "psql",
        "-X",
        "-q",
        "-At",
        "-v",
        "ON_ERROR_STOP=1",
        "-d",
        db,
    ]
    return run(
        argv,
        input=sql,
        secrets=secrets,
        hint="is PostgreSQL running? `systemctl status postgresql`",
    ).stdout.strip()


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def role_exists(name: str) -> bool:
    return _psql(f"SELECT 1 FROM pg_roles WHERE rolname = {_literal(name)};") == "1"


def database_exists(name: str) -> bool:
    return _psql(f"SELECT 1 FROM pg_database WHERE datname = {_literal(name)};") == "1"


def password_matches(user: str, password: str) -> bool:
    """True when the role's stored SCRAM verifier was made from this password."""
    stored = _psql(f"SELECT rolpassword FROM pg_authid WHERE rolname = {_literal(user)};")
    if not stored.startswith("SCRAM-SHA-256$"):
        return False
    return scram_matches(stored, password)


def scram_matches(verifier: str, password: str) -> bool:
    try:
        _, rest = verifier.split("$", 1)
        iter_salt, keys = rest.split("$", 1)
        iterations, salt_b64 = iter_salt.split(":", 1)
        stored_key_b64, _server_key_b64 = keys.split(":", 1)
    except ValueError:
        return False
    salted = hashlib.pbkdf2_hmac(
        "sha256", password.encode(), base64.b64decode(salt_b64), int(iterations)
    )
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    stored_key = hashlib.sha256(client_key).digest()
    return hmac.compare_digest(stored_key, base64.b64decode(stored_key_b64))


def ensure(db: Database, password: str) -> list[str]:
    """Create or repair the role (SCRAM password) and the database; return what changed."""
    changes: list[str] = []
    pw = _literal(password)
    scram = "SET password_encryption = 'scram-sha-256';\n"
    if not role_exists(db.user):
        _psql(scram + f"CREATE ROLE {db.user} LOGIN PASSWORD {pw};", secrets=(password,))
        changes.append(f"created PostgreSQL role {db.user} (SCRAM)")
    elif not password_matches(db.user, password):
        _psql(scram + f"ALTER ROLE {db.user} LOGIN PASSWORD {pw};", secrets=(password,))
        changes.append(f"reset the password of PostgreSQL role {db.user} (SCRAM)")
    if not database_exists(db.name):
        run(["runuser", "-u", "postgres", "--", "createdb", "-O", db.user, db.name])
        changes.append(f"created database {db.name} owned by {db.user}")
    return changes
