"""The patch-input capture: a forward pre-hook on each patch layer's attention module writes the
normalized input of base-model extend tokens per KV slot (a real SGLang ForwardBatch drives it);
decode tokens and LoRA requests' tokens leave their slots invalid."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("sglang")

from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode

from sgl_scd.sglang_ext.capture import PatchInputs, capture_hook
from sgl_scd.sglang_ext.plugin import attention_modules

HID = 6


class _Attn(nn.Module):  # called the way SGLang's LlamaDecoderLayer calls self_attn
    def forward(self, positions, hidden_states, forward_batch):
        return hidden_states


class _Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = _Attn()


class _Model(nn.Module):  # SGLang's layout: model.model.layers[i].self_attn
    def __init__(self, n):
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([_Layer() for _ in range(n)])


def _batch(mode, slots, lens, lora_ids=None) -> ForwardBatch:
    n = len(slots)
    return ForwardBatch(forward_mode=mode, batch_size=len(lens), input_ids=torch.zeros(n, dtype=torch.int64),
                        req_pool_indices=torch.arange(len(lens)), seq_lens=torch.tensor(lens),
                        out_cache_loc=torch.tensor(slots), seq_lens_sum=sum(lens), lora_ids=lora_ids,
                        extend_seq_lens_cpu=list(lens))


def _run(model, layer, fb, h):
    model.model.layers[layer].self_attn(positions=torch.arange(len(h)), hidden_states=h, forward_batch=fb)


def test_extend_tokens_of_base_requests_are_recorded_and_others_invalidated():
    buf = PatchInputs([1], num_slots=32, hidden=HID)
    model = _Model(3)
    attn = attention_modules(model)
    assert sorted(attn) == [0, 1, 2]
    attn[1].register_forward_pre_hook(capture_hook(buf, 1), with_kwargs=True)
    h = torch.randn(5, HID)
    _run(model, 1, _batch(ForwardMode.EXTEND, [4, 5, 6, 8, 9], [3, 2], [None, "a" * 32]), h)
    got, ok = buf.read(torch.tensor([4, 5, 6, 8, 9]))
    assert ok.tolist() == [True, True, True, False, False]  # the LoRA request's tokens are not base inputs
    assert torch.equal(got[1][:3], h[:3])
    _run(model, 1, _batch(ForwardMode.DECODE, [5], [4]), torch.randn(1, HID))  # a decode token reuses slot 5
    assert buf.read(torch.tensor([4, 5]))[1].tolist() == [True, False]
    _run(model, 0, _batch(ForwardMode.EXTEND, [4], [1]), torch.randn(1, HID))  # no hook on layer 0
    assert buf.read(torch.tensor([4]))[1].tolist() == [True]
    quantized = torch.randn(1, HID).to(torch.float8_e4m3fn)  # a fused-quant read's input is not h
    _run(model, 1, _batch(ForwardMode.EXTEND, [4], [1]), quantized)
    assert buf.read(torch.tensor([4]))[1].tolist() == [False]


def test_only_patch_layers_are_kept_and_every_layer_must_be_valid():
    buf = PatchInputs([1, 2], num_slots=8, hidden=HID)
    slots = torch.tensor([0, 1])
    buf.record(0, slots, torch.randn(2, HID))  # not a patch layer: ignored
    buf.record(1, slots, torch.randn(2, HID))
    assert buf.read(slots)[1].tolist() == [False, False]  # layer 2 has not been written
    buf.record(2, slots, torch.randn(2, HID))
    assert buf.read(slots)[1].tolist() == [True, True]
    buf.invalidate(slots[:1])
    assert buf.read(slots)[1].tolist() == [False, True]
