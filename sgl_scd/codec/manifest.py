"""The per-adapter artifact: adapters/<name>/{manifest.json, encoder.safetensors, decoder.safetensors}.

The manifest identifies the producer, the consumer, the tokenizer, the codec (version, revision
digest of the encoder, ranks, bits, patch layers), dtypes, the calibration data digest and the
held-out quality measured at calibration. Loading an adapter against models that do not match
it raises ManifestMismatch naming the field and both values.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sgl_scd import models, rope
from sgl_scd.codec.codec import ConsumerDecoder, ProducerEncoder, Slot, context_inputs
from sgl_scd.codec.fold import FoldedDecoder
from sgl_scd.models import LoadedModel
from sgl_scd.paths import ADAPTERS_DIR

CODEC_VERSION = 1
FORMAT = "sgl_scd.adapter/1"


class ManifestMismatch(ValueError):
    """The adapter was calibrated for different models, tokenizer or codec version."""


def tokenizer_digest(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()


def model_identity(m: LoadedModel) -> dict:
    c = m.config
    return {"spec": m.spec, "revision": m.revision, "rope_theta": rope.rope_theta(c),
            "num_layers": c.num_hidden_layers, "kv_heads": c.num_key_value_heads, "head_dim": c.head_dim,
            "hidden_size": c.hidden_size}


def encoder_revision(encoder: ProducerEncoder) -> str:
    """Digest of everything the producer side uses: the codec revision that keys the store."""
    h = hashlib.sha256(f"scd-codec-v{CODEC_VERSION}".encode())
    for name, t in sorted(encoder.state_dict().items()):
        h.update(name.encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass
class Adapter:
    """A loaded SCD adapter: the producer encoder, this consumer's decoder and the manifest."""

    name: str
    manifest: dict
    encoder: ProducerEncoder
    decoder: ConsumerDecoder

    _folded: tuple | None = field(default=None, repr=False)  # (consumer model, FoldedDecoder)

    @property
    def codec_digest(self) -> bytes:
        return bytes.fromhex(self.manifest["codec"]["revision"])[:16]

    def rebuild(self, consumer_model, codes: dict[Slot, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Serving path: the consumer's K/V [L, T, H, D] from integer codes, through the decoder
        folded with this consumer's projections (built once per consumer model)."""
        if self._folded is None or self._folded[0] is not consumer_model:
            self._folded = (consumer_model, FoldedDecoder(self.decoder, self.encoder, consumer_model))
        return self._folded[1].rebuild(codes)


def save_adapter(out: Path, manifest: dict, encoder: ProducerEncoder, decoder: ConsumerDecoder) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_file(encoder.state_dict(), out / "encoder.safetensors")
    save_file({k: v.contiguous() for k, v in decoder.state_dict().items()}, out / "decoder.safetensors")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def _check(field: str, expected, actual) -> None:
    if expected != actual:
        raise ManifestMismatch(f"adapter manifest {field} is {expected!r} but the model has {actual!r}")


def load_adapter(path: Path, producer: LoadedModel | None = None, consumer: LoadedModel | None = None) -> Adapter:
    """Load adapters/<name>; when models are given, refuse (ManifestMismatch) any identity mismatch."""
    path = Path(path)
    mpath = path / "manifest.json"
    if not mpath.exists():
        raise FileNotFoundError(f"{mpath} not found; calibrate it with `python -m sgl_scd.calibrate`")
    manifest = json.loads(mpath.read_text())
    _check("format", manifest.get("format"), FORMAT)
    _check("codec.version", manifest["codec"]["version"], CODEC_VERSION)
    for role, model in (("producer", producer), ("consumer", consumer)):
        if model is None:
            continue
        ident = model_identity(model)
        for key in ("revision", "rope_theta", "num_layers", "kv_heads", "head_dim", "hidden_size"):
            _check(f"{role}.{key}", manifest[role][key], ident[key])
        _check("tokenizer.digest", manifest["tokenizer"]["digest"], tokenizer_digest(model.tokenizer))
    enc_sd = load_file(path / "encoder.safetensors")
    encoder = ProducerEncoder.from_state_dict(enc_sd, manifest["producer"]["rope_theta"])
    _check("codec.revision", manifest["codec"]["revision"], encoder_revision(encoder))
    c = manifest["consumer"]
    decoder = build_decoder(encoder, manifest["codec"]["decoder_hidden"], c,
                            manifest["codec"].get("decoder_context", "own"))
    decoder.load_state_dict(load_file(path / "decoder.safetensors"))
    decoder.eval().requires_grad_(False)
    return Adapter(path.name, manifest, encoder, decoder)


def adapter_dir(consumer_spec: str, path: str | Path | None = None) -> Path:
    """path if given, else where calibrate writes a consumer's adapter by default (adapters/<name>)."""
    return Path(path) if path else ADAPTERS_DIR / Path(consumer_spec).name


def load_with_models(consumer_spec: str, path: str | Path | None = None, producer_spec: str = "base"
                     ) -> tuple[LoadedModel, LoadedModel, Adapter]:
    """(producer, consumer, adapter) as analysis scripts need them, the adapter checked against both."""
    producer, consumer = models.load(producer_spec), models.load(consumer_spec)
    return producer, consumer, load_adapter(adapter_dir(consumer_spec, path), producer, consumer)


def build_decoder(encoder: ProducerEncoder, hidden: dict[str, int], consumer_ident: dict,
                  context: str = "own") -> ConsumerDecoder:
    """The decoder for an encoder's slots; context: which codes each translator reads (context_inputs)."""
    kv_dim = consumer_ident["kv_heads"] * consumer_ident["head_dim"]
    dims = {s: (e.rank, consumer_ident["hidden_size"] if s.kind == "h" else kv_dim)
            for s, e in encoder.slots.items()}
    return ConsumerDecoder(dims, hidden, consumer_ident["rope_theta"], consumer_ident["kv_heads"],
                           consumer_ident["head_dim"], context_inputs(encoder.slots, context))


def slot_summary(encoder: ProducerEncoder) -> dict:
    return {s.name: {"rank": e.rank, "bits": e.bits_per_token} for s, e in encoder.slots.items()}


__all__ = ["Adapter", "ManifestMismatch", "Slot", "load_adapter", "save_adapter", "torch"]
