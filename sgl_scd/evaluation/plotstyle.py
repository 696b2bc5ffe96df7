"""How a benchmark's methods look in its plots: one colour per method family, the setting by the point."""

from __future__ import annotations

COLORS = {"oracle": "k", "raw_kv": "tab:red", "raw_kv_rerot": "tab:pink", "kivi4": "tab:orange",
          "kivi4_rerot": "tab:orange", "droidspeak": "tab:purple", "scd_reuse": "tab:cyan", "scd": "tab:blue",
          "scd_tail": "navy", "scd_recompute": "navy", "scd_gate": "tab:green",
          "own_bf16kv": "0.55", "own_kivi4": "0.75"}  # the noise-floor references: greys
# method names that end in their setting: scd_gate0.2, scd_tail64, droidspeak_w8, scd_recompute2
VARIANT_FAMILIES = ("scd_gate", "scd_tail", "scd_recompute", "droidspeak")


def split_variant(method: str) -> tuple[str, str]:
    """("scd_gate", "0.2") for "scd_gate0.2", ("droidspeak", "w8") for "droidspeak_w8";
    (method, "") for a method without a setting."""
    for family in VARIANT_FAMILIES:
        if method.startswith(family) and method != family:
            return family, method.removeprefix(family).lstrip("_")
    return method, ""


def family(method: str) -> str:
    return split_variant(method)[0]


def method_color(method: str) -> str:
    return COLORS.get(family(method), "0.3")
