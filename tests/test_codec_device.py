"""The device-resident codec path (codec/device.py) against the numpy / CPU reference, bit for bit,
and the batched rebuild (several requests' runs in one pass) against one rebuild per request."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_codec_core import PS, _setup, _states

from sgl_scd.codec import quant, wire
from sgl_scd.codec.device import DeviceEncoder, PageLayout
from sgl_scd.codec.fold import FoldedDecoder
from sgl_scd.codec.states import ProducerStates

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("widths", [[8, 8, 1], [3, 3, 3, 2, 2, 1, 1, 1, 0, 0], [7, 5, 5, 4, 4, 4, 6, 1], [2]],
                         ids=["bytes", "mixed+zero", "odd", "one"])
@pytest.mark.parametrize("tokens", [16, 5])
def test_unpack_and_pack_equal_the_numpy_reference(widths, tokens, device):
    widths = np.array(widths, np.int64)
    rng = np.random.default_rng(0)
    pages = 3
    q = (rng.integers(0, 256, (pages * tokens, len(widths))) % (1 << widths)).astype(np.uint8)
    blobs = [quant.pack_bits(q[i * tokens : (i + 1) * tokens], widths) for i in range(pages)]
    layout = PageLayout(widths, tokens, device)
    assert layout.page_bytes == len(blobs[0])
    buf = torch.frombuffer(bytearray(b"".join(blobs)), dtype=torch.uint8).view(pages, -1)
    assert np.array_equal(layout.unpack(buf.to(device)).cpu().numpy(), quant.unpack_pages(blobs, tokens, widths))
    assert torch.equal(layout.pack(torch.from_numpy(q).to(device)).cpu(), buf)  # padding bits zero, as pack_bits leaves them


def test_a_layout_refuses_payloads_of_another_shape():
    layout = PageLayout(np.array([4, 4]), 16)
    with pytest.raises(ValueError, match=r"uint8 \[pages, 16\]"):
        layout.unpack(torch.zeros(2, 15, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"uint8 \[pages \* 16, 2\]"):
        layout.pack(torch.zeros(15, 2, dtype=torch.uint8))


@pytest.mark.parametrize("device", DEVICES)
def test_device_encode_equals_the_reference_encoder_and_the_wire(device):
    enc, _, _ = _setup()
    states = _states(4 * PS, start=8)
    want = enc.encode(states)
    on = ProducerStates(states.k.to(device), states.v.to(device), {l: h.to(device) for l, h in states.h.items()},
                        states.theta, states.start)
    got = DeviceEncoder(enc, device).encode(on).cpu()
    if device == "cpu":  # the same fp32 ops in the same order: bit for bit
        assert torch.equal(got, torch.cat([want[s] for s in enc.slots], 1))
    else:  # another matmul kernel may round a value across a quantizer step: one level, rarely
        diff = (got.int() - torch.cat([want[s] for s in enc.slots], 1).int()).abs()
        assert diff.max() <= 1 and diff.float().mean() < 1e-3
        return
    # the producer's whole device path: encode, then pack pages, gives the wire's payloads
    layout = PageLayout(enc.widths_array(), PS)
    blobs = wire.encode_pages(enc, want, b"d" * 16, PS)
    payloads = [b[wire._HEADER.size : -wire._CRC.size] for b in blobs]
    assert layout.pack(got).numpy().tobytes() == b"".join(payloads)


def test_a_batched_rebuild_equals_one_rebuild_per_request():
    """Two requests' runs at different positions in one pass: the same maps on the same rows, so
    equal up to fp32 rounding (1e-5 relative)."""
    enc, dec, proj = _setup()
    fold = FoldedDecoder(dec, enc, proj)
    a, b = enc.encode(_states(2 * PS, start=0)), enc.encode(_states(3 * PS, start=PS))
    both = {s: torch.cat([a[s], b[s]]) for s in a}
    positions = torch.cat([torch.arange(0, 2 * PS), torch.arange(PS, 4 * PS)])
    tables = fold.rope_tables(positions)
    for layer in range(fold.num_layers):
        k, v = fold.rebuild_layer(layer, both, tables=tables)
        ka, va = fold.rebuild_layer(layer, a, start=0)
        kb, vb = fold.rebuild_layer(layer, b, start=PS)
        for got, want in ((k, torch.cat([ka, kb])), (v, torch.cat([va, vb]))):
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * want.abs().max())


@pytest.mark.parametrize("device", DEVICES)
def test_decode_pages_on_a_device_equals_the_cpu_decode(device):
    enc, _, _ = _setup()
    codes = enc.encode(_states(3 * PS + 2))  # three full pages and a partial last one
    blobs = wire.encode_pages(enc, codes, b"d" * 16, PS, full_pages_only=False)
    want = wire.decode_pages(enc, blobs, b"d" * 16, PS)
    got = wire.decode_pages(enc, blobs, b"d" * 16, PS, layout=PageLayout(enc.widths_array(), PS, device))
    assert all(got[s].device.type == device and torch.equal(got[s].cpu(), want[s]) for s in want)
    with pytest.raises(wire.WireError):  # pages are checked before anything is copied
        wire.decode_pages(enc, [blobs[0][:-1]], b"d" * 16, PS, layout=PageLayout(enc.widths_array(), PS, device))


def test_a_random_decoder_has_the_plan_a_real_fold_has():
    """FoldedDecoder.random (timing at model sizes nothing was calibrated for) must do a real
    rebuild's arithmetic: the same steps, inputs and matmul / MLP shapes as folding a decoder."""
    from sgl_scd.codec.codec import context_inputs

    enc, dec, proj = _setup()
    real = FoldedDecoder(dec, enc, proj)
    fake = FoldedDecoder.random(enc, context_inputs(enc.slots, "kv+h"), {"h": 16}, 1e6, real.kv_heads, real.head_dim)
    shapes = lambda f: [[(st.inputs, st.a.shape, st.cols, [(m.up.shape, m.down.shape, m.cols) for m in st.mlps])
                         for st in steps] for steps in f.plan]
    assert shapes(fake) == shapes(real)
    k, v = fake.rebuild(enc.encode(_states(2 * PS)))
    assert k.shape == v.shape == (real.num_layers, 2 * PS, real.kv_heads, real.head_dim)
