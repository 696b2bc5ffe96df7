"""The linker's settings: what goes under "linker_extra_config" of
--unified-cache-external-linker-config (JSON), parsed with the errors named."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

LINKER_CLASS = "ScdLinker"
LINKER_MODULE = "sgl_scd.sglang_ext.linker"
_KEYS = {"encoder", "adapters", "store_url", "store_timeout_s", "disabled", "publish", "publish_worker",
         "publish_queue", "consumer"}


@dataclass(frozen=True)
class LinkerSettings:
    """encoder: the encoder artifact dir; adapters: LoRA name (as in --lora-paths) -> SCD adapter dir;
    store_url: the prefix store (None: $SCD_STORE_URL, else embedded); store_timeout_s: the longest one
    store operation may take (a lookup runs on the scheduler thread; slower is a counted miss, and
    the store's breaker then skips it until it answers again); disabled: adapters whose
    reuse starts switched off; publish: whether base pages are published (the producer side);
    publish_worker: encode and publish on a background thread (else inside offload()); publish_queue:
    offloads waiting for it, beyond which a node is completed unpublished and counted (queue_full);
    consumer: set on the server of a full fine-tune (its own model, no LoRA): the adapter (a key of
    adapters) whose decoders rebuild this server's plain requests from the base server's pages; such
    a server never publishes (its K/V are not the base's)."""

    encoder: str
    adapters: dict[str, str] = field(default_factory=dict)
    store_url: str | None = None
    store_timeout_s: float = 0.25
    disabled: tuple[str, ...] = ()
    publish: bool = True
    publish_worker: bool = True
    publish_queue: int = 64
    consumer: str | None = None

    @classmethod
    def from_dict(cls, value: dict) -> LinkerSettings:
        if not isinstance(value, dict):
            raise TypeError(f"linker_extra_config must be a JSON object, got {type(value).__name__}")
        unknown = sorted(set(value) - _KEYS)
        if unknown:
            raise ValueError(f"linker_extra_config: unknown keys {unknown}; expected some of {sorted(_KEYS)}")
        if not isinstance(value.get("encoder"), str) or not value["encoder"]:
            raise ValueError("linker_extra_config: 'encoder' (the encoder artifact dir) is required")
        adapters = value.get("adapters", {})
        if not isinstance(adapters, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                     for k, v in adapters.items()):
            raise ValueError("linker_extra_config: 'adapters' maps LoRA names to SCD adapter dirs (strings)")
        disabled = value.get("disabled", [])
        if not isinstance(disabled, list) or not all(isinstance(d, str) for d in disabled):
            raise ValueError("linker_extra_config: 'disabled' is a list of adapter names")
        unknown_off = sorted(set(disabled) - set(adapters))
        if unknown_off:
            raise ValueError(f"linker_extra_config: 'disabled' names adapters not configured: {unknown_off}")
        store_url = value.get("store_url")
        if store_url is not None and not isinstance(store_url, str):
            raise ValueError("linker_extra_config: 'store_url' is a URL string")
        timeout = value.get("store_timeout_s", 0.25)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError(f"linker_extra_config: 'store_timeout_s' is seconds > 0, got {timeout!r}")
        publish, worker = value.get("publish", True), value.get("publish_worker", True)
        if not isinstance(publish, bool) or not isinstance(worker, bool):
            raise TypeError("linker_extra_config: 'publish' and 'publish_worker' are true or false")
        queue = value.get("publish_queue", 64)
        if isinstance(queue, bool) or not isinstance(queue, int) or queue < 1:
            raise ValueError(f"linker_extra_config: 'publish_queue' is an int >= 1, got {queue!r}")
        consumer = value.get("consumer")
        if consumer is not None and consumer not in adapters:
            raise ValueError(f"linker_extra_config: 'consumer' {consumer!r} is not one of the adapters {sorted(adapters)}")
        if consumer is not None and value.get("publish", False):
            raise ValueError("linker_extra_config: a fine-tune's server ('consumer' set) must not publish: "
                             "its K/V are not the base's")
        return cls(value["encoder"], dict(adapters), store_url, float(timeout), tuple(disabled),
                   publish if consumer is None else False, worker, queue, consumer)

    def to_dict(self) -> dict:
        out = {"encoder": str(Path(self.encoder)), "adapters": dict(self.adapters), "publish": self.publish,
               "publish_worker": self.publish_worker, "publish_queue": self.publish_queue,
               "store_timeout_s": self.store_timeout_s}
        if self.store_url is not None:
            out["store_url"] = self.store_url
        if self.disabled:
            out["disabled"] = list(self.disabled)
        if self.consumer is not None:
            out["consumer"] = self.consumer
        return out

    def linker_config_json(self) -> str:
        """The value of --unified-cache-external-linker-config for this linker."""
        return json.dumps({"linker": LINKER_CLASS, "linker_module_path": LINKER_MODULE,
                           "linker_extra_config": self.to_dict()}, sort_keys=True)
