"""`aipbxctl logs [SERVICE] [-f] [-n N]`: journalctl for the appliance's units."""

from __future__ import annotations

from appliance.errors import UsageError

SERVICES: dict[str, list[str]] = {
    "backend": ["-u", "aipbx-backend@*.service", "-u", "aipbx-netns@*.service"],
    "watchdog": ["-u", "aipbx-watchdog.service"],
    "nginx": ["-u", "nginx.service"],
    "postgresql": ["-u", "postgresql*.service"],
    "pgbouncer": ["-u", "aipbx-pgbouncer.service"],
    "aipbxctl": ["-t", "aipbxctl"],
}


def journalctl_argv(service: str | None, follow: bool, lines: int | None) -> list[str]:
    if service is None or service == "all":
        selectors = [arg for sel in SERVICES.values() for arg in sel]
    elif service in SERVICES:
        selectors = SERVICES[service]
    else:
        raise UsageError(
            f"unknown service {service!r}",
            hint=f"one of: all, {', '.join(SERVICES)}",
        )
    argv = ["journalctl", "--no-pager", "-o", "short-iso", *selectors]
    if lines is not None:
        argv += ["-n", str(lines)]
    if follow:
        argv.append("-f")
    return argv
