"""The `python -m sglang.launch_server` command line that serves a base model and its LoRA
adapters with ScdLinker (SGLang 0.5.23 flags; tests parse it with SGLang's own parser)."""

from __future__ import annotations

import json
from pathlib import Path

from sgl_scd.codec.manifest import ADAPTER_FILE, load_encoder
from sgl_scd.sglang_ext.config import LinkerSettings

# Set here, or not allowed next to the external linker (SGLang refuses the combination).
_OWNED = ("--model-path", "--page-size", "--enable-lora", "--lora-paths", "--enable-unified-cache-external-linker",
          "--unified-cache-external-linker-backend", "--unified-cache-external-linker-config")
_EXCLUSIVE = ("--disable-radix-cache", "--radix-cache-backend", "--enable-hierarchical-cache",
              "--hicache-storage-backend", "--enable-lmcache")


def calibrated_adapters(encoder_dir: str | Path) -> dict[str, str]:
    """Adapter name (manifest.json "name") -> dir, of the adapters beside the encoder calibrated against it."""
    enc = load_encoder(Path(encoder_dir))
    return {json.loads((p / ADAPTER_FILE).read_text())["name"]: str(p) for p in enc.adapters()}


def sglang_command(model_path: str, encoder_dir: str | Path, lora_paths: dict[str, str], *,
                   adapters: dict[str, str] | None = None, store_url: str | None = None,
                   disabled: tuple[str, ...] = (), publish: bool = True, host: str | None = None,
                   port: int | None = None, extra_args: list[str] | tuple[str, ...] = (),
                   python: str = "python", consumer: str | None = None) -> list[str]:
    """argv serving model_path with every LoRA of lora_paths (name -> PEFT dir, --lora-paths NAME=PATH);
    the ones with SCD artifacts (adapters: name -> SCD adapter dir, by default calibrated_adapters of
    the encoder) reuse the base's pages. The page size is the encoder's; the prefill CUDA graph is
    disabled when the producer captures patch-layer inputs. extra_args pass through, except the
    flags set here and those SGLang refuses next to an external linker (ValueError). With consumer
    (an adapter name), model_path is that full fine-tune: its server rebuilds its plain requests
    from the base server's pages and publishes nothing."""
    for arg in extra_args:
        flag = arg.split("=", 1)[0]
        if flag in _OWNED:
            raise ValueError(f"{flag} is set by sglang_command; pass it as an argument instead")
        if flag in _EXCLUSIVE:
            raise ValueError(f"{flag} cannot be combined with the external cache linker")
    enc = load_encoder(Path(encoder_dir))
    scd = calibrated_adapters(encoder_dir) if adapters is None else dict(adapters)
    if consumer is not None:
        if consumer not in scd or lora_paths:
            raise ValueError(f"a fine-tune's server serves its adapter {consumer!r} (one of {sorted(scd)}) and no LoRA")
        publish, served = False, {consumer: str(Path(scd[consumer]))}
    else:
        served = {name: str(Path(path)) for name, path in scd.items() if name in lora_paths}
    settings = LinkerSettings(str(Path(encoder_dir)), served, store_url,
                              disabled=tuple(d for d in disabled if d in served), publish=publish, consumer=consumer)
    LinkerSettings.from_dict(settings.to_dict())  # the linker will parse it the same way
    cmd = [python, "-m", "sglang.launch_server", "--model-path", model_path, "--page-size", str(enc.page_size),
           "--enable-unified-cache-external-linker", "--unified-cache-external-linker-backend", "dynamic",
           "--unified-cache-external-linker-config", settings.linker_config_json()]
    if lora_paths:
        cmd += ["--enable-lora", "--lora-paths", *(f"{name}={path}" for name, path in lora_paths.items())]
    if publish and enc.manifest.h_layers:
        cmd.append("--disable-prefill-cuda-graph")  # capture hooks do not fire in graph replays
    if host is not None:
        cmd += ["--host", host]
    if port is not None:
        cmd += ["--port", str(port)]
    return cmd + list(extra_args)
