"""Where sgl_scd keeps what it builds: models, data and the embedded store live in a user cache.

SCD_CACHE_DIR overrides the root (default: $XDG_CACHE_HOME/sgl_scd or ~/.cache/sgl_scd).
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
ADAPTERS_DIR = REPO_ROOT / "adapters"


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
