"""The `writes` table through PgBouncer in transaction pooling mode: asyncpg with its
statement cache off (no named prepared statement outlives a transaction) and every
parameterized statement inside an explicit transaction, so it keeps one server connection."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import asyncpg  # type: ignore[import-untyped]

from aipbx_sample.settings import Db

log = logging.getLogger("gunicorn.error")

CREATE = """
CREATE TABLE IF NOT EXISTS writes (
    id text PRIMARY KEY,
    version text NOT NULL,
    color text,
    ts timestamptz NOT NULL DEFAULT now()
)
"""
INSERT = """
INSERT INTO writes (id, version, color) VALUES ($1, $2, $3)
ON CONFLICT (id) DO NOTHING RETURNING version
"""
# What a write failed with when the database, not the request, is at fault.
DB_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
)


async def open_pool(db: Db, wait_s: float) -> Any:
    """A small pool with the table created; retried until wait_s passes, then the error."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            pool = await asyncpg.create_pool(
                host=db.host,
                port=db.port,
                user=db.user,
                password=db.password,
                database=db.name,
                min_size=1,
                max_size=4,
                statement_cache_size=0,
                command_timeout=10,
            )
            try:
                async with pool.acquire() as conn, conn.transaction():
                    await conn.execute(CREATE)
            except BaseException:
                await pool.close()
                raise
            return pool
        except DB_ERRORS as e:
            if time.monotonic() >= deadline:
                raise
            log.warning("database not ready (%s), retrying", e)
            await asyncio.sleep(0.5)


async def insert(pool: Any, row_id: str, version: str, color: str | None, delay_s: float) -> str:
    """Insert one row and COMMIT; returns the version stored for row_id (an earlier one when
    a client retried an id that was already committed)."""
    async with pool.acquire() as conn, conn.transaction():
        stored = await conn.fetchval(INSERT, row_id, version, color)
        if stored is None:
            stored = await conn.fetchval("SELECT version FROM writes WHERE id = $1", row_id)
        if delay_s:
            await asyncio.sleep(delay_s)
    return str(stored)
