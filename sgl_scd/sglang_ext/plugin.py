"""The "sglang.srt.plugins" entry point (pyproject.toml: scd = "sgl_scd.sglang_ext.plugin:register")
and the hooks ScdLinker needs. Every hook returns at once unless the cache's linker is an
ScdLinker, so the plugin changes nothing in a server that does not configure it.

  match       BEFORE UnifiedCacheLinkerWrapper.match(key, req, result): the request's token ids,
              namespace and device prefix, for the linker's lookup (which only gets hashes)
  offload     BEFORE UnifiedCacheLinkerWrapper._offload_node(node_id, transfers): the tree node the
              next offload() is for (its namespace and the page hashes before it)
  cache       AFTER registry.create_unified_radix_cache(ctx): installs the capture hooks on the
              patch layers' attention modules of ctx.tp_worker.model_runner.model
  lora        AFTER LoRAManager.load_lora_adapter / unload_lora_adapter(lora_ref): maps the lora_id of
              an adapter loaded at runtime (a uuid4) to its name in every live ScdLinker

HookRegistry.apply_hooks() logs and swallows failures: missing_hooks() says which are not applied,
and ScdLinker logs it at start.
"""

from __future__ import annotations

import logging
import pkgutil

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from sgl_scd.sglang_ext.capture import capture_hook
from sgl_scd.sglang_ext.linker import ScdLinker, live_linkers

logger = logging.getLogger(__name__)

_WRAPPER = "sglang.srt.mem_cache.unified_cache.unified_cache_linker.UnifiedCacheLinkerWrapper"
MATCH_TARGET = f"{_WRAPPER}.match"
OFFLOAD_TARGET = f"{_WRAPPER}._offload_node"
CACHE_TARGET = "sglang.srt.mem_cache.registry.create_unified_radix_cache"
LORA_LOAD_TARGET = "sglang.srt.lora.lora_manager.LoRAManager.load_lora_adapter"
LORA_UNLOAD_TARGET = "sglang.srt.lora.lora_manager.LoRAManager.unload_lora_adapter"


def on_match(wrapper, key, req, result):
    linker = getattr(wrapper, "cache_linker", None)
    if isinstance(linker, ScdLinker):
        linker.note_match(key, req, result.device_prefix_len)


def on_offload_node(wrapper, node_id, transfers):
    linker = getattr(wrapper, "cache_linker", None)
    if isinstance(linker, ScdLinker):
        linker.note_offload_node(wrapper.cache, node_id)


def on_cache_built(cache, ctx, *args, **kwargs):
    wrapper = getattr(cache, "linker", None)
    linker = getattr(wrapper, "cache_linker", None)
    if isinstance(linker, ScdLinker) and linker.patch_inputs is not None:
        model = getattr(getattr(getattr(ctx, "tp_worker", None), "model_runner", None), "model", None)
        installed = install_capture(linker, model)
        if installed != linker.patch_inputs.layers:
            logger.error("SCD: captured patch layers %s of %s: pages will not be published",
                         installed, linker.patch_inputs.layers)


def _lora_ref(args, kwargs):
    return args[0] if args else kwargs.get("lora_ref")


def on_lora_loaded(result, manager, *args, **kwargs):
    ref = _lora_ref(args, kwargs)
    if getattr(result, "success", False) and ref is not None and ref.lora_name:
        for linker in live_linkers():
            linker.register_lora(ref.lora_id, ref.lora_name)


def on_lora_unloaded(result, manager, *args, **kwargs):
    ref = _lora_ref(args, kwargs)
    if getattr(result, "success", False) and ref is not None:
        for linker in live_linkers():
            linker.unregister_lora(ref.lora_id)


def attention_modules(model) -> dict[int, object]:
    """layer -> its attention module, for models laid out as model.model.layers[i].self_attn
    (SGLang's Llama family) or model.layers[i].self_attn."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        return {}
    return {i: layer.self_attn for i, layer in enumerate(layers) if hasattr(layer, "self_attn")}


def install_capture(linker: ScdLinker, model) -> list[int]:
    """Register the capture pre-hook on each patch layer's attention module; the layers hooked."""
    if model is None or linker.patch_inputs is None:
        return []
    attn = attention_modules(model)
    done = []
    for layer in linker.patch_inputs.layers:
        if layer in attn:
            attn[layer].register_forward_pre_hook(capture_hook(linker.patch_inputs, layer), with_kwargs=True)
            done.append(layer)
    return done


HOOKS = {MATCH_TARGET: (on_match, HookType.BEFORE), OFFLOAD_TARGET: (on_offload_node, HookType.BEFORE),
         CACHE_TARGET: (on_cache_built, HookType.AFTER), LORA_LOAD_TARGET: (on_lora_loaded, HookType.AFTER),
         LORA_UNLOAD_TARGET: (on_lora_unloaded, HookType.AFTER)}


def register() -> None:
    """The entry point: register the hooks (once per process); load_plugins() applies them."""
    for target, (fn, kind) in HOOKS.items():
        if not any(h is fn for _, h, _ in HookRegistry._hooks.get(target, ())):
            HookRegistry.register(target, fn, kind)


def _chain(fn):
    seen = set()
    while fn is not None and id(fn) not in seen:
        seen.add(id(fn))
        yield fn
        fn = getattr(fn, "__wrapped__", None)


def is_applied(target: str) -> bool:
    """Whether target, as it resolves now, runs our hook (HookRegistry wraps it in a closure)."""
    fn, _ = HOOKS[target]
    obj_path, attr = target.rsplit(".", 1)
    current = getattr(pkgutil.resolve_name(obj_path), attr, None)
    for f in _chain(current):
        for cell in getattr(f, "__closure__", None) or ():
            try:
                if cell.cell_contents is fn:
                    return True
            except ValueError:  # an empty cell
                continue
    return False


def missing_hooks() -> list[str]:
    """The hook targets our hooks are not applied to."""
    return [t for t in HOOKS if not is_applied(t)]
