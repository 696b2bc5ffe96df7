"""Publishing and fetching one encoder's codes through the shared prefix store.

Keys: the base chain (SGLang's page hash, seeded by cache_salt only) inside the namespace of the
encoder's StoreIdentity, so every adapter calibrated against that encoder reads the same pages.
A store problem (down, slow, full, flushed, corrupt or mismatched pages) is never raised: the
consumer gets fewer pages and the cause is counted. Only caller bugs raise, at construction
(an identity or label the store refuses) or for malformed arguments.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from sgl_scd.codec import wire
from sgl_scd.codec.codec import Slot
from sgl_scd.codec.device import DeviceEncoder, PageLayout
from sgl_scd.codec.manifest import Adapter, Encoder
from sgl_scd.codec.states import ProducerStates
from sgl_scd.reuse.policy import usable_pages
from sgl_scd.store import StoreIdentity
from sgl_scd.store.client import PrefixStore
from sgl_scd.store.keys import check_adapter

logger = logging.getLogger(__name__)


def store_identity(encoder: Encoder, cache_salt: str = "", dtype: str = "float32") -> StoreIdentity:
    """The reuse scope of an encoder's codes: producer, tokenizer, page size, encoder revision."""
    m = encoder.manifest
    spec = m.producer.spec if "/" not in m.producer.spec else "custom"  # a checkpoint dir: its revision says it all
    return StoreIdentity(producer_model=spec, producer_revision=m.producer.revision,
                         tokenizer=m.tokenizer_digest, page_size=m.page_size, codec_revision=m.revision,
                         dtype=dtype, sharding="tp1", cache_salt=cache_salt)


def _check_store(encoder: Encoder, store: PrefixStore) -> None:
    want = store_identity(encoder, store.identity.cache_salt, store.identity.dtype)
    if store.identity != want:
        raise ValueError(f"the store's identity (codec revision {store.identity.codec_revision[:12]}, page size "
                         f"{store.identity.page_size}) is not the encoder's ({encoder.revision[:12]}, "
                         f"{encoder.page_size})")


class Publisher:
    """The producer side: encode full pages of a prompt's states and publish them."""

    def __init__(self, encoder: Encoder, store: PrefixStore, label: str = "base",
                 device: torch.device | str | None = None):
        """device: encode and pack on it (codec.device; only the packed pages come to the host),
        for states that live there (a GPU's KV pool); default the CPU reference path."""
        _check_store(encoder, store)
        self.encoder, self.store, self.label = encoder, store, check_adapter(label)
        self.page_size = encoder.page_size
        self.device_encoder = self.layout = None
        if device is not None:
            self.device_encoder = DeviceEncoder(encoder.codec, device)
            self.layout = PageLayout(encoder.codec.widths_array(), self.page_size, device)

    def encode(self, states: ProducerStates) -> list[bytes]:
        """Page blobs of the full pages of states (which must start on a page boundary)."""
        if states.start % self.page_size:
            raise ValueError(f"states start at position {states.start}, not on a {self.page_size}-token page boundary")
        full = states.num_tokens // self.page_size * self.page_size
        if full == 0:
            return []
        states = states.slice(0, full) if full < states.num_tokens else states
        first = states.start // self.page_size
        if self.device_encoder is not None:
            packed = self.layout.pack(self.device_encoder.encode(states)).cpu().numpy()  # [pages, bytes]
            return wire.frame_pages(packed, self.encoder.digest, self.page_size, first)
        codes = self.encoder.codec.encode(states)
        return wire.encode_pages(self.encoder.codec, codes, self.encoder.digest, self.page_size, first_page=first)

    def publish(self, ids: list[int], states: ProducerStates, hashes: list[str] | None = None,
                blobs: list[bytes] | None = None) -> int:
        """Publish the full pages covered by states (tokens states.start.. of ids), encoded here
        unless `blobs` (self.encode(states)) are given; pages stored."""
        blobs = self.encode(states) if blobs is None else blobs
        if not blobs:
            return 0
        first = states.start // self.page_size
        hashes = (hashes if hashes is not None else self.store.page_hashes(ids))[first : first + len(blobs)]
        if len(hashes) != len(blobs):
            raise ValueError(f"states cover pages {first}..{first + len(blobs) - 1} but ids have {len(hashes) + first}")
        return self.store.publish(hashes, blobs, adapter="base", first_page=first)


@dataclass
class Fetched:
    """What a consumer can rebuild for one request: the codes of pages [first_page, first_page + pages)."""

    first_page: int
    pages: int
    usable: int  # pages the rules allowed (before the store and the wire had their say)
    codes: dict[Slot, torch.Tensor] | None
    payload_bytes: int = 0
    cause: str | None = None  # why pages < what the prompt allowed (reuse.policy.MISS_CAUSES)


class Consumer:
    """One adapter's side of a published code set: promise, fetch, validate, decode."""

    def __init__(self, adapter: Adapter, store: PrefixStore, *, label: str | None = None, enabled: bool = True,
                 device: torch.device | str | None = None):
        """device: where fetched codes are unpacked (codec.device.PageLayout; default the CPU's
        numpy path), e.g. the GPU that rebuilds from them."""
        _check_store(adapter.encoder, store)
        self.adapter, self.store = adapter, store
        self.label = check_adapter(label or adapter.name)
        self.enabled = enabled
        self.page_size = adapter.encoder.page_size
        self.max_tokens = adapter.manifest.max_tokens
        enc = adapter.encoder
        self.layout = PageLayout(enc.codec.widths_array(), self.page_size, device) if device is not None else None

    def usable(self, num_tokens: int, first_page: int = 0) -> tuple[int, str | None]:
        """Pages after first_page this request may reuse, and "beyond_calibration" when the bound cut them."""
        return usable_pages(num_tokens, self.page_size, self.max_tokens, first_page)

    def fetch(self, ids: list[int], first_page: int = 0, hashes: list[str] | None = None) -> Fetched:
        """The longest valid leading run of pages after first_page, decoded to integer codes.
        Never raises for a store reason; every page not reused is counted by cause."""
        allowed, _ = usable_pages(len(ids), self.page_size, None, first_page)
        if not self.enabled:  # the kill switch: counted like any other miss
            self.store.record_rejected(adapter=self.label, pages=allowed, cause="disabled")
            return Fetched(first_page, 0, 0, None, cause="disabled")
        usable, cause = self.usable(len(ids), first_page)
        if cause:
            self.store.record_rejected(adapter=self.label, pages=allowed - usable, cause=cause)
        if usable == 0:
            return Fetched(first_page, 0, 0, None, cause=cause)
        hashes = (hashes if hashes is not None else self.store.page_hashes(ids))[first_page : first_page + usable]
        blobs = self.store.fetch_prefix(hashes, adapter=self.label, first_page=first_page)
        if len(blobs) < usable:
            cause = "store_miss"
        enc = self.adapter.encoder
        n, err = wire.valid_prefix(enc.codec, blobs, enc.digest, self.page_size, first_page)
        if err is not None:
            logger.warning("adapter %s: page %d refused (%s); reusing the %d pages before it",
                           self.label, first_page + n, err, n)
            self.store.record_rejected(adapter=self.label, pages=len(blobs) - n, cause="wire")
            cause = "wire"
        codes = wire.decode_pages(enc.codec, blobs[:n], enc.digest, self.page_size, first_page,
                                  self.layout) if n else None
        return Fetched(first_page, n, usable, codes, sum(len(b) for b in blobs[:n]), cause)

    def record_gate(self, pages: int, cause: str = "low_margin") -> None:
        """Count pages the gate kept from reuse: a rebuilt cache it dropped (low_margin) or a
        request its ledger prefilled at once (gate_skip)."""
        self.store.record_rejected(adapter=self.label, pages=pages, cause=cause)
