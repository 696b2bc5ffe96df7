"""ScdLinker on CPU with real SGLang 0.5.23 objects: a UnifiedRadixCache over a real
MHATokenToKVPool / PagedTokenToKVPoolAllocator / ReqToTokenPool, the linker built by SGLang's
dynamic linker factory, the plugin's hooks applied by HookRegistry. The codec is model-free (the
random encoder and decoder of test_codec_core, saved as real artifacts); K/V and the patch
layer's inputs are written into the pool and the side buffer as a producer forward would."""

from __future__ import annotations

import inspect
import os
import threading
import time
from array import array
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "sgl_scd" / "torch_extensions"))
pytest.importorskip("sglang")

from sglang.srt.lora.lora_registry import LoRARef
from sglang.srt.mem_cache.allocator import PagedTokenToKVPoolAllocator
from sglang.srt.mem_cache.base_prefix_cache import (
    InitLoadBackParams,
    InsertParams,
    MatchPrefixParams,
)
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
from sglang.srt.mem_cache.radix_cache import RadixKey
from sglang.srt.mem_cache.unified_cache.components import ComponentType
from sglang.srt.mem_cache.unified_cache.linker_factory import create_unified_cache_linker
from sglang.srt.mem_cache.unified_cache.unified_cache_linker import (
    UnifiedCacheLinker,
    UnifiedCacheLinkerWrapper,
)
from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache
from sglang.srt.mem_cache.utils import get_hash_str
from sglang.srt.plugins.hook_registry import HookRegistry
from sglang.srt.server_args import ServerArgs, set_global_server_args_for_scheduler
from store_fixtures import _fixture_redis_servers  # noqa: F401 - fixture
from test_codec_core import HID, PS, L, _save_artifacts, _states
from test_store_faults import misses

from sgl_scd.codec import manifest as mf
from sgl_scd.codec import wire
from sgl_scd.sglang_ext import plugin
from sgl_scd.sglang_ext.config import LINKER_CLASS, LINKER_MODULE, LinkerSettings
from sgl_scd.sglang_ext.linker import ScdLinker, base_namespace

H, D = 2, 8
POOL = 256
T = 3 * PS  # a prompt's three full pages (its last token, one more, is never reused)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """An encoder dir and one adapter ("tiny-lora") beside it, and the adapter's consumer projections."""
    enc_dir, _, proj = _save_artifacts(tmp_path_factory.mktemp("scd"))
    return enc_dir.parent, proj

@pytest.fixture(scope="module", autouse=True)
def hooks():
    plugin.register()
    HookRegistry.apply_hooks()
    yield


LORAS = {"tiny-lora": "/peft/tiny-lora", "other": "/peft/other"}  # "other" has no SCD artifacts


class Env:
    """One cache with the linker attached, as SGLang's registry attaches it."""

    def __init__(self, root: Path, proj, store_url: str, dtype=torch.float32, head_dim=D, **settings):
        self.server_args = ServerArgs(model_path="dummy", page_size=PS,
                                      lora_paths=[f"{n}={p}" for n, p in LORAS.items()])
        set_global_server_args_for_scheduler(self.server_args)
        self.kv = MHATokenToKVPool(size=POOL, page_size=PS, dtype=dtype, head_num=H, head_dim=head_dim, layer_num=L,
                                   device="cpu", enable_memory_saver=False)
        self.alloc = PagedTokenToKVPoolAllocator(size=POOL, page_size=PS, dtype=dtype, device="cpu",
                                                 kvcache=self.kv, need_sort=False)
        r2t = ReqToTokenPool(size=8, max_context_len=128, device="cpu", enable_memory_saver=False)
        params = CacheInitParams(disable=False, req_to_token_pool=r2t, token_to_kv_pool_allocator=self.alloc,
                                 page_size=PS, tree_components=(ComponentType.FULL,))
        self.cache = UnifiedRadixCache(params)
        extra = {"encoder": str(root / "enc"), "adapters": {"tiny-lora": str(root / "tiny-lora")},
                 "store_url": store_url, **settings}
        config = {"linker": LINKER_CLASS, "linker_module_path": LINKER_MODULE, "linker_extra_config": extra}
        self.linker = create_unified_cache_linker(self.server_args, params, backend="dynamic", config=config,
                                                  components=set(self.cache.components), forward_stream=None)
        self.cache.init_cache_linker(self.linker)
        self.kv.register_layer_transfer_counter(self.linker.layer_done_counter)
        self.linker.set_projections("tiny-lora", proj)

    def prefill_base(self, ids: list[int], salt: str | None = None):
        """What a base prefill leaves: K/V of every layer in fresh slots, h in the side buffer, the insert."""
        states, slots = self.write_base(len(ids))
        self.cache.insert(InsertParams(key=RadixKey(array("q", ids), cache_salt=salt), value=slots))
        self.reap()
        return states, slots

    def write_base(self, t: int):
        """A base forward's writes for t tokens: K/V into fresh slots, h into the side buffer."""
        states = _states(t)
        slots = self.alloc.alloc(t)
        for layer in range(L):
            self.kv.set_kv_buffer(None, slots, states.k[layer], states.v[layer], layer_id_override=layer)
        for layer, h in states.h.items():
            self.linker.patch_inputs.record(layer, slots, h)
        return states, slots

    def reap(self):
        assert self.linker.drain(10)  # the publish worker is done
        self.cache.check_hicache_events()  # reaps the offload completions

    def lora_request(self, rid: str, ids: list[int], name: str = "tiny-lora", salt: str | None = None):
        """match -> init_load_back -> layer-wise load -> finish, as the scheduler drives them;
        (host hit tokens, loaded tokens, the request's loaded slots, failed requests)."""
        req = Req(rid, LoRARef.deterministic_id(name, LORAS[name]))
        key = RadixKey(array("q", ids), extra_key=req.extra_key, limit=len(ids) - 1, cache_salt=salt)
        m = self.cache.match_prefix(MatchPrefixParams(key=key, req=req))
        req.last_node = m.last_device_node
        loaded, _ = self.cache.init_load_back(InitLoadBackParams(best_match_node=m.best_match_node,
                                                                 host_hit_length=m.host_hit_length, req=req))
        slots = self.cache.linker.private_load_indices.get(rid)
        index = self.cache.ready_to_load_host_cache()
        self.linker.layer_done_counter.set_consumer(index)  # what the TP worker does before the forward
        for layer in range(L):
            self.kv.get_key_buffer(layer)  # the forward waits on each layer
        failed = self.cache.finish_external_linker_loads([req])
        return m.host_hit_length, loaded, slots, failed

    def close(self):
        self.cache.release_host_resources()  # closes the linker and its store


class Req:
    """The fields of a scheduler Req the cache reads (Req.__init__ appends lora_id to extra_key)."""

    def __init__(self, rid: str, lora_id: str | None):
        self.rid, self.lora_id = rid, lora_id
        self.extra_key, self.cache_salt = lora_id, None
        self.session = self.kv = self.last_node = self.swa_branching_seqlen = None
        self.swa_host_hit_length = self.mamba_host_hit_length = 0


@pytest.fixture()
def env(artifacts, tmp_path):
    e = Env(*artifacts, f"embedded://{tmp_path}/s.sqlite3")
    yield e
    e.close()


IDS = list(range(100, 100 + T + 1))


def _codes(linker, states, pages):
    codes = linker.encoder.codec.encode(states)
    return {s: q[: pages * PS] for s, q in codes.items()}


def test_a_base_insert_publishes_its_pages_under_sglangs_own_page_hashes(env):
    assert isinstance(env.linker, ScdLinker) and env.linker.hooks_missing == []
    states, _ = env.prefill_base(IDS[:T])
    hashes = get_hash_str(IDS[:T], None, page_size=PS)  # SGLang's base chain
    node = env.cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", IDS[:T])))).last_device_node
    assert env.cache.get_last_hash_value(node) == hashes[-1]  # the tree's own keys
    assert env.linker.published_pages == 3 and env.linker.num_completed_offloads() == 0  # reaped
    blobs = env.linker.store.fetch_prefix(hashes, adapter="base")
    enc = env.linker.encoder
    assert len(blobs) == 3 and wire.valid_prefix(enc.codec, blobs, enc.digest, PS) == (3, None)
    got = wire.decode_pages(enc.codec, blobs, enc.digest, PS)
    want = enc.codec.encode(states)
    assert all(torch.equal(got[s], want[s]) for s in want)
    env.prefill_base(IDS[:T])  # stored nodes are not offloaded again
    assert env.linker.published_pages == 3


def test_completions_are_reported_in_offload_order(env):
    import threading

    gate, publish = threading.Event(), env.linker.publisher.publish
    env.linker.publisher.publish = lambda *a, **k: (gate.wait(10), publish(*a, **k))[1]  # holds the worker
    _, slots = env.write_base(T)
    env.cache.insert(InsertParams(key=RadixKey(array("q", IDS[:T])), value=slots))  # base: published later
    lora_id = LoRARef.deterministic_id("tiny-lora", LORAS["tiny-lora"])
    env.cache.insert(InsertParams(key=RadixKey(array("q", IDS[:T]), extra_key=lora_id), value=env.alloc.alloc(T)))
    assert env.linker.num_completed_offloads() == 0  # the adapter node's completion waits behind the base's
    gate.set()
    env.reap()
    assert env.linker.num_completed_offloads() == 0 and env.linker.published_pages == 3
    assert len(env.cache.linker.pending_offloads) == 0  # both committed


def test_inline_publishing_completes_inside_offload(artifacts, tmp_path):
    e = Env(*artifacts, f"embedded://{tmp_path}/i.sqlite3", publish_worker=False)
    try:
        e.cache.insert(InsertParams(key=RadixKey(array("q", IDS[:T])), value=e.alloc.alloc(T)))
        assert e.linker.num_completed_offloads() == 1 and e.linker.published_pages == 0  # no inputs captured
        assert e.linker.skipped_offloads["no_inputs"] == 1
        e.prefill_base(list(range(500, 500 + T)))  # another prompt, with its inputs
        assert e.linker.published_pages == 3
    finally:
        e.close()


def test_pages_after_a_split_publish_with_their_absolute_positions(env):
    env.prefill_base(IDS[: 2 * PS])
    states, _ = env.prefill_base(IDS[:T])  # a child node: page 2, after the two stored pages
    hashes = get_hash_str(IDS[:T], None, page_size=PS)
    assert env.linker.published_pages == 3
    enc = env.linker.encoder
    blob = env.linker.store.fetch_prefix(hashes[2:], adapter="base", first_page=2)
    got = wire.decode_pages(enc.codec, blob, enc.digest, PS, first_page=2)
    want = enc.codec.encode(states.slice(2 * PS, T))
    assert all(torch.equal(got[s], want[s]) for s in want)


def test_a_lora_request_rebuilds_the_base_pages_in_its_own_slots(env, artifacts):
    states, _ = env.prefill_base(IDS[:T])
    hit, loaded, slots, failed = env.lora_request("r1", IDS)
    assert (hit, loaded, failed) == (T, T, [])
    fold = env.linker.consumers["tiny-lora"].adapter.fold(artifacts[1])
    k_want, v_want = fold.rebuild(_codes(env.linker, states, 3))  # the core's rebuild of the same codes
    for layer in range(L):
        k, v = env.kv.k_buffer[layer][slots], env.kv.v_buffer[layer][slots]
        assert torch.allclose(k, k_want[layer], rtol=1e-5, atol=1e-5 * k_want.abs().max())
        assert torch.allclose(v, v_want[layer], rtol=1e-5, atol=1e-5 * v_want.abs().max())
    assert env.linker.patch_inputs.read(slots)[1].sum() == 0  # loaded slots hold no base inputs


def test_pages_after_the_adapters_own_device_prefix_rebuild_at_their_positions(env, artifacts):
    states, _ = env.prefill_base(IDS[:T])
    lora_id = LoRARef.deterministic_id("tiny-lora", LORAS["tiny-lora"])
    own = env.alloc.alloc(PS)  # the adapter already holds page 0 in its own namespace
    env.cache.insert(InsertParams(key=RadixKey(array("q", IDS[:PS]), extra_key=lora_id), value=own))
    env.reap()
    hit, loaded, slots, failed = env.lora_request("r9", IDS)
    assert (hit, loaded, failed) == (2 * PS, 2 * PS, [])  # pages 1 and 2 from codes
    fold = env.linker.consumers["tiny-lora"].adapter.fold(artifacts[1])
    k_want, v_want = fold.rebuild(_codes(env.linker, states, 3))
    for layer in range(L):
        k, v = env.kv.k_buffer[layer][slots], env.kv.v_buffer[layer][slots]
        assert torch.allclose(k, k_want[layer, PS:T], rtol=1e-5, atol=1e-5 * k_want.abs().max())
        assert torch.allclose(v, v_want[layer, PS:T], rtol=1e-5, atol=1e-5 * v_want.abs().max())


def test_salted_pages_are_found_only_with_their_salt(env):
    env.prefill_base(IDS[:T], salt="tenant-a")
    assert env.linker.published_pages == 3
    assert env.linker.store.fetch_prefix(get_hash_str(IDS[:T], None, page_size=PS), adapter="base") == []
    assert env.lora_request("s1", IDS, salt="tenant-b")[:2] == (0, 0)
    assert env.lora_request("s2", IDS)[:2] == (0, 0)
    assert env.lora_request("s3", IDS, salt="tenant-a")[:2] == (T, T)


def test_the_lookup_is_memoized_per_rid(env):
    env.prefill_base(IDS[:T])
    req = Req("r2", LoRARef.deterministic_id("tiny-lora", LORAS["tiny-lora"]))
    key = RadixKey(array("q", IDS), extra_key=req.extra_key, limit=T)
    calls = []
    fetch = env.linker.consumers["tiny-lora"].fetch
    env.linker.consumers["tiny-lora"].fetch = lambda *a, **k: calls.append(1) or fetch(*a, **k)
    for _ in range(3):  # admission retries
        assert env.cache.match_prefix(MatchPrefixParams(key=key, req=req)).host_hit_length == T
    assert calls == [1]


def test_an_adapter_without_artifacts_is_a_counted_miss(env):
    env.prefill_base(IDS[:T])
    hit, loaded, _, _ = env.lora_request("r3", IDS, name="other")
    assert (hit, loaded) == (0, 0)
    assert env.linker.misses[("other", "no_adapter")] == 3


def test_a_corrupt_page_shortens_the_promise(env):
    states, _ = env.prefill_base(IDS[:T])
    hashes = get_hash_str(IDS[:T], None, page_size=PS)
    blob = env.linker.publisher.encode(states)[1]
    env.linker.store.publish(hashes[1:2], [blob[:-1] + bytes([blob[-1] ^ 1])], first_page=1)  # wire CRC fails
    hit, loaded, _, failed = env.lora_request("r4", IDS)
    assert (hit, loaded, failed) == (PS, PS, [])  # page 0 only
    assert env.linker.misses[("tiny-lora", "wire")] == 2


def test_the_kill_switch_and_missing_projections_promise_nothing(env, artifacts):
    env.prefill_base(IDS[:T])
    env.linker.set_enabled("tiny-lora", False)
    assert env.lora_request("r5", IDS)[:2] == (0, 0)
    assert env.linker.misses[("tiny-lora", "disabled")] == 3
    env.linker.set_enabled("tiny-lora", True)
    env.linker._projections.clear()
    env.linker._decoders.clear()
    assert env.lora_request("r6", IDS)[:2] == (0, 0)
    assert env.linker.misses[("tiny-lora", "no_adapter")] == 3
    env.linker.set_projections("tiny-lora", artifacts[1])
    assert env.lora_request("r7", IDS)[:2] == (T, T)


def test_a_store_that_is_down_publishes_and_promises_nothing_without_raising(artifacts):
    e = Env(*artifacts, "redis://127.0.0.1:1/0")
    try:
        e.prefill_base(IDS[:T])  # the offload completes as failed; nothing raises
        assert e.linker.published_pages == 0
        assert e.lora_request("r8", IDS)[:2] == (0, 0)
        assert e.linker.misses[("tiny-lora", "store_miss")] == 3
    finally:
        e.close()


@pytest.mark.redis
def test_a_slow_store_is_a_counted_miss_within_the_timeout(artifacts, redis_servers):
    server = redis_servers()
    e = Env(*artifacts, server.url, store_timeout_s=0.3)
    try:
        e.prefill_base(IDS[:T])
        assert e.linker.published_pages == 3
        server.pause()  # a hung server: connections stay open, nothing answers
        try:
            t0 = time.monotonic()
            assert e.lora_request("s1", IDS)[:3:2] == (0, None)  # nothing promised, nothing loaded
            # one 0.3 s operation timeout (the lookup is on the scheduler's thread), no retries;
            # 1.5 s leaves room for a loaded 2-core machine
            assert time.monotonic() - t0 < 1.5
            assert e.linker.misses[("tiny-lora", "store_miss")] == 3
            assert misses(e.linker.store, "timeout", adapter="tiny-lora") == 1  # the store's own cause
            assert e.lora_request("s2", IDS)[:2] == (0, 0)  # the breaker skips the store: no second wait
        finally:
            server.resume()
        deadline = time.monotonic() + 10  # the breaker lets a probe through again, then it hits
        while e.lora_request(f"s3-{time.monotonic()}", IDS)[:2] != (T, T):
            assert time.monotonic() < deadline, "the store never served again after it resumed"
            time.sleep(0.2)
    finally:
        e.close()


def test_the_forward_runs_early_layers_while_later_ones_are_rebuilt(env, monkeypatch):
    """The rebuild thread completes the counter layer by layer: the forward's wait on layer 0
    returns while layer 1 is still held back (a gate in the decoder), and finish waits for all."""
    from sgl_scd.codec.fold import FoldedDecoder

    gate, reached = threading.Event(), threading.Event()
    real = FoldedDecoder.rebuild_layer

    def gated(self, layer, *args, **kwargs):
        if layer == 1:
            reached.set()
            assert gate.wait(10)
        return real(self, layer, *args, **kwargs)

    monkeypatch.setattr(FoldedDecoder, "rebuild_layer", gated)
    env.prefill_base(IDS[:T])
    req = Req("w1", LoRARef.deterministic_id("tiny-lora", LORAS["tiny-lora"]))
    key = RadixKey(array("q", IDS), extra_key=req.extra_key, limit=len(IDS) - 1)
    m = env.cache.match_prefix(MatchPrefixParams(key=key, req=req))
    req.last_node = m.last_device_node
    env.cache.init_load_back(InitLoadBackParams(best_match_node=m.best_match_node,
                                                host_hit_length=m.host_hit_length, req=req))
    index = env.cache.ready_to_load_host_cache()
    env.linker.layer_done_counter.set_consumer(index)
    env.kv.get_key_buffer(0)  # returns: layer 0 has landed
    assert reached.wait(10)
    assert not env.linker.layer_done_counter.futures[index][L - 1].done()  # later layers still pending
    gate.set()
    for layer in range(L):
        env.kv.get_key_buffer(layer)
    assert env.cache.finish_external_linker_loads([req]) == []


def test_the_capture_hook_on_a_patch_layer_feeds_the_producer(env):
    from sglang.srt.model_executor.forward_batch_info import ForwardMode
    from test_sglang_capture import _batch, _Model

    model = _Model(L)
    assert plugin.install_capture(env.linker, model) == [2]  # the encoder's patch layer
    states = _states(T)
    slots = env.alloc.alloc(T)
    fb = _batch(ForwardMode.EXTEND, slots.tolist(), [T])
    for layer in range(L):  # each layer's forward: its attention input, then its K/V written
        h = states.h.get(layer, torch.zeros(T, HID))
        model.model.layers[layer].self_attn(positions=torch.arange(T), hidden_states=h, forward_batch=fb)
        env.kv.set_kv_buffer(None, slots, states.k[layer], states.v[layer], layer_id_override=layer)
    env.cache.insert(InsertParams(key=RadixKey(array("q", IDS[:T])), value=slots))
    env.reap()
    assert env.linker.published_pages == 3
    enc = env.linker.encoder
    blobs = env.linker.store.fetch_prefix(get_hash_str(IDS[:T], None, page_size=PS), adapter="base")
    got, want = wire.decode_pages(enc.codec, blobs, enc.digest, PS), enc.codec.encode(states)
    assert all(torch.equal(got[s], want[s]) for s in want)


def test_stale_or_missing_patch_inputs_are_not_published(env):
    ids = IDS[:T]
    states = _states(T)
    slots = env.alloc.alloc(T)
    for layer in range(L):
        env.kv.set_kv_buffer(None, slots, states.k[layer], states.v[layer], layer_id_override=layer)
    env.linker.patch_inputs.record(2, slots[:PS], states.h[2][:PS])  # only page 0's inputs were captured
    env.cache.insert(InsertParams(key=RadixKey(array("q", ids)), value=slots))
    env.reap()
    assert env.linker.published_pages == 1 and env.linker.skipped_offloads["no_inputs"] == 1


def test_adapter_namespace_nodes_complete_at_once_unpublished(env):
    lora_id = LoRARef.deterministic_id("tiny-lora", LORAS["tiny-lora"])
    slots = env.alloc.alloc(T)
    env.cache.insert(InsertParams(key=RadixKey(array("q", IDS[:T]), extra_key=lora_id), value=slots))
    assert env.linker.num_completed_offloads() == 1  # immediate
    env.reap()
    assert env.linker.skipped_offloads["namespace"] == 1 and env.linker.published_pages == 0


def test_an_adapter_loaded_at_runtime_is_found_by_its_name(env):
    from sglang.srt.managers.io_struct import LoRAUpdateOutput

    env.prefill_base(IDS[:T])
    ref = LoRARef(lora_name="tiny-lora", lora_path="/peft/tiny-lora-v2")  # a uuid4 id, as /load_lora_adapter makes
    plugin.on_lora_loaded(LoRAUpdateOutput(success=True), None, ref)  # what the LoRAManager hook does
    req = Req("rt1", ref.lora_id)
    key = RadixKey(array("q", IDS), extra_key=req.extra_key, limit=T)
    assert env.cache.match_prefix(MatchPrefixParams(key=key, req=req)).host_hit_length == T
    plugin.on_lora_unloaded(LoRAUpdateOutput(success=True), None, lora_ref=ref)
    assert ref.lora_id not in env.linker.lora_names


@pytest.mark.parametrize("pool,match", [({"head_dim": 16}, r"\(layers, kv heads, head dim\) \(4, 2, 16\)"),
                                        ({"dtype": torch.float8_e4m3fn}, "quantized")])
def test_pools_the_codec_does_not_fit_are_refused_at_start(artifacts, tmp_path, pool, match):
    with pytest.raises(ValueError, match=match):
        Env(*artifacts, f"embedded://{tmp_path}/x.sqlite3", **pool)


def test_base_namespace_strips_the_lora_id_only():
    assert base_namespace("a" * 32, "a" * 32) is None
    assert base_namespace("user" + "a" * 32, "a" * 32) == "user"
    assert base_namespace(None, None) is None and base_namespace("", None) is None


# ---- contracts: what this relies on in sglang 0.5.23 ---------------------------------------------

ABC_METHODS = ["lookup", "load", "start_layer_wise_loading", "finish_layer_wise_loading", "cancel_queued_load",
               "offload", "num_completed_offloads", "pop_completed_offload", "reset", "close"]


def _params(fn):
    return [(p.name, p.kind) for p in inspect.signature(fn).parameters.values()]


@pytest.mark.parametrize("name", ABC_METHODS)
def test_every_abc_method_keeps_its_signature(name):
    assert name in UnifiedCacheLinker.__abstractmethods__
    assert _params(getattr(ScdLinker, name)) == _params(getattr(UnifiedCacheLinker, name))


def test_the_abc_is_complete_and_the_factory_calls_the_constructor_as_expected():
    assert set(UnifiedCacheLinker.__abstractmethods__) == set(ABC_METHODS)
    assert not inspect.isabstract(ScdLinker)
    src = inspect.getsource(create_unified_cache_linker)
    assert "linker_cls(\n            server_args,\n            params,\n            components=components," in src
    assert [n for n, _ in _params(ScdLinker.__init__)] == ["self", "server_args", "params", "components",
                                                           "extra_config", "forward_stream"]


def test_hook_targets_keep_their_signatures_and_hooks_are_applied():
    from sglang.srt.lora.lora_manager import LoRAManager
    from sglang.srt.mem_cache import registry
    from sglang.srt.model_executor.model_runner import ModelRunner

    assert [n for n, _ in _params(UnifiedCacheLinkerWrapper.match)] == ["self", "key", "req", "result"]
    assert [n for n, _ in _params(UnifiedCacheLinkerWrapper._offload_node)] == ["self", "node_id", "transfers"]
    assert [n for n, _ in _params(registry.create_unified_radix_cache)] == ["ctx", "cache_class"]
    for fn in (LoRAManager.load_lora_adapter, LoRAManager.unload_lora_adapter):
        assert [n for n, _ in _params(fn)] == ["self", "lora_ref"]
    assert "self.lora_manager.load_lora_adapter(lora_ref)" in inspect.getsource(ModelRunner.load_lora_adapter)
    assert plugin.missing_hooks() == []
    assert all(plugin.is_applied(t) for t in plugin.HOOKS)
    # the wrapper calls the hooked methods the way the hooks read them
    assert "self.linker.match(params.key, params.req, result)" in inspect.getsource(
        UnifiedRadixCache._finalize_match_result)
    assert "self._offload_node(node_id, transfers)" in inspect.getsource(UnifiedCacheLinkerWrapper.offload_nodes)


def test_the_entry_point_names_the_plugin():
    import tomllib

    data = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    ep = data["project"]["entry-points"]["sglang.srt.plugins"]["scd"]
    module, fn = ep.split(":")
    assert module == plugin.__name__ and getattr(plugin, fn) is plugin.register


def test_linker_settings_are_checked():
    s = LinkerSettings.from_dict({"encoder": "/e", "adapters": {"a": "/a"}, "disabled": ["a"]})
    assert s.disabled == ("a",) and LinkerSettings.from_dict(s.to_dict()) == s
    for bad, match in (({}, "encoder"), ({"encoder": "/e", "x": 1}, "unknown"),
                       ({"encoder": "/e", "disabled": ["b"]}, "not configured")):
        with pytest.raises(ValueError, match=match):
            LinkerSettings.from_dict(bad)


def test_sglang_ext_does_not_import_transformers_or_hf():
    import ast

    pkg = Path(plugin.__file__).parent
    for path in pkg.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            bad = [n for n in names if n.split(".")[0] in ("transformers", "peft") or n.startswith("sgl_scd.hf")]
            assert not bad, f"{path.name} imports {bad}"


def test_projections_shipped_in_the_adapter_dir_serve_without_the_model(artifacts, tmp_path):
    """calibrate writes the consumer's K/V projections (LoRA merged) beside the decoder: the linker
    folds from them when the engine hands over none."""
    import shutil

    root = tmp_path / "scd"
    shutil.copytree(artifacts[0], root)
    mf.save_projections(root / "tiny-lora", artifacts[1])
    e = Env(root, artifacts[1], f"embedded://{tmp_path}/s.sqlite3")
    try:
        e.linker._projections.clear()
        e.linker._decoders.clear()
        states, _ = e.prefill_base(IDS[:T])
        hit, loaded, slots, failed = e.lora_request("r1", IDS)
        assert (hit, loaded, failed) == (T, T, [])
        k_want, _ = e.linker.consumers["tiny-lora"].adapter.fold(artifacts[1]).rebuild(_codes(e.linker, states, 3))
        for layer in range(L):
            assert torch.allclose(e.kv.k_buffer[layer][slots], k_want[layer], rtol=1e-4,
                                  atol=1e-4 * k_want.abs().max())  # fp32 merged weights vs fp64 merge
    finally:
        e.close()


def test_prometheus_counters_follow_hits_misses_and_publications(env):
    from prometheus_client import REGISTRY

    def value(name, **labels):
        return REGISTRY.get_sample_value(name, labels) or 0.0

    before = {"pub": value("sgl_scd:linker_published_pages_total"),
              "hit": value("sgl_scd:linker_hit_tokens_total", adapter="tiny-lora"),
              "rebuilt": value("sgl_scd:linker_rebuilt_tokens_total", adapter="tiny-lora"),
              "miss": value("sgl_scd:linker_miss_pages_total", adapter="other", cause="no_adapter")}
    env.prefill_base(IDS[:T])
    assert env.lora_request("m1", IDS)[:2] == (T, T)
    env.lora_request("m2", IDS, name="other")  # no SCD artifacts
    assert value("sgl_scd:linker_published_pages_total") - before["pub"] == 3
    assert value("sgl_scd:linker_hit_tokens_total", adapter="tiny-lora") - before["hit"] == T
    assert value("sgl_scd:linker_rebuilt_tokens_total", adapter="tiny-lora") - before["rebuilt"] == T
    assert value("sgl_scd:linker_miss_pages_total", adapter="other", cause="no_adapter") - before["miss"] == 3
    assert value("sgl_scd:linker_published_bytes_total") > 0


@pytest.mark.redis
def test_publish_and_rebuild_through_a_test_owned_redis(artifacts, redis_servers):
    e = Env(*artifacts, redis_servers().url)
    try:
        e.prefill_base(IDS[:T])
        assert e.linker.published_pages == 3 and e.linker.store.url.startswith("redis://")
        stored = e.linker.store.page_hashes(IDS[:T])
        assert stored == get_hash_str(IDS[:T], None, page_size=PS)  # SGLang's own keys
        hit, loaded, _, failed = e.lora_request("x1", IDS)
        assert (hit, loaded, failed) == (T, T, [])
    finally:
        e.close()


def test_a_full_publish_queue_completes_nodes_unpublished_and_counts_them(artifacts, tmp_path):
    e = Env(*artifacts, f"embedded://{tmp_path}/s.sqlite3", publish_queue=1)
    try:
        gate = threading.Event()
        run = e.linker._run
        e.linker._run = lambda job: (gate.wait(10), run(job))  # the worker holds its first job
        for i in range(3):  # the first is taken, the second waits, the third finds the queue full
            _, slots = e.write_base(T)
            ids = list(range(1000 * (i + 1), 1000 * (i + 1) + T))
            e.cache.insert(InsertParams(key=RadixKey(array("q", ids)), value=slots))
            time.sleep(0.2)
        assert e.linker.skipped_offloads["queue_full"] == 1
        gate.set()
        e.reap()
        assert e.linker.published_pages == 6
    finally:
        e.close()


def test_a_fine_tunes_own_server_rebuilds_its_plain_requests_from_the_base_servers_pages(artifacts, tmp_path):
    """Two servers, one store: the base's publishes; the fine-tune's (consumer set, no LoRA) rebuilds."""
    url = f"embedded://{tmp_path}/s.sqlite3"
    producer = Env(*artifacts, url)
    try:
        states, _ = producer.prefill_base(IDS[:T])
    finally:
        producer.close()
    ft = Env(*artifacts, url, consumer="tiny-lora")
    try:
        assert ft.linker.publisher is None and ft.linker.patch_inputs is None
        req = Req("ft1", None)  # a plain request: no lora_id on the fine-tune's server
        key = RadixKey(array("q", IDS), limit=len(IDS) - 1)
        m = ft.cache.match_prefix(MatchPrefixParams(key=key, req=req))
        assert m.host_hit_length == T
        req.last_node = m.last_device_node
        loaded, _ = ft.cache.init_load_back(InitLoadBackParams(best_match_node=m.best_match_node,
                                                               host_hit_length=m.host_hit_length, req=req))
        slots = ft.cache.linker.private_load_indices.get("ft1")
        ft.linker.layer_done_counter.set_consumer(ft.cache.ready_to_load_host_cache())
        for layer in range(L):
            ft.kv.get_key_buffer(layer)
        assert loaded == T and ft.cache.finish_external_linker_loads([req]) == []
        k_want, _ = ft.linker.consumers["tiny-lora"].adapter.fold(artifacts[1]).rebuild(_codes(ft.linker, states, 3))
        assert torch.allclose(ft.kv.k_buffer[0][slots], k_want[0], rtol=1e-5, atol=1e-5 * k_want.abs().max())
        ft.cache.insert(InsertParams(key=RadixKey(array("q", IDS[:T])), value=slots))
        ft.reap()
        assert ft.linker.skipped_offloads["publish_off"] >= 1  # its own K/V are never published
    finally:
        ft.close()


def test_a_fine_tunes_server_settings_are_checked():
    with pytest.raises(ValueError, match="'nope'"):
        LinkerSettings.from_dict({"encoder": "e", "adapters": {"a": "d"}, "consumer": "nope"})
    with pytest.raises(ValueError, match="must not publish"):
        LinkerSettings.from_dict({"encoder": "e", "adapters": {"a": "d"}, "consumer": "a", "publish": True})
    assert not LinkerSettings.from_dict({"encoder": "e", "adapters": {"a": "d"}, "consumer": "a"}).publish
