"""The one place that knows where sleeptui keeps files."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
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


def write_cache_file(path: Path, write: Callable[[str], object]) -> None:
    """Create ``path`` at once: ``write`` fills a temporary name of this process's own beside
    it, which is then renamed. A killed start leaves no half file, and two processes caching
    the same thing together both finish (the last rename leaves the same content)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
