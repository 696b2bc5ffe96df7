"""A small HTTP front end over ReuseEngine (reference runtime; SGLang serves on GPU).

  POST /generate  {"model": "<producer spec or consumer name>", "prompt": "..." | "messages": [...],
                   "max_new_tokens": 16}
                  -> {"text", "prompt_tokens", "reused_tokens", "miss_cause", "timings"}
  GET  /health    -> {"status": "ok"}
  GET  /metrics   -> Prometheus text (store + serving metrics)

Requests run one at a time (the models are not thread-safe). Bad input is a 400 naming the
bad field; an internal error is a 500 for that request only; the server keeps serving.
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from sgl_scd.serving.engine import ReuseEngine
from sgl_scd.store.metrics import STORE_REGISTRY

logger = logging.getLogger(__name__)
MAX_NEW_TOKENS_LIMIT = 512


class ServingMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.requests = Counter("sgl_scd_requests", "Requests served", ["role", "outcome"], registry=registry)
        self.prompt_tokens = Counter("sgl_scd_prompt_tokens", "Prompt tokens", ["role"], registry=registry)
        self.reused_tokens = Counter("sgl_scd_reused_tokens", "Prompt tokens rebuilt from SCD codes",
                                     ["role"], registry=registry)
        self.latency = Histogram("sgl_scd_request_seconds", "Request latency", ["role"], registry=registry,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30))


class BadRequest(ValueError):
    pass


def parse_request(body: bytes, models: dict[str, str], tokenizer) -> tuple[str, list[int], int]:
    """(role, prompt ids, max_new_tokens) or BadRequest naming the bad field."""
    try:
        req = json.loads(body or b"{}")
    except json.JSONDecodeError as e:
        raise BadRequest(f"body is not JSON: {e}") from None
    if not isinstance(req, dict):
        raise BadRequest("body must be a JSON object")
    unknown = set(req) - {"model", "prompt", "messages", "max_new_tokens"}
    if unknown:
        raise BadRequest(f"unknown field(s) {sorted(unknown)}")
    model = req.get("model")
    if model not in models:
        raise BadRequest(f"model {model!r} is not served; choose one of {sorted(models)}")
    if ("prompt" in req) == ("messages" in req):
        raise BadRequest("give exactly one of 'prompt' (a string) or 'messages' (a chat list)")
    if "prompt" in req:
        if not isinstance(req["prompt"], str) or not req["prompt"]:
            raise BadRequest(f"prompt must be a non-empty string, got {req['prompt']!r:.80}")
        messages = [{"role": "user", "content": req["prompt"]}]
    else:
        messages = req["messages"]
        ok = isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("content"), str)
            and m.get("role") in ("system", "user", "assistant") for m in messages)
        if not ok:
            raise BadRequest("messages must be a non-empty list of {role: system|user|assistant, content: str}")
    mnt = req.get("max_new_tokens", 16)
    if isinstance(mnt, bool) or not isinstance(mnt, int) or not 1 <= mnt <= MAX_NEW_TOKENS_LIMIT:
        raise BadRequest(f"max_new_tokens must be an int in [1, {MAX_NEW_TOKENS_LIMIT}], got {mnt!r}")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return models[model], ids, mnt


def make_server(engine: ReuseEngine, host: str, port: int) -> ThreadingHTTPServer:
    registry = CollectorRegistry()
    metrics = ServingMetrics(registry)
    lock = threading.Lock()
    models = {engine.producer.spec: "producer", **{name: name for name in engine.consumers}}

    class Handler(BaseHTTPRequestHandler):
        def _send(self, code: int, body: bytes, ctype: str = "application/json") -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _json(self, code: int, obj) -> None:
            self._send(code, json.dumps(obj).encode())

        def do_GET(self):
            if self.path == "/health":
                self._json(200, {"status": "ok", "models": models})
            elif self.path == "/metrics":
                self._send(200, generate_latest(registry) + generate_latest(STORE_REGISTRY),
                           "text/plain; version=0.0.4")
            else:
                self._json(404, {"error": f"no route {self.path!r}"})

        def do_POST(self):
            if self.path != "/generate":
                return self._json(404, {"error": f"no route {self.path!r}"})
            try:
                length = int(self.headers.get("Content-Length") or 0)
                role, ids, mnt = parse_request(self.rfile.read(length), models, engine.producer.tokenizer)
            except BadRequest as e:
                metrics.requests.labels("unknown", "bad_request").inc()
                return self._json(400, {"error": str(e)})
            try:
                with lock, metrics.latency.labels(role).time():
                    engine.max_new_tokens = mnt
                    res = engine.serve_producer(ids) if role == "producer" else engine.serve_consumer(role, ids)
            except Exception as e:  # one request fails; the server goes on
                logger.exception("request failed")
                metrics.requests.labels(role, "error").inc()
                return self._json(500, {"error": f"{type(e).__name__}: {e}"})
            metrics.requests.labels(role, "ok" if res.miss_cause is None else f"miss_{res.miss_cause}").inc()
            metrics.prompt_tokens.labels(role).inc(res.prompt_tokens)
            metrics.reused_tokens.labels(role).inc(res.reused_tokens)
            self._json(200, {"text": res.text, "prompt_tokens": res.prompt_tokens,
                             "reused_tokens": res.reused_tokens, "published_pages": res.published_pages,
                             "miss_cause": res.miss_cause, "timings": res.timings})

        def log_message(self, fmt, *args):
            logger.info("%s %s", self.address_string(), fmt % args)

    return ThreadingHTTPServer((host, port), Handler)
