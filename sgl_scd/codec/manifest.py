"""The two calibrated artifacts, typed and validated where they are read.

  encoder dir   encoder.json + encoder.safetensors: the producer side of one published code set
                (per-slot PCA bases and bit plans: K/V at reuse layers, h at the encoder's patch
                layers). Its revision (a digest of every tensor) keys the store and is written
                into every page; it depends on the producer only.
  adapter dir   manifest.json + decoder.safetensors: one consumer's decoders, calibrated against
                one encoder revision (named in the manifest; another encoder is refused).

Adding a consumer to a published code set is one calibration against the encoder dir; nothing
is republished. Identities of the models are checked by the caller (check_models) from plain
ModelIdentity values, so this module knows no model library.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from safetensors.torch import load_file, save_file

from sgl_scd.codec.codec import ConsumerDecoder, ProducerEncoder, context_inputs, parse_context
from sgl_scd.codec.fold import FoldedDecoder
from sgl_scd.codec.states import ConsumerProjections, KVProjection

CODEC_VERSION = 2
ENCODER_FORMAT = "sgl_scd.encoder/1"
ADAPTER_FORMAT = "sgl_scd.adapter/2"
ENCODER_FILE, ADAPTER_FILE = "encoder.json", "manifest.json"
PROJECTIONS_FILE = "projections.safetensors"  # the consumer's K/V projections at the patch layers


class ManifestMismatch(ValueError):
    """An artifact used with models, tokenizer or an encoder it was not calibrated for."""


class ManifestError(ValueError):
    """A manifest file that is malformed (a missing, unknown or ill-typed field)."""


def _from_dict(cls, d: dict, where: str):
    """cls(**d) with every field checked: unknown or missing keys and wrong basic types are refused."""
    if not isinstance(d, dict):
        raise ManifestError(f"{where}: expected an object, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ManifestError(f"{where}: unknown fields {unknown}")
    kwargs = {}
    for name, f in fields.items():
        if name not in d:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ManifestError(f"{where}: missing field {name!r}")
            continue
        value, kind = d[name], f.type if isinstance(f.type, str) else f.type.__name__
        if kind == "ModelIdentity":
            value = _from_dict(ModelIdentity, value, f"{where}.{name}")
        elif kind in ("int", "str") and not isinstance(value, int if kind == "int" else str):
            raise ManifestError(f"{where}.{name}: expected {kind}, got {value!r}")
        elif kind == "float" and not isinstance(value, (int, float)):
            raise ManifestError(f"{where}.{name}: expected a number, got {value!r}")
        kwargs[name] = value
    return cls(**kwargs)


def _read_json(path: Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; build it with `python -m sgl_scd.calibrate`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: not valid JSON ({e})") from None


@dataclass(frozen=True)
class ModelIdentity:
    spec: str
    revision: str  # sha256 of the weights that define the model
    rope_theta: float
    num_layers: int
    kv_heads: int
    head_dim: int
    hidden_size: int

    def check(self, role: str, actual: ModelIdentity) -> None:
        """ManifestMismatch naming the first field where the model differs from the calibrated one."""
        for key in ("revision", "rope_theta", "num_layers", "kv_heads", "head_dim", "hidden_size"):
            want, got = getattr(self, key), getattr(actual, key)
            if want != got:
                raise ManifestMismatch(f"calibrated {role}.{key} is {want!r} but the model has {got!r}")


def tokenizer_digest(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()


@dataclass(frozen=True)
class EncoderManifest:
    name: str
    producer: ModelIdentity
    tokenizer_digest: str
    revision: str  # encoder_revision(): keys the store, 16 bytes of it head every wire page
    page_size: int
    h_layers: list  # patch layers: h codes instead of K/V codes
    bits_per_token: int
    payload_bytes_per_token: float
    raw_kv_bytes_per_token: int
    payload_ratio: float
    recipe: dict = field(default_factory=dict)  # bits per dim, metric, how the h layers were chosen
    slots: dict = field(default_factory=dict)  # {slot name: {rank, bits}}
    calibration: dict = field(default_factory=dict)  # data digest, sizes, wall time
    format: str = ENCODER_FORMAT
    codec_version: int = CODEC_VERSION

    def __post_init__(self):
        if self.format != ENCODER_FORMAT or self.codec_version != CODEC_VERSION:
            raise ManifestMismatch(f"encoder format {self.format} v{self.codec_version}; this build reads "
                                   f"{ENCODER_FORMAT} v{CODEC_VERSION}")
        if self.page_size <= 0:
            raise ManifestError(f"encoder page_size must be > 0, got {self.page_size}")


@dataclass(frozen=True)
class AdapterManifest:
    name: str
    consumer: ModelIdentity
    encoder: str  # the encoder's directory name (beside this adapter's)
    encoder_revision: str
    decoder_context: str
    decoder_hidden: dict  # residual MLP width by slot kind
    max_tokens: int  # the longest calibration prompt: positions beyond it are not trusted
    min_margin: float = 0.0  # the serving gate's default threshold (0: off)
    calibration: dict = field(default_factory=dict)
    heldout: dict = field(default_factory=dict)
    format: str = ADAPTER_FORMAT

    def __post_init__(self):
        if self.format != ADAPTER_FORMAT:
            raise ManifestMismatch(f"adapter format {self.format}; this build reads {ADAPTER_FORMAT}")
        parse_context(self.decoder_context)
        if self.max_tokens <= 0:
            raise ManifestError(f"adapter max_tokens must be > 0, got {self.max_tokens}")
        if not 0.0 <= self.min_margin <= 1.0:
            raise ManifestError(f"adapter min_margin is a probability gap in [0, 1], got {self.min_margin}")


def encoder_revision(encoder: ProducerEncoder) -> str:
    """Digest of everything the producer side uses: the codec revision that keys the store."""
    h = hashlib.sha256(f"scd-codec-v{CODEC_VERSION}".encode())
    h.update(repr(float(encoder.theta)).encode())
    for name, t in sorted(encoder.state_dict().items()):
        h.update(name.encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass
class Encoder:
    """A loaded encoder artifact: what a producer publishes with, and what every decoder reads."""

    path: Path
    manifest: EncoderManifest
    codec: ProducerEncoder

    @property
    def revision(self) -> str:
        return self.manifest.revision

    @property
    def digest(self) -> bytes:
        """The 16 bytes of the revision that head every wire page."""
        return bytes.fromhex(self.manifest.revision)[:16]

    @property
    def page_size(self) -> int:
        return self.manifest.page_size

    def adapters(self) -> list[Path]:
        """Adapter dirs beside this encoder that were calibrated against this revision."""
        out = []
        for m in sorted(self.path.parent.glob(f"*/{ADAPTER_FILE}")):
            try:
                if json.loads(m.read_text()).get("encoder_revision") == self.revision:
                    out.append(m.parent)
            except (OSError, json.JSONDecodeError):
                continue
        return out


@dataclass
class Adapter:
    """A loaded consumer adapter: its decoder and the encoder it was calibrated against."""

    path: Path
    manifest: AdapterManifest
    encoder: Encoder
    decoder: ConsumerDecoder

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def patch_layers(self) -> list[int]:
        return self.encoder.manifest.h_layers

    def fold(self, proj: ConsumerProjections) -> FoldedDecoder:
        """The serving form of the decoder for these consumer projections (CPU fp32; .to() moves it)."""
        return FoldedDecoder(self.decoder, self.encoder.codec, proj)

    def projections(self) -> ConsumerProjections | None:
        """The consumer's K/V projections at the patch layers as calibrated (LoRA merged), for engines
        that do not hand over the consumer's modules; None when the adapter dir has none."""
        if not (self.path / PROJECTIONS_FILE).exists():
            return None
        proj = load_projections(self.path)
        missing = sorted(set(self.patch_layers) - set(proj.layers))
        if missing or proj.theta != self.manifest.consumer.rope_theta:
            raise ManifestError(f"{self.path / PROJECTIONS_FILE}: layers {sorted(proj.layers)} / RoPE base "
                                f"{proj.theta} do not cover the patch layers {self.patch_layers} / "
                                f"{self.manifest.consumer.rope_theta}")
        return proj

    def check_models(self, producer: ModelIdentity | None = None, consumer: ModelIdentity | None = None,
                     tokenizer: str | None = None) -> None:
        """ManifestMismatch naming the field where a model or tokenizer is not the calibrated one."""
        if producer is not None:
            self.encoder.manifest.producer.check("producer", producer)
        if consumer is not None:
            self.manifest.consumer.check("consumer", consumer)
        if tokenizer is not None and tokenizer != self.encoder.manifest.tokenizer_digest:
            raise ManifestMismatch(f"calibrated tokenizer digest {self.encoder.manifest.tokenizer_digest[:12]} "
                                   f"but the model's is {tokenizer[:12]}")


def save_encoder(out: Path, manifest: EncoderManifest, encoder: ProducerEncoder) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_file(encoder.state_dict(), out / "encoder.safetensors")
    (out / ENCODER_FILE).write_text(json.dumps(dataclasses.asdict(manifest), indent=2) + "\n")


def save_adapter(out: Path, manifest: AdapterManifest, decoder: ConsumerDecoder) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in decoder.state_dict().items()}, out / "decoder.safetensors")
    save_adapter_manifest(out, manifest)


def save_adapter_manifest(out: Path, manifest: AdapterManifest) -> None:
    """(Re)write an adapter dir's manifest alone, e.g. a gate threshold chosen on dev later."""
    (out / ADAPTER_FILE).write_text(json.dumps(dataclasses.asdict(manifest), indent=2) + "\n")


def save_projections(out: Path, proj: ConsumerProjections) -> None:
    """A consumer's K/V projections (fp32, LoRA deltas merged) beside its adapter."""
    tensors = {}
    for layer, p in proj.layers.items():
        w, b = p.merged()
        tensors[f"kv_weight.{layer}"], tensors[f"kv_bias.{layer}"] = w.float().contiguous(), b.float().contiguous()
    meta = {"theta": repr(float(proj.theta)), "kv_heads": str(proj.kv_heads), "head_dim": str(proj.head_dim)}
    save_file(tensors, Path(out) / PROJECTIONS_FILE, metadata=meta)


def load_projections(path: Path) -> ConsumerProjections:
    from safetensors import safe_open

    file = Path(path) / PROJECTIONS_FILE
    with safe_open(str(file), "pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    try:
        theta, kv_heads, head_dim = float(meta["theta"]), int(meta["kv_heads"]), int(meta["head_dim"])
    except (KeyError, ValueError) as e:
        raise ManifestError(f"{file}: metadata theta / kv_heads / head_dim missing or bad ({e})") from None
    layers = {}
    for name, w in tensors.items():
        if name.startswith("kv_weight."):
            layer = int(name.split(".", 1)[1])
            b, kv = tensors[f"kv_bias.{layer}"], w.shape[0] // 2
            layers[layer] = KVProjection(w[:kv], w[kv:], b[:kv], b[kv:])
    return ConsumerProjections(theta, kv_heads, head_dim, layers)


def load_encoder(path: Path) -> Encoder:
    path = Path(path)
    manifest = _from_dict(EncoderManifest, _read_json(path / ENCODER_FILE), str(path / ENCODER_FILE))
    codec = ProducerEncoder.from_state_dict(load_file(path / "encoder.safetensors"), manifest.producer.rope_theta)
    actual = encoder_revision(codec)
    if actual != manifest.revision:
        raise ManifestMismatch(f"{path}: encoder.safetensors has revision {actual[:12]} but encoder.json "
                               f"names {manifest.revision[:12]}")
    if codec.patch_layers != sorted(manifest.h_layers):
        raise ManifestError(f"{path}: h layers {codec.patch_layers} in the tensors, {manifest.h_layers} in the manifest")
    return Encoder(path, manifest, codec)


def load_adapter(path: Path, encoder: Encoder | None = None) -> Adapter:
    """Load an adapter dir with its encoder (by default the one the manifest names, beside it);
    ManifestMismatch naming both revisions when the encoder is not the one it was calibrated against."""
    path = Path(path)
    manifest = _from_dict(AdapterManifest, _read_json(path / ADAPTER_FILE), str(path / ADAPTER_FILE))
    if encoder is None:
        encoder = load_encoder(path.parent / manifest.encoder)
    if encoder.revision != manifest.encoder_revision:
        raise ManifestMismatch(f"adapter {manifest.name} was calibrated against encoder revision "
                               f"{manifest.encoder_revision[:12]}, not {encoder.revision[:12]} ({encoder.path})")
    decoder = build_decoder(encoder.codec, manifest.decoder_hidden, manifest.consumer, manifest.decoder_context)
    decoder.load_state_dict(load_file(path / "decoder.safetensors"))
    decoder.eval().requires_grad_(False)
    return Adapter(path, manifest, encoder, decoder)


def build_decoder(encoder: ProducerEncoder, hidden: dict[str, int], consumer: ModelIdentity,
                  context: str = "own") -> ConsumerDecoder:
    """The decoder for an encoder's slots; context: which codes each translator reads (context_inputs)."""
    kv_dim = consumer.kv_heads * consumer.head_dim
    dims = {s: (e.rank, consumer.hidden_size if s.kind == "h" else kv_dim) for s, e in encoder.slots.items()}
    return ConsumerDecoder(dims, hidden, consumer.rope_theta, consumer.kv_heads, consumer.head_dim,
                           context_inputs(encoder.slots, context))


def slot_summary(encoder: ProducerEncoder) -> dict:
    return {s.name: {"rank": e.rank, "bits": e.bits_per_token} for s, e in encoder.slots.items()}


def raw_kv_bytes_per_token(ident: ModelIdentity) -> int:
    """bf16 K + V of every layer for one token: what raw KV reuse would ship."""
    return 2 * ident.num_layers * ident.kv_heads * ident.head_dim * 2


def as_dict(obj) -> dict:
    return dataclasses.asdict(obj)
