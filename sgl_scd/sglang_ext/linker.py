"""ScdLinker: a dynamic UnifiedCacheLinker that shares the base model's prefix pages with its LoRA
adapters as SCD codes (sglang==0.5.23; one TP rank, an unquantized MHA pool in NHD layout, no
pipeline parallelism: anything else is refused at start).

Producer (offload): a node of the base namespace (no extra_key) is read from the device pool (K
after RoPE and V of every layer at its slots) and from the side buffer of the patch layers'
normalized inputs (capture.PatchInputs), encoded and published under SGLang's own page hashes of
that node (PoolTransfer.keys; the chain before it from the tree core). Encoding and publishing run
on one background thread (publish_worker, the default; the tree keeps the node locked until its
completion is reaped, so its slots stay put) or inline in offload(). Completions are reported in
offload order (num_completed_offloads counts the finished head of the FIFO): True when every page
it meant to publish is stored. Nodes of adapter namespaces or with a caller extra_key are not
published: True with an immediate completion. A cache_salt seeds SGLang's page hashes, so salted
base pages are published under their salted keys and only requests with that salt find them (all
salts share one store identity, cache_salt "").

Consumer (lookup): for a LoRA request, the request's token ids come from the match hook
(plugin.py: the wrapper's match(key, req, result) is hooked BEFORE), the base chain is recomputed
with SGLang's get_hash_str (lora_id stripped from extra_key, cache_salt kept), and the pages after
the device prefix are fetched, validated and decoded by reuse.Consumer, once per rid (memoized).
The promise is the longest leading run it holds decoded codes for. load() records the request's
slots; start_layer_wise_loading() hands the batch to a rebuild thread (its own CUDA stream on a GPU)
that rebuilds layer by layer with the adapter's FoldedDecoder, writes with set_kv_buffer and
completes the layer counter as each layer lands, so the forward (which waits per layer in the
pool's get_key_buffer) runs layer l while later layers are rebuilt; finish reports the counter.
Store operations are bounded by store_timeout_s: a lookup never holds the scheduler longer.
A store that is down, a corrupt page, an adapter without artifacts or consumer projections, or one
switched off: fewer pages promised and the cause counted (store counters and self.misses).

On the server of a full fine-tune (settings "consumer"), plain requests are that adapter's: they
are rebuilt from the base server's pages through the same store, and nothing is published.

lora_id -> adapter name: --lora-paths adapters from server_args (SGLang's deterministic ids);
adapters loaded at runtime through the plugin's LoRAManager hooks (register_lora / unregister_lora).
The consumer's K/V projections at the patch layers come from the adapter dir (projections.safetensors,
written by calibrate from the consumer it was calibrated on, LoRA merged) or set_projections();
reading them from the served model's weights and LoRA buffers is not implemented.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
import weakref
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path

import torch
from sglang.srt.lora.lora_registry import LoRARef
from sglang.srt.mem_cache.hicache_storage import PoolName, PoolTransfer
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
from sglang.srt.mem_cache.unified_cache.unified_cache_linker import (
    LayerWiseLoadCounter,
    UnifiedCacheLinker,
)
from sglang.srt.mem_cache.utils import get_hash_str, storage_namespace_seed

from sgl_scd.codec.codec import Slot
from sgl_scd.codec.fold import FoldedDecoder
from sgl_scd.codec.manifest import load_adapter, load_encoder
from sgl_scd.codec.states import ConsumerProjections, ProducerStates
from sgl_scd.reuse import Consumer, Publisher, store_identity
from sgl_scd.sglang_ext.capture import PatchInputs
from sgl_scd.sglang_ext.config import LinkerSettings
from sgl_scd.sglang_ext.metrics import LinkerMetrics
from sgl_scd.store import Timeouts, open_store

logger = logging.getLogger(__name__)

_MEMO = 1024  # requests whose match / lookup results are kept (oldest dropped first)
_LIVE: weakref.WeakSet = weakref.WeakSet()  # the linkers of this process (plugin hooks reach them)


def live_linkers() -> list[ScdLinker]:
    """The ScdLinkers constructed in this process and not yet garbage."""
    return list(_LIVE)


@dataclass
class _Request:
    """What the match hook saw of a request."""

    lora_id: str | None
    token_ids: list[int]
    extra_key: str | None
    cache_salt: str | None
    device_prefix_len: int


@dataclass
class _Hit:
    """A lookup's answer for one rid: decoded codes of pages first_page .. first_page + pages."""

    name: str | None
    first_page: int
    pages: int
    codes: dict[Slot, torch.Tensor] | None
    seen: tuple[int, int] = (0, 0)  # (device prefix, prompt length) it was computed for


@dataclass
class _Job:
    """One offload: the node's slots and the base chain's hashes through its pages (page first_page on)."""

    slots: torch.Tensor | None
    hashes: list[str]
    first_page: int
    events: list
    done: threading.Event = field(default_factory=threading.Event)
    ok: bool = True

    @classmethod
    def finished(cls, ok: bool) -> _Job:
        job = cls(None, [], 0, [], ok=ok)
        job.done.set()
        return job


@dataclass
class _Load:
    rid: str
    name: str
    slots: torch.Tensor
    decoder: FoldedDecoder
    codes: dict[Slot, torch.Tensor]
    start: int  # absolute position of the first slot's token


@dataclass
class _Batch:
    """Loads of one adapter side by side: their codes, slots and RoPE tables concatenated."""

    decoder: FoldedDecoder
    codes: dict[Slot, torch.Tensor]
    slots: torch.Tensor
    tables: tuple[torch.Tensor, torch.Tensor]

    @classmethod
    def of(cls, loads: list[_Load]) -> _Batch:
        dec = loads[0].decoder
        codes = {s: torch.cat([ld.codes[s] for ld in loads]).to(dec.device) for s in loads[0].codes}  # uint8
        positions = torch.cat([torch.arange(ld.start, ld.start + len(ld.slots)) for ld in loads])
        return cls(dec, codes, torch.cat([ld.slots for ld in loads]), dec.rope_tables(positions))


def lora_names(server_args) -> dict[str, str]:
    """lora_id -> adapter name of the adapters given with --lora-paths (LoRARef after ServerArgs
    resolution, or NAME=PATH / PATH strings / dicts, given SGLang's deterministic ids)."""
    out = {}
    for ref in getattr(server_args, "lora_paths", None) or []:
        if isinstance(ref, LoRARef):
            out[ref.lora_id] = ref.lora_name
        elif isinstance(ref, str):
            name, path = ref.split("=", 1) if "=" in ref else (ref, ref)
            out[LoRARef.deterministic_id(name, path)] = name
        elif isinstance(ref, dict) and "lora_name" in ref and "lora_path" in ref:
            out[LoRARef.deterministic_id(ref["lora_name"], ref["lora_path"])] = ref["lora_name"]
    return out


def base_namespace(extra_key: str | None, lora_id: str | None) -> str | None:
    """The extra_key of the base chain a LoRA request's prompt maps to: the lora_id suffix Req
    appended stripped, "" (no caller extra_key) as None."""
    if lora_id and extra_key and extra_key.endswith(lora_id):
        extra_key = extra_key[: -len(lora_id)]
    return extra_key or None


class ScdLinker(UnifiedCacheLinker):
    """See the module docstring. Constructed by SGLang's dynamic linker factory."""

    def __init__(self, server_args, params, *, components, extra_config, forward_stream=None):
        self.forward_stream = forward_stream
        self.settings = LinkerSettings.from_dict(extra_config or {})
        self.page_size = params.page_size
        kv = params.token_to_kv_pool_allocator.get_kvcache()
        if not isinstance(kv, MHATokenToKVPool):
            raise TypeError(f"ScdLinker needs an MHATokenToKVPool, got {type(kv).__name__}")
        if kv.start_layer != 0:
            raise ValueError("ScdLinker does not support pipeline parallelism (the pool starts at layer "
                             f"{kv.start_layer})")
        if getattr(kv, "kv_cache_layout", "nhd") != "nhd":
            raise ValueError(f"ScdLinker reads and writes the pool row per slot (NHD), not {kv.kv_cache_layout}")
        if getattr(kv, "is_quantized_kv_cache", False) or kv.store_dtype != kv.dtype:
            raise ValueError("ScdLinker does not support quantized (fp8 / fp4) KV caches yet")
        self.kvcache = kv
        self.pools = {PoolName.KV: kv}
        self.num_layers = kv.layer_num
        self.layer_done_counter = LayerWiseLoadCounter(self.num_layers)
        self.encoder = load_encoder(Path(self.settings.encoder))
        self._check_pool(self.encoder.manifest.producer, "producer")
        timeout = self.settings.store_timeout_s
        self.store = open_store(self.settings.store_url, store_identity(self.encoder),
                                timeouts=Timeouts(connect_s=timeout, op_s=timeout))
        on_gpu = torch.device(kv.device).type == "cuda"
        self.publisher = (Publisher(self.encoder, self.store, device=kv.device if on_gpu else None)
                          if self.settings.publish else None)
        self.consumers: dict[str, Consumer] = {}
        for name, path in self.settings.adapters.items():
            adapter = load_adapter(Path(path), self.encoder)
            self._check_pool(adapter.manifest.consumer, f"adapter {name}'s consumer")
            self.consumers[name] = Consumer(adapter, self.store, label=name,
                                            enabled=name not in self.settings.disabled,
                                            device=kv.device if on_gpu else None)
        self.lora_names = lora_names(server_args)
        hidden = self.encoder.manifest.producer.hidden_size
        self.patch_inputs = (PatchInputs(self.encoder.manifest.h_layers, kv.size + kv.page_size, hidden,
                                         kv.dtype, kv.device)
                             if self.publisher is not None and self.encoder.manifest.h_layers else None)
        self._projections: dict[str, ConsumerProjections] = {}
        self._decoders: dict[str, FoldedDecoder] = {}
        self._requests: OrderedDict[str, _Request] = OrderedDict()
        self._hits: OrderedDict[str, _Hit] = OrderedDict()
        self._queued: dict[str, _Load] = {}
        self._jobs: deque[_Job] = deque()  # every offload's job, oldest first, until its completion is popped
        self._lock = threading.Lock()
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._worker = None
        if self.publisher is not None and self.settings.publish_worker:
            self._worker = threading.Thread(target=self._work, name="scd-publish", daemon=True)
            self._worker.start()
        self._loads: queue.Queue[tuple | None] = queue.Queue()  # batches to rebuild
        self._stream = torch.cuda.Stream(kv.device) if on_gpu else None
        self._loader = threading.Thread(target=self._rebuild_work, name="scd-rebuild", daemon=True)
        self._loader.start()
        self._offload_node: tuple[object, int] | None = None  # (cache, node_id), set by the plugin hook
        self.metrics = LinkerMetrics.default()
        self.misses: Counter[tuple[str, str]] = Counter()  # (adapter, cause) -> pages
        self.published_pages = 0
        self.skipped_offloads: Counter[str] = Counter()  # reason -> nodes not published
        _LIVE.add(self)
        from sgl_scd.sglang_ext import plugin  # it imports this module

        self.hooks_missing = plugin.missing_hooks()
        if self.hooks_missing:
            logger.error("SCD: hooks not applied to %s (is the sgl_scd plugin installed and allowed by "
                         "SGLANG_PLUGINS?): no pages are published or rebuilt without them", self.hooks_missing)

    def _check_pool(self, ident, role: str) -> None:
        kv = self.kvcache
        got = (self.num_layers, kv.head_num, kv.head_dim)
        want = (ident.num_layers, ident.kv_heads, ident.head_dim)
        if got != want:
            raise ValueError(f"the KV pool has (layers, kv heads, head dim) {got} but the {role} was "
                             f"calibrated with {want}")
        if self.encoder.page_size != self.page_size:
            raise ValueError(f"the encoder's page size is {self.encoder.page_size} but SGLang runs with "
                             f"--page-size {self.page_size}")

    # ---- wiring (plugin hooks, the serving process) -------------------------------------------

    def note_match(self, key, req, device_prefix_len: int) -> None:
        """The match hook: remember a request's tokens and namespace for its lookup."""
        rid, lora_id = req.rid, getattr(req, "lora_id", None)
        if lora_id is None and self.settings.consumer is None:  # the base's requests are never rebuilt
            self._requests.pop(rid, None)
            return
        self._requests[rid] = _Request(lora_id, list(key.token_ids), key.extra_key, key.cache_salt,
                                       int(device_prefix_len))
        self._requests.move_to_end(rid)
        while len(self._requests) > _MEMO:
            self._requests.popitem(last=False)

    def note_offload_node(self, cache, node_id) -> None:
        """The offload hook: the tree node the next offload() call is for."""
        self._offload_node = (cache, node_id)

    def register_lora(self, lora_id: str, name: str) -> None:
        """Map a lora_id (e.g. of an adapter loaded at runtime, a uuid4) to its adapter name; the
        SCD artifacts are chosen by that name (linker_extra_config "adapters")."""
        self.lora_names[lora_id] = name

    def unregister_lora(self, lora_id: str) -> None:
        self.lora_names.pop(lora_id, None)

    def set_projections(self, name: str, proj: ConsumerProjections) -> None:
        """The consumer's RoPE base, KV shape and K/V projections at the patch layers of adapter name."""
        if name not in self.consumers:
            raise KeyError(f"adapter {name!r} is not configured (have {sorted(self.consumers)})")
        self._projections[name] = proj
        self._decoders.pop(name, None)

    def set_enabled(self, name: str, enabled: bool) -> None:
        """The kill switch of one adapter: off, its requests are counted misses (cause "disabled")."""
        self.consumers[name].enabled = bool(enabled)

    # ---- producer ------------------------------------------------------------------------------

    def offload(self, transfers: list[PoolTransfer], session_id: str | None = None) -> bool:
        node, self._offload_node = self._offload_node, None
        try:
            busy = self._worker is not None and self._queue.qsize() >= self.settings.publish_queue
            job = self._skip("queue_full") if busy else self._plan(node, transfers)
        except Exception:  # never into the scheduler: the node stays unstored and may be offered again
            logger.exception("SCD publish failed")
            job = _Job.finished(False)
        self._jobs.append(job)
        if not job.done.is_set():
            if self._worker is None:
                self._run(job)
            else:
                self._queue.put(job)
        return True

    def _skip(self, reason: str) -> _Job:
        with self._lock:
            self.skipped_offloads[reason] += 1
        return _Job.finished(True)

    def _plan(self, node, transfers: list[PoolTransfer]) -> _Job:
        """On the scheduler thread: what to publish of a node (the tree core is read here only)."""
        if self.publisher is None:
            return self._skip("publish_off")
        if node is None:
            return self._skip("no_node")  # the offload hook is missing: the namespace is unknown
        cache, node_id = node
        extra_key, _salt = cache.tree_core.prefetch_anchor_info(node_id)
        if extra_key is not None:
            return self._skip("namespace")  # adapters' and caller extra_keys' nodes are not published
        kv = next((t for t in transfers if t.name == PoolName.KV), None)
        if kv is None or not kv.keys or kv.device_indices is None \
                or len(kv.device_indices) != len(kv.keys) * self.page_size:
            return self._skip("no_pages")
        prior = list(cache.get_prefix_hash_values(node_id))
        return _Job(kv.device_indices, prior + list(kv.keys), len(prior), self.record_offload_ready())

    def _run(self, job: _Job) -> None:
        """Read the node's pages (locked by the tree until the completion is reaped), encode, publish."""
        try:
            job.ok = self._encode_publish(job)
        except Exception:
            logger.exception("SCD publish failed")
            job.ok = False
        finally:
            job.done.set()

    def _encode_publish(self, job: _Job) -> bool:
        for event in job.events:
            event.synchronize()
        slots, pages = job.slots, len(job.hashes) - job.first_page
        k = torch.stack([self.kvcache.k_buffer[layer][slots] for layer in range(self.num_layers)])
        v = torch.stack([self.kvcache.v_buffer[layer][slots] for layer in range(self.num_layers)])
        h = {}
        if self.patch_inputs is not None:
            h, valid = self.patch_inputs.read(slots)
            run = int(valid.view(pages, self.page_size).all(1).cpu().long().cumprod(0).sum())  # leading run
            if run < pages:
                with self._lock:
                    self.skipped_offloads["no_inputs"] += 1
            pages = run
            if pages == 0:
                return True
        n = pages * self.page_size
        # on a GPU the publisher encodes where the pool is; the CPU reference path takes fp32 copies
        take = (lambda x: x) if self.publisher.device_encoder is not None else (lambda x: x.float().cpu())
        states = ProducerStates(take(k[:, :n]), take(v[:, :n]), {layer: take(x[:n]) for layer, x in h.items()},
                                self.encoder.codec.theta, job.first_page * self.page_size)
        # ids are only used to hash when hashes are not given: SGLang's own hashes are.
        blobs = self.publisher.encode(states)
        stored = self.publisher.publish([], states, hashes=job.hashes[: job.first_page + pages], blobs=blobs)
        with self._lock:
            self.published_pages += stored
        self.metrics.published_pages.inc(stored)
        self.metrics.published_bytes.inc(sum(len(b) for b in blobs[:stored]))
        return stored == pages

    def _work(self) -> None:
        while (job := self._queue.get()) is not None:
            self._run(job)

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every offload so far has finished publishing; False if timeout passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for job in list(self._jobs):
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not job.done.wait(left):
                return False
        return True

    def num_completed_offloads(self) -> int:
        n = 0
        for job in self._jobs:  # completions pair with offloads in FIFO order: count the finished head
            if not job.done.is_set():
                break
            n += 1
        return n

    def pop_completed_offload(self) -> bool:
        return self._jobs.popleft().ok

    # ---- consumer ------------------------------------------------------------------------------

    def _miss(self, name: str | None, pages: int, cause: str, store: bool = True) -> None:
        label = name or "unknown"
        self.misses[(label, cause)] += pages
        self.metrics.misses.labels(label, cause).inc(pages)
        if store and pages:
            try:
                self.store.record_rejected(adapter=label, pages=pages, cause=cause)
            except ValueError:  # a label the store refuses: counted here only
                pass

    def _decoder(self, name: str) -> FoldedDecoder | None:
        if name not in self._decoders:
            proj = self._projections.get(name) or self.consumers[name].adapter.projections()
            if proj is None:
                return None
            dec = self.consumers[name].adapter.fold(proj)
            self._decoders[name] = dec.to(self.kvcache.device)
        return self._decoders[name]

    def lookup(self, rid: str, transfers: list[PoolTransfer]) -> list[int]:
        hit, req = self._hits.get(rid), self._requests.get(rid)
        seen = (req.device_prefix_len, len(req.token_ids)) if req is not None else (0, 0)
        if hit is None or hit.seen != seen:  # computed once per rid and prefix, then answered alike
            hit = self._lookup(rid, transfers)
            hit.seen = seen
            self._hits[rid] = hit
            while len(self._hits) > _MEMO:
                self._hits.popitem(last=False)
        return list(range(1, hit.pages + 1))

    def _lookup(self, rid: str, transfers: list[PoolTransfer]) -> _Hit:
        kv = next((t for t in transfers if t.name == PoolName.KV), None)
        tail = len(kv.keys) if kv is not None and kv.keys else 0
        req = self._requests.get(rid)
        if req is None or tail == 0 or (req.lora_id is None and self.settings.consumer is None):
            return _Hit(None, 0, 0, None)  # a base request, or one the match hook did not see
        # a fine-tune's own server: its plain requests are the consumer's
        name = self.settings.consumer if req.lora_id is None else self.lora_names.get(req.lora_id)
        first_page = req.device_prefix_len // self.page_size
        if name is None or name not in self.consumers:
            self._miss(name, tail, "no_adapter", store=name is not None)
            return _Hit(name, first_page, 0, None)
        if base_namespace(req.extra_key, req.lora_id) is not None:
            self._miss(name, tail, "store_miss")  # a caller extra_key: its base chain is not published
            return _Hit(name, first_page, 0, None)
        decoder = self._decoder(name)
        if decoder is None:
            self._miss(name, tail, "no_adapter")  # no consumer projections for its patch layers
            return _Hit(name, first_page, 0, None)
        ids = req.token_ids
        hashes = get_hash_str(ids, storage_namespace_seed(None, req.cache_salt), page_size=self.page_size)
        got = self.consumers[name].fetch(ids, first_page=first_page, hashes=hashes)
        pages = min(got.pages, tail)
        if pages < tail:  # the store's and the consumer's own counters have the cause too
            self._miss(name, tail - pages, got.cause or "store_miss", store=False)
        if got.codes is None or pages == 0:
            self.metrics.lookup_tokens.labels(name).inc(tail * self.page_size)
            return _Hit(name, first_page, 0, None)
        codes = {s: q[: pages * self.page_size] for s, q in got.codes.items()}
        self.metrics.lookup_tokens.labels(name).inc(tail * self.page_size)
        self.metrics.hit_tokens.labels(name).inc(pages * self.page_size)
        return _Hit(name, first_page, pages, codes)

    def load(self, rid: str, transfers: list[PoolTransfer]) -> bool:
        hit = self._hits.pop(rid, None)
        kv = next((t for t in transfers if t.name == PoolName.KV), None)
        if hit is None or hit.codes is None or kv is None or kv.device_indices is None:
            return False
        n = len(kv.device_indices)
        if n == 0 or n % self.page_size or n > hit.pages * self.page_size:
            return False
        decoder = self._decoders.get(hit.name)
        if decoder is None:
            return False
        slots = kv.device_indices
        if self.patch_inputs is not None:
            self.patch_inputs.invalidate(slots)
        codes = {s: q[:n] for s, q in hit.codes.items()}
        self._queued[rid] = _Load(rid, hit.name, slots, decoder, codes, hit.first_page * self.page_size)
        return True

    def start_layer_wise_loading(self) -> int:
        """Hand the queued loads to the rebuild thread; the forward waits per layer (the pool's
        get_key_buffer -> layer_done_counter.wait_until) while later layers are still rebuilt."""
        if not self._queued:
            return -1
        loads, self._queued = list(self._queued.values()), {}
        index = self.layer_done_counter.update_producer()
        ready = None
        if self._stream is not None:  # the slots' earlier users on this stream finish first
            ready = torch.cuda.Event()
            ready.record()
        self._loads.put((index, loads, ready))
        return index

    def _rebuild(self, index: int, loads: list[_Load], ready=None) -> None:
        """On the rebuild thread (its own CUDA stream on a GPU): every layer of one batch, layer by
        layer, the loads of one adapter concatenated into one pass per layer; a layer is completed
        only once its writes have landed."""
        t0 = time.perf_counter()
        try:
            with torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext():
                if ready is not None:
                    self._stream.wait_event(ready)
                groups = [_Batch.of([ld for ld in loads if ld.decoder is dec])
                          for dec in {id(ld.decoder): ld.decoder for ld in loads}.values()]
                for layer in range(self.num_layers):
                    for b in groups:
                        k, v = b.decoder.rebuild_layer(layer, b.codes, tables=b.tables)
                        self.kvcache.set_kv_buffer(None, b.slots, k, v, layer_id_override=layer)
                    if self._stream is not None:
                        self._stream.synchronize()
                    self.layer_done_counter.complete(index, layer)
        except Exception as exc:  # a device-side failure: finish() reports it, the batch is aborted
            logger.exception("SCD rebuild failed for %s", [ld.rid for ld in loads])
            self.layer_done_counter.fail(index, exc)
            return
        self.metrics.rebuild_seconds.observe(time.perf_counter() - t0)
        for ld in loads:
            self.metrics.rebuilt_tokens.labels(ld.name).inc(len(ld.slots))

    def _rebuild_work(self) -> None:
        while (task := self._loads.get()) is not None:
            try:
                self._rebuild(*task)
            finally:
                self._loads.task_done()

    def finish_layer_wise_loading(self, counter_index: int) -> bool:
        if counter_index < 0:
            return True
        return self.layer_done_counter.finish(counter_index)

    def cancel_queued_load(self, rid: str) -> bool:
        return self._queued.pop(rid, None) is not None

    # ---- lifecycle -----------------------------------------------------------------------------

    def reset(self) -> None:
        self.drain()  # quiesce: publications in flight finish first ...
        self._loads.join()  # ... and so do the rebuilds started
        self._requests.clear()
        self._hits.clear()
        self._queued.clear()
        self._jobs.clear()
        self._offload_node = None
        self.layer_done_counter.reset()

    def close(self) -> None:
        _LIVE.discard(self)
        self.reset()
        if self._worker is not None:
            self._queue.put(None)
            self._worker.join()
            self._worker = None
        self._loads.put(None)
        self._loader.join()
        self.store.close()
