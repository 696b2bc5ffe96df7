"""The OpenAI-compatible HTTP API over one ReuseEngine (FastAPI).

  GET  /v1/models                 the base and every adapter ("<base>:<adapter>")
  POST /v1/completions            prompt (text or token ids)
  POST /v1/chat/completions       messages (the models' chat template)
  GET  /health, GET /metrics      liveness; Prometheus text (one registry)

Adapters are chosen as in SGLang: `model: "<base>:<adapter>"` (wins) or `lora_path: "<adapter>"`.
usage.prompt_tokens_details.cached_tokens counts the prompt tokens rebuilt from published codes.
Errors are OpenAI-shaped: {"error": {"message", "type", "param", "code"}}; 400 names the bad
field, 404 lists the served models, 413 gives the prompt limit, 500 fails that request only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import generate_latest

from sgl_scd.serving.engine import PRODUCER, Generation, ReuseEngine, Sampling
from sgl_scd.serving.metrics import ServingMetrics
from sgl_scd.serving.protocol import ChatCompletionRequest, CompletionRequest
from sgl_scd.serving.scheduler import Busy, Scheduler, Ticket
from sgl_scd.store.metrics import STORE_REGISTRY

logger = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


def create_app(engine: ReuseEngine, scheduler: Scheduler, *, served_model_name: str = "base",
               max_prompt_tokens: int = 4096, metrics: ServingMetrics | None = None) -> FastAPI:
    metrics = metrics or ServingMetrics.default()
    tokenizer = engine.producer.tokenizer
    adapters = sorted(engine.consumers)
    served = [served_model_name, *(f"{served_model_name}:{a}" for a in adapters)]
    created = int(time.time())
    app = FastAPI(title="sgl_scd", description=__doc__)

    @app.exception_handler(ApiError)
    async def _api_error(_req, e: ApiError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req, e: RequestValidationError):
        err = e.errors()[0]
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        got = f" (got {err['input']!r:.80})" if "input" in err and err.get("type") != "missing" else ""
        return ApiError(400, f"{param or 'body'}: {err.get('msg')}{got}", param=param).response()

    @app.exception_handler(Exception)
    async def _internal(_req, e: Exception):
        logger.exception("request failed")
        return ApiError(500, f"internal error: {type(e).__name__}: {e}", "internal_error").response()

    def resolve(req) -> tuple[str, str]:
        """(engine model: PRODUCER or an adapter name, the served name it answers as)."""
        base, sep, adapter = req.model.partition(":")
        if base != served_model_name or (sep and not adapter):
            raise ApiError(404, f"model {req.model!r} is not served; choose one of {served}", param="model",
                           code="model_not_found")
        adapter = adapter or req.lora_path
        if not adapter:
            return PRODUCER, served_model_name
        if adapter not in engine.consumers:
            where = "model" if sep else "lora_path"
            raise ApiError(404, f"adapter {adapter!r} is not served; choose one of {adapters} "
                                f"(as model \"{served_model_name}:<adapter>\" or lora_path)", param=where,
                           code="model_not_found")
        return adapter, f"{served_model_name}:{adapter}"

    def check_ids(ids: list[int], param: str) -> list[int]:
        if len(ids) > max_prompt_tokens:
            raise ApiError(413, f"the prompt has {len(ids)} tokens; this server accepts at most {max_prompt_tokens}",
                           param=param, code="context_length_exceeded")
        bad = [t for t in ids if not 0 <= t < len(tokenizer)]
        if bad:
            raise ApiError(400, f"{param}: token ids must be in [0, {len(tokenizer)}), got {bad[0]}", param=param)
        return ids

    def generation(req, model: str, ids: list[int], default_max: int) -> Generation:
        max_tokens = getattr(req, "max_completion_tokens", None) or req.max_tokens or default_max
        return Generation(model, ids, Sampling(max_tokens, req.temperature, req.top_p, req.seed), reuse=req.scd_reuse)

    def submit(gen: Generation) -> tuple[Ticket, asyncio.Queue]:
        """Queue the request on the model thread; its (kind, value) events arrive on the queue."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        try:
            ticket = scheduler.submit(engine.steps(gen), lambda kind, value: loop.call_soon_threadsafe(
                q.put_nowait, (kind, value)))
        except Busy as e:
            raise ApiError(503, f"server at capacity: {e}; retry later", "server_busy") from None
        return ticket, q

    async def run(gen: Generation, ticket: Ticket, q: asyncio.Queue, stops: list[str], served_as: str):
        """Text deltas as they become final (stop strings cut, partial characters held back), then
        one (None, finish_reason) item. Leaving early (a client gone) cancels the decode."""
        t0 = time.perf_counter()
        sent, first = "", True
        hold = max((len(s) - 1 for s in stops), default=0)  # a stop string may still be forming
        outcome = "cancelled"  # unless it ends otherwise: the client went away
        try:
            while True:
                kind, value = await q.get()
                if kind == "error":
                    outcome = "error"
                    raise ApiError(500, f"internal error: {type(value).__name__}: {value}", "internal_error")
                if kind == "cancelled":
                    return
                if first:
                    first = False
                    metrics.ttft.labels(served_as).observe(time.perf_counter() - t0)
                    _record_prompt(metrics, gen, served_as)
                text = tokenizer.decode(gen.tokens, skip_special_tokens=True)
                cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
                if cut >= 0:
                    gen.finish_reason = "stop"
                    text = text[:cut]
                final = len(text) if kind == "done" or cut >= 0 else len(text) - hold
                if kind == "token" and cut < 0 and "\ufffd" in text[len(sent):]:
                    final = min(final, text.index("\ufffd", len(sent)))  # a character still incomplete
                if final > len(sent):
                    yield text[len(sent):final]
                    sent = text[:final]
                if kind == "done" or cut >= 0:
                    outcome = "ok"
                    break
        finally:
            ticket.cancel()  # stops the decode of a request whose client left; a finished one ignores it
            metrics.requests.labels(served_as, outcome).inc()
            metrics.generation_tokens.labels(served_as).inc(len(gen.tokens))
        metrics.e2e.labels(served_as).observe(time.perf_counter() - t0)
        yield None, gen.finish_reason or "stop"

    def usage(gen: Generation) -> dict:
        return {"prompt_tokens": len(gen.ids), "completion_tokens": len(gen.tokens),
                "total_tokens": len(gen.ids) + len(gen.tokens),
                "prompt_tokens_details": {"cached_tokens": gen.cached_tokens}}

    async def respond(req, gen: Generation, served_as: str, chat: bool):
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        obj = "chat.completion" if chat else "text_completion"
        if not req.stream:
            parts, finish = [], "stop"
            async for item in run(gen, *submit(gen), req.stops, served_as):
                if isinstance(item, tuple):
                    finish = item[1]
                else:
                    parts.append(item)
            text = "".join(parts)
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
                      if chat else {"index": 0, "text": text, "finish_reason": finish, "logprobs": None})
            return JSONResponse({"id": rid, "object": obj, "created": int(time.time()), "model": req.model,
                                 "choices": [choice], "usage": usage(gen)})

        chunk_obj = "chat.completion.chunk" if chat else "text_completion"
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(delta: str | None, finish: str | None = None, role: bool = False) -> str:
            if chat:
                d = {"role": "assistant", "content": ""} if role else ({} if delta is None else {"content": delta})
                choice = {"index": 0, "delta": d, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
            body = {"id": rid, "object": chunk_obj, "created": int(time.time()), "model": req.model,
                    "choices": [choice]}
            return f"data: {json.dumps(body)}\n\n"

        queued = submit(gen)  # at capacity: a 503 before the stream starts

        async def sse():
            try:
                if chat:
                    yield chunk(None, role=True)
                async for item in run(gen, *queued, req.stops, served_as):
                    if isinstance(item, tuple):
                        yield chunk(None, item[1])
                    else:
                        yield chunk(item)
                if include_usage:
                    body = {"id": rid, "object": chunk_obj, "created": int(time.time()), "model": req.model,
                            "choices": [], "usage": usage(gen)}
                    yield f"data: {json.dumps(body)}\n\n"
            except ApiError as e:
                yield f"data: {json.dumps({'error': {'message': e.message, 'type': e.type, 'code': e.code}})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        model, served_as = resolve(req)
        ids = req.prompt if isinstance(req.prompt, list) else tokenizer.encode(req.prompt, add_special_tokens=False)
        if not ids:
            raise ApiError(400, "prompt: tokenizes to no tokens", param="prompt")
        gen = generation(req, model, check_ids(list(ids), "prompt"), 16)
        return await respond(req, gen, served_as, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest):
        model, served_as = resolve(req)
        msgs = [{"role": m.role, "content": m.text()} for m in req.messages]
        ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        gen = generation(req, model, check_ids(ids, "messages"), 128)
        return await respond(req, gen, served_as, chat=True)

    @app.get("/v1/models")
    async def list_models():
        data = [{"id": name, "object": "model", "created": created, "owned_by": "sgl_scd",
                 "root": engine.producer.spec if i == 0 else str(engine.consumers[adapters[i - 1]].adapter.path),
                 "parent": None if i == 0 else served_model_name} for i, name in enumerate(served)]
        return {"object": "list", "data": data}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        running, waiting = scheduler.load
        metrics.running.set(running)
        metrics.waiting.set(waiting)
        return Response(generate_latest(STORE_REGISTRY), media_type="text/plain; version=0.0.4")

    return app


def _record_prompt(metrics: ServingMetrics, gen: Generation, served_as: str) -> None:
    metrics.prompt_tokens.labels(served_as).inc(len(gen.ids))
    if gen.model == PRODUCER or not gen.reuse:
        return
    metrics.lookup_tokens.labels(gen.model).inc(gen.lookup_tokens)
    metrics.hit_tokens.labels(gen.model).inc(gen.hit_tokens)
    metrics.rebuilt_tokens.labels(gen.model).inc(gen.cached_tokens)
    if gen.miss_cause:
        metrics.misses.labels(gen.model, gen.miss_cause).inc()
    if "rebuild_s" in gen.timings:
        metrics.rebuild_seconds.labels(gen.model).observe(gen.timings["rebuild_s"])
