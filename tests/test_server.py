"""The HTTP front end on a free loopback port: real engine, embedded store."""

import json
import threading
import urllib.error
import urllib.request

import pytest

from sgl_scd.demo import data
from sgl_scd.reuse import store_identity
from sgl_scd.serving.engine import ReuseEngine
from sgl_scd.serving.server import make_server
from sgl_scd.store import open_store

pytestmark = pytest.mark.model


@pytest.fixture()
def server_url(tmp_path, base, ci_ft, small_adapter):
    store = open_store(f"embedded://{tmp_path}/s.sqlite3", store_identity(small_adapter.encoder), stats_flush_s=0)
    srv = make_server(ReuseEngine(base, small_adapter.encoder, store, {"ci-ft": (ci_ft, small_adapter)}),
                      "127.0.0.1", 0)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()
    store.close()


def _post(url, body):
    req = urllib.request.Request(url + "/generate", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_producer_then_consumer_reuses_pages(server_url):
    item = data.load_tomi("test")[5]
    msgs = [{"role": "system", "content": data.SYSTEM_PROMPT}, {"role": "user", "content": item.user_text}]
    code, prod = _post(server_url, {"model": "base", "messages": msgs, "max_new_tokens": 8})
    assert code == 200 and prod["published_pages"] >= 1
    code, cons = _post(server_url, {"model": "ci-ft", "messages": msgs, "max_new_tokens": 8})
    assert code == 200 and cons["reused_tokens"] == ((cons["prompt_tokens"] - 1) // 16) * 16
    metrics = urllib.request.urlopen(server_url + "/metrics", timeout=10).read().decode()
    assert 'sgl_scd_reused_tokens_total{role="ci-ft"}' in metrics
    assert "scd_store" in metrics or "sgl_scd_store" in metrics


@pytest.mark.parametrize("body,needle", [
    ({"model": "gpt-4", "prompt": "hi"}, "'gpt-4'"),
    ({"model": "base"}, "exactly one of"),
    ({"model": "base", "prompt": "hi", "max_new_tokens": 0}, "got 0"),
    ({"model": "base", "prompt": "hi", "temperature": 1}, "temperature"),
    ({"model": "base", "messages": [{"role": "robot", "content": "x"}]}, "role"),
])
def test_bad_requests_are_400_naming_the_value(server_url, body, needle):
    code, out = _post(server_url, body)
    assert code == 400 and needle in out["error"]
    assert _post(server_url, {"model": "base", "prompt": "Say hi.", "max_new_tokens": 2})[0] == 200
