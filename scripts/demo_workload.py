#!/usr/bin/env python
"""The demo, as a user drives it: start `python -m sgl_scd.launch`, send a shared-prefix workload
with the `openai` client, report per adapter, write the cache report, stop the server.

Workload: held-out stories that carry several questions (ToMi test; Hi-ToM eval with
--hitom-stories). The base answers each story's first question and so publishes the story's
pages; every adapter answers the story's other questions twice, reusing those pages and with
`scd_reuse: false` (its own full prefill), both streamed to time the first token.

Per adapter: cached-token fraction (usage.prompt_tokens_details.cached_tokens / prompt tokens),
same answer as its own prefill, F1 of both against the gold answer, median TTFT both ways.

  python scripts/demo_workload.py --stories 12 -- --encoder adapters/quick-encoder
  python scripts/demo_workload.py --url http://127.0.0.1:30000   # a server already running
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import openai
from tqdm import tqdm

from sgl_scd.demo import data
from sgl_scd.evaluation import quality
from sgl_scd.runinfo import provenance


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(launch_args: list[str], timeout_s: float) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "sgl_scd.launch", "--port", str(port), *launch_args]
    print(f"[demo] starting: {' '.join(cmd)}", file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    with tqdm(desc="[demo] waiting for the server (loading models)", bar_format="{desc}: {elapsed}",
              file=sys.stderr) as bar:
        while True:
            if proc.poll() is not None:
                sys.exit(f"[demo] the server exited with status {proc.returncode}")
            try:
                urllib.request.urlopen(url + "/health", timeout=2).read()
                return proc, url
            except OSError:
                if time.monotonic() - t0 > timeout_s:
                    proc.terminate()
                    sys.exit(f"[demo] the server did not answer /health in {timeout_s:.0f} s")
                time.sleep(0.5)
                bar.update()


def metric(url: str, name: str) -> float:
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith((name + "{", name + " ")))


def ask(client, model: str, item: data.QAItem, max_tokens: int, reuse: bool = True) -> dict:
    """One streamed chat request: answer text, TTFT, usage."""
    t0 = time.perf_counter()
    ttft, parts, usage = None, [], None
    stream = client.chat.completions.create(
        model=model, messages=data.chat_messages(item), max_tokens=max_tokens, stream=True,
        stream_options={"include_usage": True}, extra_body={} if reuse else {"scd_reuse": False})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            ttft = ttft or time.perf_counter() - t0
            parts.append(chunk.choices[0].delta.content)
        if chunk.usage:
            usage = chunk.usage
    text = "".join(parts)
    return {"text": text, "ttft_s": ttft or time.perf_counter() - t0, "prompt_tokens": usage.prompt_tokens,
            "cached_tokens": (usage.prompt_tokens_details.cached_tokens or 0) if usage.prompt_tokens_details else 0}


def run(url: str, sets: dict[str, list[list[data.QAItem]]], max_tokens: int) -> dict:
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    names = [m.id for m in client.models.list().data]
    base, adapters = names[0], [n for n in names if ":" in n]
    jobs0 = metric(url, "sgl_scd:publish_jobs_total")
    n_base = sum(len(s) for s in sets.values())
    rows = []
    with tqdm(total=n_base, desc=f"[demo] {base} answers one question per story (publishes)", file=sys.stderr) as bar:
        for set_name, group in sets.items():
            for qs in group:
                r = ask(client, base, qs[0], max_tokens)
                rows.append({"set": set_name, "model": base, "uid": qs[0].uid, **r})
                bar.update()
    deadline = time.monotonic() + 120  # publication runs in the background: wait for it, as a test would
    while metric(url, "sgl_scd:publish_jobs_total") - jobs0 < n_base and time.monotonic() < deadline:
        time.sleep(0.2)
    n_adapter = sum(len(qs) - 1 for g in sets.values() for qs in g) * len(adapters)
    with tqdm(total=n_adapter, desc="[demo] adapters answer the other questions (reuse, then own prefill)",
              file=sys.stderr) as bar:
        for adapter in adapters:
            for set_name, group in sets.items():
                for qs in group:
                    for it in qs[1:]:
                        hit, own = ask(client, adapter, it, max_tokens), ask(client, adapter, it, max_tokens, False)
                        rows.append({"set": set_name, "model": adapter, "uid": it.uid, "gold": it.answer,
                                     **hit, "own_text": own["text"], "own_ttft_s": own["ttft_s"],
                                     "same_answer": quality.normalize_answer(hit["text"])
                                     == quality.normalize_answer(own["text"]),
                                     "f1": quality.token_f1(hit["text"], it.answer),
                                     "f1_own": quality.token_f1(own["text"], it.answer)})
                        bar.update()
    return {"base": base, "adapters": adapters, "rows": rows}


def summarize(result: dict) -> list[dict]:
    out = []
    for adapter in result["adapters"]:
        for set_name in sorted({r["set"] for r in result["rows"]}):
            rs = [r for r in result["rows"] if r["model"] == adapter and r["set"] == set_name]
            if not rs:
                continue
            hit, own = statistics.median(r["ttft_s"] for r in rs), statistics.median(r["own_ttft_s"] for r in rs)
            out.append({"adapter": adapter, "set": set_name, "n": len(rs),
                        "cached_fraction": sum(r["cached_tokens"] for r in rs) / sum(r["prompt_tokens"] for r in rs),
                        "same_answer": sum(r["same_answer"] for r in rs) / len(rs),
                        "f1": sum(r["f1"] for r in rs) / len(rs), "f1_own": sum(r["f1_own"] for r in rs) / len(rs),
                        "ttft_reuse_ms": hit * 1e3, "ttft_own_ms": own * 1e3, "ttft_ratio": hit / own})
    return out


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    launch_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                usage="%(prog)s [options] [-- launch flags]")
    p.add_argument("--url", help="use this running server instead of starting one")
    p.add_argument("--stories", type=int, default=12, help="ToMi test stories (default %(default)s)")
    p.add_argument("--hitom-stories", type=int, default=2, help="Hi-ToM eval stories, 5 questions each "
                   "(default %(default)s)")
    p.add_argument("--max-tokens", type=int, default=8, help="answer tokens per request (default %(default)s)")
    p.add_argument("--start-timeout", type=float, default=600, help="seconds to wait for the server")
    p.add_argument("--report", type=Path, default=Path("out/demo_report.json"), help="default %(default)s")
    p.add_argument("--plots-dir", type=Path, default=Path("out/cache_report"), help="cache report plots")
    args = p.parse_args(argv)
    for flag in ("stories", "hitom_stories", "max_tokens"):
        if getattr(args, flag) < 0 or (flag != "hitom_stories" and getattr(args, flag) < 1):
            p.error(f"--{flag.replace('_', '-')}: got {getattr(args, flag)}")
    sets = {"tomi": data.stories(data.load_tomi("test"), args.stories)}
    if args.hitom_stories:
        sets["hitom"] = data.stories(data.load_hitom("eval")[::-1], args.hitom_stories)  # the shortest first
    proc, url = (None, args.url) if args.url else start_server(launch_args, args.start_timeout)
    try:
        result = run(url, sets, args.max_tokens)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
    table = summarize(result)
    print(f"\nSCD demo: {result['base']} publishes each story's pages once; every adapter answers other "
          f"questions on the same stories through {url}")
    print(f"  {'adapter':<18} {'set':<6} {'n':>3} {'cached':>7} {'same':>6} {'F1':>6} {'F1 own':>7} "
          f"{'TTFT reuse':>11} {'TTFT own':>9} {'ratio':>6}")
    for r in table:
        print(f"  {r['adapter']:<18} {r['set']:<6} {r['n']:>3} {r['cached_fraction']:7.2f} {r['same_answer']:6.2f} "
              f"{r['f1']:6.2f} {r['f1_own']:7.2f} {r['ttft_reuse_ms']:9.0f}ms {r['ttft_own_ms']:7.0f}ms "
              f"{r['ttft_ratio']:6.2f}")
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps({"summary": table, **result, **provenance(
        {"stories": args.stories, "hitom_stories": args.hitom_stories, "max_tokens": args.max_tokens,
         "launch_args": launch_args})}, indent=2))
    print(f"  report: {args.report}")
    store_url = launch_args[launch_args.index("--store-url") + 1] if "--store-url" in launch_args else None
    cmd = [sys.executable, str(Path(__file__).with_name("cache_report.py")), "--plots-dir", str(args.plots_dir)]
    subprocess.run(cmd + (["--store-url", store_url] if store_url else []), check=False, env=os.environ)


if __name__ == "__main__":
    main()
