"""gunicorn settings for the sample backend (`gunicorn --config aipbx_sample/gunicorn_conf.py`
from the release directory).

One worker: like the real backend, one process owns the WebSocket port and the UDP port.
It binds 0.0.0.0:$PORT (5005 when unset), as the real backend listens on $PORT."""

from __future__ import annotations

import os
import sys
from typing import Any

bind = [f"0.0.0.0:{os.environ.get('PORT', '5005')}"]
worker_class = "aiohttp.GunicornUVLoopWebWorker"
workers = 1
# SIGTERM: stop accepting, give in-flight requests this long, then close
graceful_timeout = 20


def on_starting(server: Any) -> None:
    if os.environ.get("SAMPLE_FAIL", "").strip() == "start":
        print("aipbx-sample: SAMPLE_FAIL=start: failing at start as asked", file=sys.stderr)
        raise SystemExit(1)
