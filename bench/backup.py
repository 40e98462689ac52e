"""`make bench-backup`: `aipbxctl backup` beside a plain `pg_dump -Fc` of the same database
(>= 1 GB), in a booted Debian 12 with the appliance installed and set up. Writes
build/bench/backup.json: db_bytes, backup_s, pg_dump_s, ratio (and the runs).

backup_s is the wall time of `aipbxctl backup` without its verification (pg_restore --list,
the full read and the sha256, reported by the command as verify_s): the dump, the rename,
the sidecar and retention, plus aipbxctl's own start. Both write to /var/backups/aipbx
as postgres through the local socket; they alternate, after a warm-up dump, and the
medians are compared."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from tests.system.appliance import install
from tests.system.harness import harness_problem
from tests.system.machine import Machine
from tests.system.rootfs import ensure_rootfs

TOP = Path(__file__).resolve().parents[1]
DB = "aipbx_production"
BACKUPS = "/var/backups/aipbx"
PLAIN = f"{BACKUPS}/.bench-plain.dump"
PSQL = ["runuser", "-u", "postgres", "--", "psql", "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1"]
# ~900 bytes a row on disk: two random md5s (little to compress) and a repetitive pad.
FILL = (
    "CREATE TABLE bench_fill AS SELECT g AS id, now() AS ts, md5(random()::text) AS a, "
    "md5(random()::text) AS b, repeat(md5(g::text), 24) AS pad "
    "FROM generate_series({start}, {end}) g"
)
ADD = (
    "INSERT INTO bench_fill SELECT g, now(), md5(random()::text), md5(random()::text), "
    "repeat(md5(g::text), 24) FROM generate_series({start}, {end}) g"
)


def psql(m: Machine, sql: str, timeout: float = 1800) -> str:
    r = m.run(
        [*PSQL, "-d", DB, "-c", sql],
        timeout=timeout,
    )
    return r.stdout.strip()


def db_bytes(m: Machine) -> int:
    return int(psql(m, f"SELECT pg_database_size('{DB}')"))


def fill(m: Machine, target: int) -> tuple[int, int]:
    """Rows until the database is at least `target` bytes; returns (bytes, rows)."""
    step = 600_000
    psql(m, FILL.format(start=1, end=step))
    rows = step
    while db_bytes(m) < target:
        psql(m, ADD.format(start=rows + 1, end=rows + step))
        rows += step
    psql(m, "VACUUM ANALYZE bench_fill")
    return db_bytes(m), rows


def timed(m: Machine, script: str) -> tuple[float, str]:
    """Wall seconds of `script` measured inside the machine, and its stdout."""
    r = m.sh(
        f't0=$(date +%s.%N)\n{script} > /root/bench.out\nt1=$(date +%s.%N)\necho "$t0 $t1"',
        timeout=3600,
    )
    t0, t1 = (float(x) for x in r.stdout.split()[-2:])
    return t1 - t0, m.path("/root/bench.out").read_text()


def plain_dump(m: Machine) -> float:
    seconds, _ = timed(
        m, f"rm -f {PLAIN}; runuser -u postgres -- pg_dump -Fc -f {PLAIN} {DB}; ls -l {PLAIN}"
    )
    m.run(["rm", "-f", PLAIN])
    return seconds


def our_backup(m: Machine) -> dict[str, Any]:
    seconds, out = timed(m, "aipbxctl backup --json")
    done = json.loads(out)
    m.run(["rm", "-f", done["file"], done["file"] + ".json"])
    return {
        "wall_s": round(seconds, 3),
        "verify_s": done["verify_s"],
        "dump_s": done["dump_s"],
        "backup_s": round(seconds - done["verify_s"], 3),
        "bytes": done["bytes"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--gb", type=float, default=1.05, help="database size to reach, in GiB")
    p.add_argument("--runs", type=int, default=3, help="timed runs of each, alternating")
    p.add_argument("--out", type=Path, default=TOP / "build" / "bench")
    args = p.parse_args(argv)
    problem = harness_problem()
    if problem:
        print(f"bench: cannot boot a machine: {problem}", file=sys.stderr)
        return 1
    deb = Path(os.environ["AIPBX_DEB"])
    with Machine(ensure_rootfs(TOP / "build" / "cache")) as m:
        install(m, deb)
        m.run(["aipbxctl", "setup"], timeout=300)
        t0 = time.monotonic()
        size, rows = fill(m, int(args.gb * (1 << 30)))
        print(f"bench: {size / (1 << 30):.2f} GiB, {rows} rows in {time.monotonic() - t0:.0f}s")
        plain_dump(m)  # warm-up: the same cache state for every timed run
        plain: list[float] = []
        ours: list[dict[str, Any]] = []
        for i in range(args.runs):
            plain.append(round(plain_dump(m), 3))
            ours.append(our_backup(m))
            print(f"bench: run {i + 1}: pg_dump {plain[-1]:.2f}s, backup {ours[-1]}", flush=True)
    backup_s = statistics.median(r["backup_s"] for r in ours)
    pg_dump_s = statistics.median(plain)
    doc = {
        "db_bytes": size,
        "backup_s": round(backup_s, 3),
        "pg_dump_s": round(pg_dump_s, 3),
        "ratio": round(backup_s / pg_dump_s, 3),
        "rows": rows,
        "dump_bytes": ours[-1]["bytes"],
        "verify_s": statistics.median(r["verify_s"] for r in ours),
        "runs": {"pg_dump_s": plain, "backup": ours},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "backup.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    print(json.dumps({k: doc[k] for k in ("db_bytes", "backup_s", "pg_dump_s", "ratio")}))
    print(f"bench: wrote {args.out / 'backup.json'}")
    return 0 if doc["ratio"] <= 1.1 else 2


if __name__ == "__main__":
    sys.exit(main())
