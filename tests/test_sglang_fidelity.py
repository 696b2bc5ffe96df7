"""Fidelity through SGLang's structures with the real SmolLM2: the base's K/V and patch inputs (from
its real forward) are written into a real MHATokenToKVPool as SGLang's forward would, inserted into
a real UnifiedRadixCache and offloaded (ScdLinker publishes); a LoRA request for ci-lora on the
same prompt matches, loads layer by layer into its slots, and those slots, read back and continued
in the reference runtime, are compared with the HF engine path (reuse.Consumer + hf.scd.folded on
the same published codes) and with ci-lora's own prefill."""

from __future__ import annotations

import os
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
from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache
from sglang.srt.plugins.hook_registry import HookRegistry
from sglang.srt.server_args import ServerArgs, set_global_server_args_for_scheduler
from test_sglang_linker import Req

from sgl_scd.demo import data
from sgl_scd.evaluation import quality
from sgl_scd.hf import models, runtime
from sgl_scd.hf.scd import folded
from sgl_scd.reuse import Consumer, store_identity
from sgl_scd.sglang_ext import plugin
from sgl_scd.sglang_ext.config import LINKER_CLASS, LINKER_MODULE
from sgl_scd.store import open_store

pytestmark = pytest.mark.model
N_PROMPTS = 50  # the bar for the SGLang-structures vs HF-engine comparison


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    p, q = torch.log_softmax(p_logits.double(), -1), torch.log_softmax(q_logits.double(), -1)
    return float((p.exp() * (p - q)).sum())


@pytest.fixture(scope="module")
def setup(tmp_path_factory, base, ci_lora, lora_adapter):
    plugin.register()
    if plugin.missing_hooks():  # not yet applied in this process
        HookRegistry.apply_hooks()
    c = base.model.config
    ps = lora_adapter.encoder.page_size
    lora_path = str(models.resolve("ci-lora"))
    server_args = ServerArgs(model_path="dummy", page_size=ps, lora_paths=[f"ci-lora={lora_path}"])
    set_global_server_args_for_scheduler(server_args)
    size = 16384  # every prompt's base and adapter pages stay in the pool (~0.75 GB of fp32 K/V)
    kv = MHATokenToKVPool(size=size, page_size=ps, dtype=torch.float32, head_num=c.num_key_value_heads,
                          head_dim=c.head_dim, layer_num=c.num_hidden_layers, device="cpu", enable_memory_saver=False)
    alloc = PagedTokenToKVPoolAllocator(size=size, page_size=ps, dtype=torch.float32, device="cpu", kvcache=kv,
                                        need_sort=False)
    r2t = ReqToTokenPool(size=8, max_context_len=2048, device="cpu", enable_memory_saver=False)
    params = CacheInitParams(disable=False, req_to_token_pool=r2t, token_to_kv_pool_allocator=alloc, page_size=ps,
                             tree_components=(ComponentType.FULL,))
    cache = UnifiedRadixCache(params)
    url = f"embedded://{tmp_path_factory.mktemp('fidelity')}/s.sqlite3"
    config = {"linker": LINKER_CLASS, "linker_module_path": LINKER_MODULE,
              "linker_extra_config": {"encoder": str(lora_adapter.encoder.path),
                                      "adapters": {"ci-lora": str(lora_adapter.path)}, "store_url": url}}
    linker = create_unified_cache_linker(server_args, params, backend="dynamic", config=config,
                                         components=set(cache.components), forward_stream=None)
    cache.init_cache_linker(linker)
    kv.register_layer_transfer_counter(linker.layer_done_counter)
    yield cache, kv, alloc, linker, LoRARef.deterministic_id("ci-lora", lora_path), url
    cache.release_host_resources()


def _through_sglang(setup, base, ids: list[int], rid: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The base prefill written as SGLang's forward would, offloaded; then the LoRA request's load."""
    cache, kv, alloc, linker, lora_id, _ = setup
    ps = kv.page_size
    n = len(ids) // ps * ps
    cap = runtime.capture_prefill(base.model, ids[:n], hidden=True)
    slots = alloc.alloc(n)
    for layer in range(kv.layer_num):
        kv.set_kv_buffer(None, slots, cap.k[layer], cap.v[layer], layer_id_override=layer)
    for layer in linker.encoder.manifest.h_layers:
        linker.patch_inputs.record(layer, slots, cap.h_in[layer])
    cache.insert(InsertParams(key=RadixKey(array("q", ids[:n])), value=slots))
    assert linker.drain(60)
    cache.check_hicache_events()
    req = Req(rid, lora_id)
    key = RadixKey(array("q", ids), extra_key=req.extra_key, limit=len(ids) - 1)
    m = cache.match_prefix(MatchPrefixParams(key=key, req=req))
    req.last_node = m.last_device_node
    loaded, _ = cache.init_load_back(InitLoadBackParams(best_match_node=m.best_match_node,
                                                        host_hit_length=m.host_hit_length, req=req))
    got = cache.linker.private_load_indices.get(rid)
    linker.layer_done_counter.set_consumer(cache.ready_to_load_host_cache())
    for layer in range(kv.layer_num):
        kv.get_key_buffer(layer)
    assert cache.finish_external_linker_loads([req]) == []
    assert loaded == (0 if got is None else len(got))
    if got is None or len(got) == 0:
        return None
    k = torch.stack([kv.k_buffer[layer][got] for layer in range(kv.layer_num)])
    v = torch.stack([kv.v_buffer[layer][got] for layer in range(kv.layer_num)])
    return k, v


def test_sglang_structures_match_the_hf_engine_path(setup, base, ci_lora, lora_adapter):
    linker, url = setup[3], setup[5]
    store = open_store(url, store_identity(lora_adapter.encoder), stats_flush_s=0)
    hf = Consumer(lora_adapter, store, label="ci-lora-hf")
    tok = base.tokenizer
    same_paths = same_sg = same_hf = 0
    kl_paths, kl_sg, kl_hf = [], [], []
    items = data.load_tomi("test")[:N_PROMPTS]
    for i, it in enumerate(items):
        ids = data.prompt_ids(tok, it)
        sg = _through_sglang(setup, base, ids, f"r{i}")
        fetched = hf.fetch(ids)
        assert sg is not None and fetched.pages > 0
        k_hf, v_hf = folded(lora_adapter, ci_lora.model).rebuild(fetched.codes)
        assert sg[0].shape == k_hf.shape  # the same pages reused both ways
        a = runtime.continue_from_kv(ci_lora.model, tok, ids, *sg, max_new_tokens=6)
        b = runtime.continue_from_kv(ci_lora.model, tok, ids, k_hf, v_hf, max_new_tokens=6)
        own = runtime.continue_from_kv(ci_lora.model, tok, ids, max_new_tokens=6)
        norm = quality.normalize_answer
        same_paths += norm(a.text) == norm(b.text)
        same_sg += norm(a.text) == norm(own.text)
        same_hf += norm(b.text) == norm(own.text)
        kl_paths.append(_kl(b.first_logits, a.first_logits))
        kl_sg.append(_kl(own.first_logits, a.first_logits))
        kl_hf.append(_kl(own.first_logits, b.first_logits))
    n = len(items)
    print(f"\nSGLang path vs HF path on {n} ToMi test prompts: same answer {same_paths / n:.3f}, "
          f"mean KL {sum(kl_paths) / n:.2e}; vs ci-lora's own prefill: SGLang same {same_sg / n:.3f} "
          f"KL {sum(kl_sg) / n:.4f}, HF same {same_hf / n:.3f} KL {sum(kl_hf) / n:.4f}")
    # Both paths rebuild from the same codes with the same folded decoder; they differ only in the
    # consumer projections' source (the adapter dir's fp32 merged weights vs the model's) and the
    # pool round trip, so answers agree and the first-token distributions are equal to float noise.
    assert same_paths == n
    assert max(kl_paths) < 1e-6
    assert abs(sum(kl_sg) - sum(kl_hf)) / n < 1e-6
    assert not any(cause in ("wire", "no_adapter") for _, cause in linker.misses)
    store.close()
