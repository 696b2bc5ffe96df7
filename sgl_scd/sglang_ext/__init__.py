"""SCD inside SGLang 0.5.23: an external cache linker that publishes the base model's pages as
SCD codes and rebuilds them for LoRA requests, plus the plugin hooks it needs.

  config.py   the linker's settings (the JSON under linker_extra_config), parsed and checked
  capture.py  a side buffer of the patch layers' normalized inputs per KV slot, and its forward hook
  linker.py   ScdLinker, a dynamic UnifiedCacheLinker (producer: offload; consumer: lookup / load)
  plugin.py   the hooks (HookRegistry) and the "sglang.srt.plugins" entry point
  command.py  the `python -m sglang.launch_server` command line for a base and its adapters

Pinned to sglang==0.5.23: tests/test_sglang_linker.py checks every signature this relies on.
"""
