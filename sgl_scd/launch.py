"""Serve the base and every adapter of one published SCD code set with the OpenAI API.

  python -m sgl_scd.launch                      # http://127.0.0.1:30000/v1, embedded store
  python -m sgl_scd.launch --consumer demo-ft --consumer demo-lora   # only these adapters
  python -m sgl_scd.launch --store-url redis://127.0.0.1:6379/0 --port 30001

  curl http://127.0.0.1:30000/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"model": "base:demo-ft", "messages": [{"role": "user", "content": "Hi"}]}'

A request for the base publishes its prompt's full pages as codes (in the background); a request
for "<base>:<adapter>" (or lora_path) rebuilds its own KV from the codes the store holds and
prefills only the rest; usage.prompt_tokens_details.cached_tokens says how many tokens it reused.

Settings: flags > environment (SCD_ENCODER, SCD_STORE_URL, SCD_HOST, SCD_PORT, SCD_CACHE_DIR)
> defaults. The default store is embedded (SQLite under the user cache; no server needed).
This reference server runs the models with transformers on CPU; on a CUDA machine with sglang
installed, launch starts SGLang's own servers with the SCD cache linker instead: the base with
every LoRA adapter, and one server per full fine-tune on the next ports (--engine; --dry-run
prints the commands).
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path

import torch

from sgl_scd.codec.manifest import load_adapter, load_encoder
from sgl_scd.hf import models
from sgl_scd.reuse import check_min_margin, store_identity
from sgl_scd.serving.engine import ReuseEngine
from sgl_scd.serving.metrics import ServingMetrics
from sgl_scd.settings import ADAPTERS_DIR, DEFAULT_ENCODER, env
from sgl_scd.store import open_store, resolve_url


def build_engine(args) -> ReuseEngine:
    """The producer, the encoder's store and every adapter asked for (default: all calibrated against it)."""
    encoder = load_encoder(Path(args.encoder))
    paths = [ADAPTERS_DIR / c if not Path(c).is_dir() else Path(c) for c in args.consumer] or encoder.adapters()
    if not paths:
        raise FileNotFoundError(f"no adapter is calibrated against {encoder.path}; run `python -m sgl_scd.calibrate "
                                f"--consumer SPEC --encoder {encoder.path}`")
    producer = models.load(args.producer)
    consumers = {}
    for path in paths:
        adapter = load_adapter(path, encoder)
        consumers[adapter.name] = (models.load(adapter.manifest.consumer.spec), adapter)
    store = open_store(args.store_url, store_identity(encoder, args.cache_salt), ttl_s=args.ttl)
    metrics = ServingMetrics.default()
    return ReuseEngine(producer, encoder, store, consumers, min_margin=args.min_margin, background_publish=True,
                       publish_queue=args.publish_queue, on_published=metrics.published)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m sgl_scd.launch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("models")
    g.add_argument("--producer", default="base", help="producer model spec (default base)")
    g.add_argument("--served-model-name", default=None,
                   help="the base's name in the API; adapters are '<name>:<adapter>' (default: the producer spec)")
    g.add_argument("--encoder", default=str(DEFAULT_ENCODER),
                   help="the published encoder dir (default %(default)s; env SCD_ENCODER)")
    g.add_argument("--consumer", action="append", default=[], metavar="ADAPTER",
                   help="serve this adapter (a name under adapters/ or a dir); repeatable. Default: every adapter "
                        "calibrated against the encoder")
    g.add_argument("--min-margin", type=float, default=None,
                   help="prefill instead of reusing when the rebuilt cache's first answer token is a near-tie: "
                        "top-1 minus top-2 probability below this (0 = always reuse; default: each adapter's "
                        "manifest min_margin, chosen on dev). Where the gate drops so many rebuilds that trying "
                        "costs more than a prefill, requests prefill at once (miss cause gate_skip), "
                        "one in 8 still trying")
    g.add_argument("--engine", choices=("auto", "sglang", "hf"), default="auto",
                   help="sglang: SGLang's own OpenAI server with the SCD cache linker (needs a GPU and a normal "
                        "sglang install); hf: this reference server on transformers; auto (default): sglang "
                        "where CUDA is available, else hf. Flags after `--` go to sglang.launch_server")
    g.add_argument("--dry-run", action="store_true",
                   help="print the exact sglang.launch_server command for the base and its LoRA adapters, and exit")
    g = p.add_argument_group("store")
    g.add_argument("--store-url", default=None,
                   help="embedded:// (default), embedded:///path, redis://host:port/db, rediss://, "
                        "redis+cluster://host:port (env SCD_STORE_URL)")
    g.add_argument("--cache-salt", default="", help="tenant salt: separates store namespaces")
    g.add_argument("--ttl", type=float, default=86400.0, help="seconds a published page lives (default 1 day)")
    g.add_argument("--publish-queue", type=int, default=64,
                   help="prompts waiting to be encoded and published; beyond it a publication is dropped and "
                        "counted (default %(default)s)")
    g = p.add_argument_group("server")
    g.add_argument("--host", default=env("SCD_HOST", "127.0.0.1"), help="default %(default)s (env SCD_HOST)")
    g.add_argument("--port", type=int, default=int(env("SCD_PORT", "30000")),
                   help="default %(default)s (env SCD_PORT; 0 picks a free port)")
    g.add_argument("--max-running-requests", type=int, default=8,
                   help="requests decoding at once, one token each in turn (default %(default)s)")
    g.add_argument("--max-queued-requests", type=int, default=64,
                   help="requests waiting beyond those; more get a 503 (default %(default)s)")
    g.add_argument("--max-prompt-tokens", type=int, default=4096,
                   help="longer prompts get a 413 (default %(default)s)")
    g.add_argument("--threads", type=int, help="torch CPU threads")
    g.add_argument("--log-level", default="warning", help="default %(default)s")
    argv = sys.argv[1:] if argv is None else list(argv)
    passthrough = argv[argv.index("--") + 1:] if "--" in argv else []
    args = p.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    if args.dry_run or args.engine == "sglang" or (args.engine == "auto" and torch.cuda.is_available()):
        try:
            cmds = sglang_commands(args, passthrough)
        except (FileNotFoundError, ValueError) as e:
            sys.exit(f"error: {e}")
        for cmd in cmds:
            print(shlex.join(cmd))
        if args.dry_run:
            return
        for cmd in cmds[1:]:  # the fine-tunes' servers, then the base's replaces this process
            subprocess.Popen(cmd)
        os.execvp(cmds[0][0], cmds[0])
    try:
        if args.min_margin is not None:
            check_min_margin(args.min_margin)
    except ValueError as e:
        p.error(f"--min-margin: {e}")
    for flag in ("publish_queue", "max_running_requests", "max_queued_requests", "max_prompt_tokens"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')}: must be >= 1, got {getattr(args, flag)}")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.store_url = resolve_url(args.store_url)
    try:
        engine = build_engine(args)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    serve(engine, args)


def sglang_commands(args, passthrough: list[str]) -> list[list[str]]:
    """SGLang's launch commands: the producer as the served model with every calibrated LoRA adapter
    (--lora-paths), then one server per calibrated full fine-tune, on the next ports, the same store."""
    from sgl_scd.sglang_ext.command import calibrated_adapters, sglang_command

    encoder = load_encoder(Path(args.encoder).resolve())  # the scheduler process may run elsewhere
    scd = calibrated_adapters(encoder.path)
    if args.consumer:
        scd = {name: path for name, path in scd.items() if name in args.consumer or path in args.consumer}
    loras, finetunes = {}, {}
    for name, path in scd.items():
        consumer = models.resolve(load_adapter(Path(path), encoder).manifest.consumer.spec)
        (loras if models.is_adapter(consumer) else finetunes)[name] = str(consumer)
    common = {"adapters": scd, "store_url": args.store_url, "host": args.host, "python": sys.executable,
              "extra_args": passthrough}
    cmds = [sglang_command(str(models.resolve(args.producer)), encoder.path, loras, port=args.port, **common)]
    for i, (name, model) in enumerate(finetunes.items(), 1):
        cmds.append(sglang_command(model, encoder.path, {}, consumer=name, port=args.port + i, **common))
    return cmds


def serve(engine: ReuseEngine, args) -> None:
    import socket

    import uvicorn

    from sgl_scd.serving.openai_api import create_app
    from sgl_scd.serving.scheduler import Scheduler

    scheduler = Scheduler(args.max_running_requests, args.max_queued_requests)
    name = args.served_model_name or args.producer
    app = create_app(engine, scheduler, served_model_name=name, max_prompt_tokens=args.max_prompt_tokens)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    port = sock.getsockname()[1]
    models = ", ".join([name, *(f"{name}:{a}" for a in engine.consumers)])
    print(f"sgl_scd serving {models} on http://{args.host}:{port}/v1  store={engine.store.url}",
          file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level.lower()))
    try:
        server.run(sockets=[sock])
    finally:
        scheduler.close()
        engine.close()
        engine.store.close()


if __name__ == "__main__":
    main()
