"""Rendering of the shipped templates (nginx/ in the source, /usr/share/aipbx/ installed).
Pure: a template name and a context in, text out."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jinja2

_INSTALLED = Path("/usr/share/aipbx")
_SOURCE = Path(__file__).resolve().parent.parent


def template_root() -> Path:
    """AIPBX_TEMPLATES overrides; else the installed tree; else the source tree."""
    env = os.environ.get("AIPBX_TEMPLATES")
    if env:
        return Path(env)
    if (_INSTALLED / "nginx").is_dir():
        return _INSTALLED
    return _SOURCE


def render(name: str, **context: Any) -> str:
    root = template_root()
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(root)),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    return env.get_template(name).render(template_path=str(root / name), **context)
