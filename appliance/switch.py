"""The blue/green switch itself: the nginx upstream include (atomic replace + graceful
reload) and the nft table (one transaction). The candidate is tested before the timed
window, so the window holds only the rename, the reload signal and the nft commit."""

from __future__ import annotations

import time
from dataclasses import dataclass

from appliance import nft, nginx
from appliance.colors import Color
from appliance.config import Config
from appliance.fsutil import atomic_write
from appliance.paths import Paths
from appliance.services import Services


@dataclass(frozen=True)
class Prepared:
    color: Color | None
    upstream: str
    ruleset: str


def prepare(paths: Paths, cfg: Config, color: Color | None) -> Prepared:
    """Render and nginx -t the switch to `color` without touching what runs."""
    upstream = nginx.render_upstream(cfg, color)
    site, main = nginx.current_site(paths)
    if not nginx.test_candidates(paths, site=site, main=main, upstream=upstream):
        nginx.nginx_test()  # an admin-edited nginx.conf: at least the running config is sane
    return Prepared(color, upstream, nft.render(cfg, color))


def execute(paths: Paths, services: Services, prepared: Prepared) -> float:
    """The switch; returns its duration in milliseconds."""
    t0 = time.monotonic()
    atomic_write(paths.nginx_upstream, prepared.upstream)
    nginx.reload_nginx(services)
    nft.apply(prepared.ruleset)
    return (time.monotonic() - t0) * 1000
