"""The one place that knows where sleeptui keeps files."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

APP = "sleeptui"


def state_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """The state folder: --state-dir, else $SLEEPTUI_HOME, else the platform's user data dir."""
    if override:
        return Path(override).expanduser()
    env = os.environ.get("SLEEPTUI_HOME")
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_data_dir(APP, appauthor=False))


def cache_dir() -> Path:
    """Per-model caches (converted weights, covariance and sensitivity statistics); safe to
    delete.

    $SLEEPTUI_CACHE overrides the platform's user cache dir.
    """
    env = os.environ.get("SLEEPTUI_CACHE")
    path = (
        Path(env).expanduser() if env else Path(platformdirs.user_cache_dir(APP, appauthor=False))
    )
    return private_dir(path)


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) readable by the owner only, and return it."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path
