#!/usr/bin/env python
"""The SCD linker inside real SGLang servers (a GPU machine with sglang installed): the demo's
shared-prefix workload, with the linker and without it, per adapter.

  python scripts/bench_sglang.py --encoder adapters/quick-encoder --json out/bench_sglang.jsonl -- --mem-fraction-static 0.5

Phase "linker": the servers `python -m sgl_scd.launch --dry-run` prints (the base with every LoRA
adapter, one server per full fine-tune, one store); the base answers each story's first question
(its pages are published), every adapter the story's other questions. Phase "own": the same servers
without the linker, the radix cache flushed before each request, so each answer is the adapter's
own full prefill. Reported per adapter: median TTFT both ways and their ratio, the cached-token
fraction SGLang reports (--enable-cache-report), same answer as the own prefill, F1 both ways.
Not run on CPU machines: SGLang serves no model there.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import openai
from demo_workload import ask  # scripts/ is on sys.path when this file runs

from sgl_scd.demo import data
from sgl_scd.evaluation import quality
from sgl_scd.runinfo import write_jsonl

LINKER_FLAGS = {"--enable-unified-cache-external-linker": 0, "--unified-cache-external-linker-backend": 1,
                "--unified-cache-external-linker-config": 1}


def without_linker(cmd: list[str]) -> list[str]:
    out, skip = [], 0
    for arg in cmd:
        if skip:
            skip -= 1
        elif arg in LINKER_FLAGS:
            skip = LINKER_FLAGS[arg]
        else:
            out.append(arg)
    return out


def flag(cmd: list[str], name: str) -> list[str]:
    i = cmd.index(name) + 1
    vals = []
    while i < len(cmd) and not cmd[i].startswith("--"):
        vals.append(cmd[i])
        i += 1
    return vals


def start(cmds: list[list[str]], timeout_s: float) -> list[subprocess.Popen]:
    procs = [subprocess.Popen(c) for c in cmds]
    for c in cmds:
        url = f"http://127.0.0.1:{flag(c, '--port')[0]}/health"
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                    stop(procs)
                    sys.exit(f"a server did not come up: {shlex.join(c)}")
                time.sleep(2)
    return procs


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait(60)


def targets(cmds: list[list[str]]) -> tuple[tuple[str, str], dict[str, tuple[str, str]]]:
    """(base url, base model name) and adapter -> (url, model name) as SGLang users address them."""
    urls = [f"http://127.0.0.1:{flag(c, '--port')[0]}/v1" for c in cmds]
    base = flag(cmds[0], "--model-path")[0]
    adapters = {p.split("=", 1)[0]: (urls[0], f"{base}:{p.split('=', 1)[0]}")
                for p in (flag(cmds[0], "--lora-paths") if "--lora-paths" in cmds[0] else [])}
    for c, url in zip(cmds[1:], urls[1:]):  # full fine-tunes: their own server, plain requests
        name = json.loads(flag(c, "--unified-cache-external-linker-config")[0])["linker_extra_config"]["consumer"]
        adapters[name] = (url, flag(c, "--model-path")[0])
    return (urls[0], base), adapters


def run_phase(cmds, sets, max_tokens: int, flush: bool, timeout_s: float) -> list[dict]:
    (base_url, base), adapters = targets(cmds)
    procs = start(cmds, timeout_s)
    rows = []
    try:
        clients = {u: openai.OpenAI(base_url=u, api_key="none", max_retries=0, timeout=600)
                   for u in {base_url, *(u for u, _ in adapters.values())}}

        def flush_all():
            for u in clients:
                urllib.request.urlopen(urllib.request.Request(u[:-3] + "/flush_cache", method="POST"), timeout=60)

        for group in sets.values():
            for qs in group:
                ask(clients[base_url], base, qs[0], max_tokens)
        time.sleep(5)  # publications run behind the offloads
        for name, (url, model) in adapters.items():
            for set_name, group in sets.items():
                for qs in group:
                    for it in qs[1:]:
                        if flush:
                            flush_all()
                        r = ask(clients[url], model, it, max_tokens)
                        rows.append({"adapter": name, "set": set_name, "uid": it.uid, "gold": it.answer, **r})
    finally:
        stop(procs)
    return rows


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    passthrough = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", required=True, help="the published encoder dir")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--stories", type=int, default=12)
    p.add_argument("--hitom-stories", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--start-timeout", type=float, default=900)
    p.add_argument("--json", type=Path, default=Path("out/bench_sglang.jsonl"))
    args = p.parse_args(argv)
    out = subprocess.run([sys.executable, "-m", "sgl_scd.launch", "--dry-run", "--encoder", args.encoder,
                          "--port", str(args.port), "--", "--enable-cache-report", *passthrough],
                         check=True, capture_output=True, text=True).stdout
    cmds = [shlex.split(line) for line in out.strip().splitlines()]
    sets = {"tomi": data.stories(data.load_tomi("test"), args.stories)}
    if args.hitom_stories:
        sets["hitom"] = data.stories(data.load_hitom("eval")[::-1], args.hitom_stories)
    hit = run_phase(cmds, sets, args.max_tokens, flush=False, timeout_s=args.start_timeout)
    own = run_phase([without_linker(c) for c in cmds], sets, args.max_tokens, flush=True,
                    timeout_s=args.start_timeout)
    own_by = {(r["adapter"], r["uid"]): r for r in own}
    table = []
    for key in sorted({(r["adapter"], r["set"]) for r in hit}):
        rs = [r for r in hit if (r["adapter"], r["set"]) == key]
        os_ = [own_by[(r["adapter"], r["uid"])] for r in rs]
        t_hit, t_own = (statistics.median(x["ttft_s"] for x in g) for g in (rs, os_))
        table.append({"adapter": key[0], "set": key[1], "n": len(rs),
                      "cached_fraction": sum(r["cached_tokens"] or 0 for r in rs) / sum(r["prompt_tokens"] for r in rs),
                      "same_answer": sum(quality.normalize_answer(a["text"]) == quality.normalize_answer(b["text"])
                                         for a, b in zip(rs, os_)) / len(rs),
                      "f1": sum(quality.token_f1(r["text"], r["gold"]) for r in rs) / len(rs),
                      "f1_own": sum(quality.token_f1(r["text"], r["gold"]) for r in os_) / len(rs),
                      "ttft_linker_ms": t_hit * 1e3, "ttft_own_ms": t_own * 1e3, "ttft_ratio": t_hit / t_own})
        print(table[-1])
    write_jsonl(args.json, table, {**vars(args), "json": str(args.json), "commands": [shlex.join(c) for c in cmds]})


if __name__ == "__main__":
    main()
