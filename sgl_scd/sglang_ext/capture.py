"""The producer's normalized attention inputs at the encoder's patch layers, per KV slot.

SGLang's KV pool holds K (after RoPE) and V of every layer, but not h, the input_layernorm output
a patch layer's code is made of. A forward pre-hook on each patch layer's attention module
(capture_hook; in models/llama.py `self_attn(positions=, hidden_states=, forward_batch=)` gets
the normalized input) writes h of every base-model extend token into a side buffer row per KV
slot (forward_batch.out_cache_loc), next to the K/V the same forward writes, and marks the slot
valid. Decode tokens and LoRA requests' tokens mark their slots invalid, and so does the linker
for slots it loads: offload publishes only pages whose every slot is valid at every patch layer.

The buffer is as large as the pool (one row per slot per patch layer, the pool's dtype); the
guard relies on the hook firing, so the producer runs with --disable-prefill-cuda-graph
(hooks do not fire during a CUDA-graph replay; the hook does nothing while a graph is captured).
"""

from __future__ import annotations

import torch


class PatchInputs:
    """Side buffer: per patch layer, h [num_slots, hidden] and a valid flag per slot."""

    def __init__(self, layers, num_slots: int, hidden: int, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu"):
        self.layers = sorted(layers)
        self.hidden = hidden
        self.h = {layer: torch.zeros(num_slots, hidden, dtype=dtype, device=device) for layer in self.layers}
        self.valid = {layer: torch.zeros(num_slots, dtype=torch.bool, device=device) for layer in self.layers}

    def record(self, layer: int, slots: torch.Tensor, h: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """Write h [T, hidden] of the tokens in slots [T]; keep [T] (bool): which tokens are base-model
        tokens (the others' slots become invalid). Layers the encoder does not patch are ignored."""
        if layer not in self.h:
            return
        slots = slots.to(self.h[layer].device, torch.int64)
        if keep is None:
            self.h[layer][slots] = h.to(self.h[layer].dtype)
            self.valid[layer][slots] = True
            return
        keep = keep.to(slots.device, torch.bool)
        self.h[layer][slots[keep]] = h[keep.to(h.device)].to(self.h[layer].dtype)
        self.valid[layer][slots] = keep

    def invalidate(self, slots: torch.Tensor) -> None:
        """Mark slots as holding no base-model input (a decode token, an adapter's or a load's KV)."""
        for layer in self.layers:
            self.valid[layer][slots.to(self.valid[layer].device, torch.int64)] = False

    def read(self, slots: torch.Tensor) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """({layer: h [T, hidden]}, valid [T]: True where every patch layer holds the slot's input)."""
        idx = [slots.to(self.h[layer].device, torch.int64) for layer in self.layers]
        h = {layer: self.h[layer][i] for layer, i in zip(self.layers, idx, strict=True)}
        ok = torch.ones(len(slots), dtype=torch.bool, device=slots.device)
        for layer, i in zip(self.layers, idx, strict=True):
            ok &= self.valid[layer][i].to(ok.device)
        return h, ok


def base_token_mask(forward_batch, num_tokens: int) -> torch.Tensor | None:
    """[T] bool, True for tokens of requests without a LoRA adapter (None: all of them are)."""
    lora_ids = getattr(forward_batch, "lora_ids", None)
    if not lora_ids or all(i is None for i in lora_ids):
        return None
    lens = getattr(forward_batch, "extend_seq_lens_cpu", None)
    if lens is None or len(lens) != len(lora_ids) or sum(lens) != num_tokens:
        return torch.zeros(num_tokens, dtype=torch.bool)  # cannot attribute tokens: record none
    per_req = torch.tensor([i is None for i in lora_ids], dtype=torch.bool)
    return per_req.repeat_interleave(torch.tensor(lens, dtype=torch.int64))


_PLAIN = (torch.float32, torch.bfloat16, torch.float16)


def capture_hook(buffer: PatchInputs, layer: int):
    """A forward pre-hook (register_forward_pre_hook(..., with_kwargs=True)) on one patch layer's
    attention module, called as module(positions=, hidden_states=, forward_batch=). In 0.5.23 that
    input is the layer boundary's prepare() output, the input_layernorm output "possibly quantized"
    (fused input quantization): anything but a plain [T, hidden] float tensor invalidates the slots."""

    def hook(module, args, kwargs):
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return
        h = kwargs.get("hidden_states", args[1] if len(args) > 1 else None)
        fb = kwargs.get("forward_batch", args[2] if len(args) > 2 else None)
        slots = getattr(fb, "out_cache_loc", None)
        if h is None or slots is None:
            return
        plain = isinstance(h, torch.Tensor) and h.dtype in _PLAIN and h.dim() == 2 and h.shape[1] == buffer.hidden
        if not plain or not fb.forward_mode.is_extend() or h.shape[0] != slots.shape[0]:
            buffer.invalidate(slots)
            return
        buffer.record(layer, slots, h, base_token_mask(fb, h.shape[0]))

    return hook
