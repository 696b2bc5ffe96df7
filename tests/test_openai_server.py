"""The OpenAI-compatible server, driven by the real `openai` client over HTTP on a free port:
real SmolLM2 base, the CI consumers, the real engine and scheduler, embedded store and a
test-owned Redis."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import uvicorn
from store_fixtures import _fixture_redis_servers  # noqa: F401 - fixture

from sgl_scd.demo import data
from sgl_scd.reuse import store_identity
from sgl_scd.serving.engine import ReuseEngine
from sgl_scd.serving.metrics import ServingMetrics
from sgl_scd.serving.openai_api import create_app
from sgl_scd.serving.scheduler import Scheduler
from sgl_scd.store import open_store

pytestmark = pytest.mark.model
PAGE = 16


class Served:
    def __init__(self, engine: ReuseEngine, **app_kw):
        self.engine = engine
        self.scheduler = Scheduler(max_running=4, max_queued=16)
        app = create_app(engine, self.scheduler, served_model_name="base", **app_kw)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start in 30 s"
            time.sleep(0.05)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=120)

    def metrics(self) -> str:
        return urllib.request.urlopen(self.url + "/metrics", timeout=10).read().decode()

    def published(self) -> None:
        assert self.engine.worker.drain(60), "publishing did not finish in 60 s"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.scheduler.close()
        self.engine.close()
        self.engine.store.close()


def _engine(url, base, ci_ft, ci_lora, small_adapter, lora_adapter) -> ReuseEngine:
    store = open_store(url, store_identity(small_adapter.encoder), stats_flush_s=0)
    return ReuseEngine(base, small_adapter.encoder, store, {"ci-ft": (ci_ft, small_adapter),
                                                            "ci-lora": (ci_lora, lora_adapter)},
                       background_publish=True, on_published=ServingMetrics.default().published)


@pytest.fixture(scope="module")
def srv(tmp_path_factory, base, ci_ft, ci_lora, small_adapter, lora_adapter):
    url = f"embedded://{tmp_path_factory.mktemp('store')}/s.sqlite3"
    s = Served(_engine(url, base, ci_ft, ci_lora, small_adapter, lora_adapter), max_prompt_tokens=1024)
    yield s
    s.close()


def _messages(i: int) -> list[dict]:
    return data.chat_messages(data.load_tomi("test")[i])


def _full_pages(n: int) -> int:
    return (n - 1) // PAGE * PAGE  # the last token's page is never reused


def test_models_lists_the_base_and_every_adapter(srv):
    ids = [m.id for m in srv.client.models.list().data]
    assert ids == ["base", "base:ci-ft", "base:ci-lora"]


def test_an_adapter_reuses_what_the_base_published(srv):
    msgs = _messages(0)
    prod = srv.client.chat.completions.create(model="base", messages=msgs, max_tokens=4)
    assert prod.usage.prompt_tokens_details.cached_tokens == 0 and prod.choices[0].message.role == "assistant"
    srv.published()
    got = srv.client.chat.completions.create(model="base:ci-ft", messages=msgs, max_tokens=4)
    assert got.usage.prompt_tokens == prod.usage.prompt_tokens
    assert got.usage.prompt_tokens_details.cached_tokens == _full_pages(got.usage.prompt_tokens) > 0
    own = srv.client.chat.completions.create(model="base:ci-ft", messages=msgs, max_tokens=4,
                                             extra_body={"scd_reuse": False})
    assert own.usage.prompt_tokens_details.cached_tokens == 0
    m = srv.metrics()
    assert 'sgl_scd:rebuilt_tokens_total{adapter="ci-ft"}' in m and "sgl_scd:published_pages_total" in m
    assert 'scd_store_hit_tokens_total{' in m  # the store's counters in the same registry


def test_lora_path_selects_an_adapter_and_model_wins(srv):
    prompt = "Mary went to the kitchen. Where is Mary? Answer:"
    srv.client.completions.create(model="base", prompt=prompt, max_tokens=2)
    srv.published()
    by_path = srv.client.completions.create(model="base", prompt=prompt, max_tokens=2,
                                            extra_body={"lora_path": "ci-lora"})
    by_name = srv.client.completions.create(model="base:ci-lora", prompt=prompt, max_tokens=2,
                                            extra_body={"lora_path": "ci-ft"})
    assert by_path.choices[0].text == by_name.choices[0].text
    assert by_path.usage.prompt_tokens_details.cached_tokens == _full_pages(by_path.usage.prompt_tokens)
    assert by_path.object == "text_completion" and by_path.choices[0].finish_reason in ("length", "stop")


def test_streaming_chat_equals_the_plain_answer_and_reports_usage(srv):
    msgs = _messages(1)
    plain = srv.client.chat.completions.create(model="base:ci-lora", messages=msgs, max_tokens=8)
    chunks = list(srv.client.chat.completions.create(model="base:ci-lora", messages=msgs, max_tokens=8,
                                                     stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_streaming_completions(srv):
    prompt = "The capital of France is"
    plain = srv.client.completions.create(model="base", prompt=prompt, max_tokens=6)
    text = "".join(c.choices[0].text for c in srv.client.completions.create(
        model="base", prompt=prompt, max_tokens=6, stream=True))
    assert text == plain.choices[0].text and plain.usage.completion_tokens == 6


def test_stop_strings_cut_the_answer(srv):
    prompt = "Count: 1, 2, 3, 4, 5, 6,"
    full = srv.client.completions.create(model="base", prompt=prompt, max_tokens=12).choices[0].text
    stop = full.strip()[2:4] or full[:2]  # a string the greedy answer is known to contain
    cut = srv.client.completions.create(model="base", prompt=prompt, max_tokens=12, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop" and cut.text == full[: full.index(stop)]
    streamed = "".join(c.choices[0].text for c in srv.client.completions.create(
        model="base", prompt=prompt, max_tokens=12, stop=[stop], stream=True))
    assert streamed == cut.text


def test_seeded_sampling_repeats(srv):
    kw = {"model": "base", "prompt": "Once upon a time", "max_tokens": 8, "temperature": 1.0, "top_p": 0.9,
          "seed": 7}
    first, again = (srv.client.completions.create(**kw).choices[0].text for _ in range(2))
    assert first == again


def _status(fn) -> tuple[int, dict]:
    try:
        fn()
    except openai.APIStatusError as e:
        return e.status_code, e.response.json()["error"]
    raise AssertionError("the request succeeded")


@pytest.mark.parametrize("kw,status,needle,param", [
    ({"model": "gpt-4"}, 404, "base:ci-ft", "model"),
    ({"model": "base:nope"}, 404, "ci-lora", "model"),
    ({"model": "base", "extra_body": {"lora_path": "nope"}}, 404, "'nope'", "lora_path"),
    ({"model": "base", "max_tokens": 0}, 400, "max_tokens", "max_tokens"),
    ({"model": "base", "max_tokens": 10**6}, 400, "max_tokens", "max_tokens"),
    ({"model": "base", "temperature": -1}, 400, "temperature", "temperature"),
    ({"model": "base", "n": 2}, 400, "n", "n"),
    ({"model": "base", "extra_body": {"frobnicate": 1}}, 400, "frobnicate", "frobnicate"),
    ({"model": "base", "messages": [{"role": "robot", "content": "x"}]}, 400, "role", "messages.0.role"),
    ({"model": "base", "messages": []}, 400, "messages", "messages"),
])
def test_bad_requests_get_openai_errors_naming_the_field(srv, kw, status, needle, param):
    kw = {"messages": [{"role": "user", "content": "hi"}], **kw}
    code, err = _status(lambda: srv.client.chat.completions.create(**kw))
    assert code == status and needle in err["message"] and err["param"] == param
    assert set(err) == {"message", "type", "param", "code"}
    assert srv.client.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=1).choices  # the server goes on


def test_prompt_over_the_limit_is_413_and_bad_ids_400(srv):
    code, err = _status(lambda: srv.client.completions.create(model="base", prompt="word " * 2000, max_tokens=1))
    assert code == 413 and "1024" in err["message"] and err["code"] == "context_length_exceeded"
    code, err = _status(lambda: srv.client.completions.create(model="base", prompt=[1, 10**9], max_tokens=1))
    assert code == 400 and str(10**9) in err["message"]
    req = urllib.request.Request(srv.url + "/v1/completions", b"{not json", {"Content-Type": "application/json"})
    try:
        urllib.request.urlopen(req, timeout=10)
        raise AssertionError("accepted")
    except urllib.error.HTTPError as e:
        assert e.code == 400 and "error" in json.loads(e.read())


def test_an_internal_failure_is_a_500_for_that_request_only(srv, monkeypatch):
    def broken(gen):
        raise RuntimeError("injected fault")

    monkeypatch.setattr(srv.engine, "_prefill_consumer", broken)
    code, err = _status(lambda: srv.client.completions.create(model="base:ci-ft", prompt="hello", max_tokens=2))
    assert code == 500 and "injected fault" in err["message"]
    monkeypatch.undo()
    assert srv.client.completions.create(model="base:ci-ft", prompt="hello", max_tokens=2).choices


def test_concurrent_requests_all_answer_as_alone(srv):
    prompts = [f"List {i} colors:" for i in range(6)]
    alone = [srv.client.completions.create(model="base", prompt=p, max_tokens=6).choices[0].text for p in prompts]
    with ThreadPoolExecutor(6) as pool:  # more than max_running (4): some wait their turn
        together = list(pool.map(lambda p: srv.client.completions.create(
            model="base", prompt=p, max_tokens=6).choices[0].text, prompts))
    assert together == alone


def _metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_client_dropping_a_stream_cancels_it_and_others_go_on(srv):
    name = "sgl_scd:requests_total"
    before = _metric(srv.metrics(), name, model="base", outcome="cancelled")
    stream = srv.client.completions.create(model="base", prompt="Tell a long story:", max_tokens=2000,
                                           stream=True)
    next(iter(stream))
    stream.close()  # the client goes away after its first chunk
    assert srv.client.completions.create(model="base", prompt="Hi", max_tokens=2).choices
    deadline = time.monotonic() + 30
    while _metric(srv.metrics(), name, model="base", outcome="cancelled") <= before:
        assert time.monotonic() < deadline, "the dropped stream was never cancelled"
        time.sleep(0.2)
    deadline = time.monotonic() + 10  # its 2,000 tokens would take minutes: the decode was stopped
    while srv.scheduler.load != (0, 0):
        assert time.monotonic() < deadline, f"still running after the client left: {srv.scheduler.load}"
        time.sleep(0.1)


@pytest.mark.redis
def test_reuse_through_a_test_owned_redis(redis_servers, base, ci_ft, ci_lora, small_adapter, lora_adapter):
    s = Served(_engine(redis_servers().url, base, ci_ft, ci_lora, small_adapter, lora_adapter))
    try:
        msgs = _messages(2)
        s.client.chat.completions.create(model="base", messages=msgs, max_tokens=2)
        s.published()
        got = s.client.chat.completions.create(model="base:ci-lora", messages=msgs, max_tokens=2)
        assert got.usage.prompt_tokens_details.cached_tokens == _full_pages(got.usage.prompt_tokens) > 0
        assert s.engine.store.url.startswith("redis://")
    finally:
        s.close()


def test_launch_refuses_an_unknown_adapter_at_start_naming_it(small_encoder, tmp_path):
    from sgl_scd import launch

    with pytest.raises(SystemExit, match="no-such-adapter"):
        launch.main(["--encoder", str(small_encoder.path), "--consumer", str(tmp_path / "no-such-adapter"),
                     "--store-url", f"embedded://{tmp_path}/s.sqlite3"])


@pytest.mark.parametrize("flag", ["--max-running-requests", "--publish-queue", "--max-prompt-tokens"])
def test_launch_refuses_bad_sizes(flag, capsys):
    from sgl_scd import launch

    with pytest.raises(SystemExit):
        launch.main([flag, "0"])
    assert flag in capsys.readouterr().err


def test_launch_dry_run_prints_sglang_commands_sglang_parses(small_encoder, lora_adapter, small_adapter, capsys):
    """The base's server with the LoRA consumer, then the full fine-tune's own server (next port)."""
    import shlex

    from sglang.srt.server_args import prepare_server_args

    from sgl_scd import launch
    from sgl_scd.hf import models
    from sgl_scd.sglang_ext.config import LinkerSettings

    launch.main(["--dry-run", "--encoder", str(small_encoder.path), "--port", "30123", "--",
                 "--mem-fraction-static", "0.6"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    parsed = []
    for line in lines:
        cmd = shlex.split(line)
        assert cmd[1:3] == ["-m", "sglang.launch_server"]
        args = prepare_server_args(cmd[3:])
        assert args.page_size == small_encoder.page_size and args.mem_fraction_static == 0.6
        config = args.unified_cache_external_linker_config
        config = json.loads(config) if isinstance(config, str) else config
        parsed.append((args, LinkerSettings.from_dict(config["linker_extra_config"])))
    (base_args, base_cfg), (ft_args, ft_cfg) = parsed
    assert base_args.port == 30123 and base_args.model_path == str(models.resolve("base"))
    assert base_args.enable_lora and [p.split("=")[0] for p in base_args.lora_paths] == ["ci-lora"]
    assert set(base_cfg.adapters) == {"ci-lora"} and base_cfg.publish and base_cfg.consumer is None
    assert base_cfg.encoder == str(small_encoder.path.resolve())
    assert ft_args.port == 30124 and ft_args.model_path == str(models.resolve("ci-ft")) and not ft_args.enable_lora
    assert ft_cfg.consumer == "ci-ft" and not ft_cfg.publish and set(ft_cfg.adapters) == {"ci-ft"}
