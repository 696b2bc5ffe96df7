"""Every environment knob and cache location of sgl_scd, in one place (flags > environment > defaults).

  SCD_CACHE_DIR   root of what sgl_scd builds: models, data, the embedded store
                  (default $XDG_CACHE_HOME/sgl_scd or ~/.cache/sgl_scd)
  SCD_STORE_URL   the shared prefix store (default embedded://, SQLite under the cache)
  SCD_ENCODER     the published encoder dir served by default (default adapters/base-encoder)
  SCD_HOST        the server's address (default 127.0.0.1)
  SCD_PORT        the server's port (default 30000)
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
ADAPTERS_DIR = REPO_ROOT / "adapters"
STORE_URL_ENV = "SCD_STORE_URL"
DEFAULT_ENCODER = Path(os.environ.get("SCD_ENCODER") or ADAPTERS_DIR / "base-encoder")


def env(name: str, default: str) -> str:
    """An SCD_* setting from the environment, else the default (an empty value counts as unset)."""
    return os.environ.get(name) or default


def cache_dir() -> Path:
    root = os.environ.get("SCD_CACHE_DIR")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "sgl_scd"


def models_dir() -> Path:
    return cache_dir() / "models"


def data_dir() -> Path:
    return cache_dir() / "data"


def store_dir() -> Path:
    """Where embedded:// keeps its SQLite file."""
    return cache_dir() / "store"
