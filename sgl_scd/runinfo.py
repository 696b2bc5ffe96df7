"""Provenance for benchmark and evaluation output: git SHA, machine, time."""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import time
from functools import lru_cache
from pathlib import Path

from sgl_scd.settings import REPO_ROOT


@lru_cache(maxsize=1)
def git_sha() -> str:
    """HEAD's short SHA (+ "-dirty"), or $SCD_GIT_SHA where the tree travelled without .git."""
    if os.environ.get("SCD_GIT_SHA"):
        return os.environ["SCD_GIT_SHA"]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT,
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> dict:
    import torch

    return {"host": socket.gethostname(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.cuda.is_available()}


def provenance(config: dict) -> dict:
    return {"config": config, "git_sha": git_sha(), "machine": machine(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def write_jsonl(path: str | Path, rows: list[dict], config: dict) -> None:
    """One JSON line per row, each with the run's provenance (config, git SHA, machine, time)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prov = provenance(config)
    with path.open("w") as f:
        f.writelines(json.dumps({**r, **prov}) + "\n" for r in rows)
