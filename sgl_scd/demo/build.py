"""`python -m sgl_scd.demo build`: the demo data, base and variants, built offline into the user cache."""

from __future__ import annotations

import argparse
import json
import time

from sgl_scd.demo import finetune
from sgl_scd.demo.base import DEMO_VARIANTS, QUICK_VARIANTS, ensure_base, log, variant_dir
from sgl_scd.demo.data import ensure_data
from sgl_scd.settings import models_dir


def build_all(variants=DEMO_VARIANTS) -> None:
    ensure_data()
    ensure_base()
    for name in variants:
        path = variant_dir(name)
        if (path / "DONE").exists():
            log(f"{name}: already built in {path}")
            continue
        finetune.build_variant(name, path)
        (path / "DONE").write_text(json.dumps({"built": time.time()}))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m sgl_scd.demo",
        description="Build the demo models offline into the user cache (ToMi/Hi-ToM data, the SmolLM2 "
        "base, and the demo consumers: demo-ft full fine-tune, demo-lora and demo-hitom LoRA adapters; "
        "--quick: the quick-* consumers `make demo` serves).",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build whatever is missing (seeded, cached)")
    b.add_argument("--only", choices=DEMO_VARIANTS + QUICK_VARIANTS, action="append",
                   help="build only this variant (repeatable)")
    b.add_argument("--quick", action="store_true",
                   help=f"build `make demo`'s consumers ({', '.join(QUICK_VARIANTS)}: the same forms in fewer steps)")
    sub.add_parser("where", help="print where the models live")
    args = p.parse_args(argv)
    if args.cmd == "build":
        build_all(tuple(args.only) if args.only else QUICK_VARIANTS if args.quick else DEMO_VARIANTS)
    else:
        print(models_dir())
