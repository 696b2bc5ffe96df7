"""Offline calibration: a producer's encoder (the published code set) and consumers' decoders.

  python -m sgl_scd.calibrate --consumer demo-ft --encoder-only --name base-enc   # publishable encoder
  python -m sgl_scd.calibrate --consumer demo-lora --encoder adapters/base-enc    # one more consumer
  python -m sgl_scd.calibrate --consumer demo-ft --name demo-ft   # encoder (adapters/demo-ft-encoder) + decoders

An encoder depends on the producer only (PCA bases and bit plans of K/V and of the normalized
inputs at its patch layers); its patch layers are chosen by the dev-KL gain of patching each
layer for a reference consumer (--consumer) or given (--patch-layers). Every consumer
calibrated against an encoder reads the same published pages: adding one is a --encoder run.

Steps (each shows progress):
  1. capture both models' prefill on the calibration prompts (train) and held-out prompts (dev);
  2. fit producer encoders per slot (PCA of de-rotated K, V and normalized inputs, bits spread
     by water-filling under --bits-per-dim / --patch-bits-per-dim; skipped with --encoder) and
     closed-form (ridge) consumer decoders, on at most --n-fit of the calibration prompts;
  3. without --encoder: rank layers by the dev-KL gain of patching them, pick the patch set;
     refit the reuse decoders on their layer's K and V codes and the nearest patch layer's
     (--decoder-context); --encoder-only stops here and writes the encoder;
  4. distill the decoders end to end on KL to the consumer's own prefill, on every calibration
     prompt (the rest are captured now, keeping only their codes and the oracle's log-probs),
     and with --answer-tokens on the oracle's first answer tokens teacher-forced after it;
  5. measure held-out KL / top-1 / F1 and write the adapter (manifest + decoder safetensors).
The quality budget (--budget-kl) is the expected next-token KL vs the oracle on held-out
prompts; the manifest records whether the result meets it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from sgl_scd.calibration import distill
from sgl_scd.codec import manifest as mf
from sgl_scd.codec import wire
from sgl_scd.codec.codec import (
    ProducerEncoder,
    Slot,
    fit_slot_encoder,
    parse_context,
    plan_slots,
    slot_input,
)
from sgl_scd.codec.factor import ridge
from sgl_scd.demo import data
from sgl_scd.evaluation import evaluate
from sgl_scd.hf import models, runtime
from sgl_scd.hf.scd import check_models
from sgl_scd.settings import ADAPTERS_DIR


def log(msg: str) -> None:
    print(f"[calibrate] {msg}", file=sys.stderr, flush=True)


@dataclass
class PairCapture:
    ids: list[int]
    producer: dict[Slot, torch.Tensor]  # producer observations per slot, [n, d]
    consumer: dict[Slot, torch.Tensor]  # consumer targets per slot (K de-rotated), [n, d]
    positions: list[int]  # supervised positions (last = n - 1)
    oracle_logp: torch.Tensor  # [P, V] fp16
    answer: dict = field(default_factory=dict)  # oracle_answer(): the DistillSample answer_* fields
    reuse: int | None = None  # trained as a shared prefix: tokens rebuilt, the rest prefilled


def oracle_answer(consumer, ids: list[int], cap: runtime.PrefillCapture, max_tokens: int) -> dict:
    """The consumer's own greedy answer to ids (at most max_tokens, stop token excluded), with
    its K/V and its log-probs after each answer token: what teacher-forced answer supervision
    needs ({} when the answer is empty)."""
    n = len(ids)
    cont = runtime.continue_from_kv(consumer.model, consumer.tokenizer, ids, cap.k[:, : n - 1],
                                    cap.v[:, : n - 1], max_new_tokens=max_tokens)
    if not cont.tokens:
        return {}
    k, v = runtime.extend_kv(consumer.model, ids + cont.tokens, cap.k, cap.v)  # the answer tokens only
    return {"answer": cont.tokens, "answer_k": k.half(), "answer_v": v.half(),
            "answer_logp": torch.log_softmax(torch.stack(cont.later_logits), -1).half()}


def capture_pair(producer, consumer, ids: list[int], n_positions: int, rng,
                 slots: list[Slot] | None = None, answer_tokens: int = 0, targets: bool | None = None,
                 reuse: int | None = None) -> PairCapture:
    """Both models' per-slot states for every prompt token, and the oracle's log-probs at
    n_positions sampled positions (always including the last).

    slots: only these slots (default: K, V and h of every layer). targets: also the consumer's
    states of those slots (what closed-form fits need; by default only when slots is None, as
    distilling an already fitted codec needs codes and the oracle only). answer_tokens: also
    capture the oracle's first answer tokens (oracle_answer). reuse: the sample is trained as a
    shared prefix of that many tokens (every position after it is supervised too)."""
    targets = slots is None if targets is None else targets
    n = len(ids)
    positions = sorted(rng.sample(range(n - 1), min(n_positions - 1, n - 1))) + [n - 1]
    if reuse is not None:
        positions = sorted(set(positions) | set(range(reuse, n)))
    if slots is None:
        slots = [Slot(layer, kind) for layer in range(producer.config.num_hidden_layers) for kind in ("k", "v", "h")]
    h_layers = sorted({s.layer for s in slots if s.kind == "h"})
    pc = runtime.capture_prefill(producer.model, ids, hidden=bool(h_layers))
    cc = runtime.capture_prefill(consumer.model, ids, hidden=targets and bool(h_layers), logits_at=positions)
    ps, cs = pc.states(h_layers), cc.states(h_layers if targets else ())
    pk = ps.k_derotated()
    ck = cs.k_derotated() if targets else None
    return PairCapture(  # fp16 halves capture memory (~115 KB per token); fits run in fp32
        ids=ids,
        producer={s: slot_input(ps, s, pk).half() for s in slots},
        consumer={s: slot_input(cs, s, ck).half() for s in slots} if targets else {},
        positions=positions,
        oracle_logp=torch.log_softmax(cc.sel_logits, -1).half(),
        answer=oracle_answer(consumer, ids, cc, answer_tokens) if answer_tokens > 0 else {},
        reuse=reuse,
    )


def prompts_from_file(path: Path, tokenizer) -> list[tuple[list[int], data.QAItem | None]]:
    """JSONL lines with "messages" (chat), "prompt" (user text) or "context"/"question"/"answer"."""
    out = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        row = json.loads(line)
        if "context" in row and "question" in row:
            item = data.QAItem(f"file-{i}", row["context"], row["question"], row.get("answer", ""))
            out.append((data.prompt_ids(tokenizer, item), item if "answer" in row else None))
        elif "messages" in row or "prompt" in row:
            msgs = row.get("messages") or [{"role": "user", "content": row["prompt"]}]
            ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
            out.append((list(ids["input_ids"] if hasattr(ids, "keys") else ids), None))
        else:
            raise ValueError(f"{path}:{i + 1}: a line needs 'messages', 'prompt' or 'context'+'question'")
    return out


def layer_list(spec: str) -> list[int]:
    """"23,17" -> [17, 23] (argparse type of --patch-layers; names the bad value)."""
    parts = [x.strip() for x in spec.split(",") if x.strip()]
    if not all(x.isdigit() for x in parts):
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices, got {spec}")
    return sorted({int(x) for x in parts})


def decoder_context(spec: str) -> str:
    """argparse type of --decoder-context: a context context_inputs() knows (names the bad value)."""
    try:
        parse_context(spec)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return spec


def fit_subset(n: int, n_fit: int) -> list[int]:
    """n_fit indices spread evenly over range(n) (all of them when n <= n_fit), so the
    closed-form fit sees every part of the calibration set (the built-in one ends with its long
    prompts)."""
    if n <= n_fit:
        return list(range(n))
    return sorted({i * n // n_fit for i in range(n_fit)})


def fit_codec(train: list[PairCapture], bits: dict, theta: float, ridge_lam: float,
              kinds: tuple[str, ...] = ("k", "v", "h"), fitted: ProducerEncoder | None = None,
              ) -> tuple[ProducerEncoder, dict[Slot, tuple[torch.Tensor, torch.Tensor]]]:
    """Encoders (producer-only PCA) for every slot of the given kinds and closed-form decoders (W, b).

    bits: budget bits per token by slot kind. fitted: a published encoder; only the decoders of
    its slots are fitted."""
    slots = list(fitted.slots) if fitted else [s for s in sorted(train[0].producer) if s.kind in kinds]
    encoders, affine = {}, {}
    for s in tqdm(slots, desc="fit ridge decoders" if fitted else "fit encoders + ridge decoders", file=sys.stderr):
        x = torch.cat([p.producer[s] for p in train]).float()  # [N, d]
        y = torch.cat([p.consumer[s] for p in train]).float()  # [N, d']
        enc = encoders[s] = fitted.slots[s] if fitted else fit_slot_encoder(x, bits[s.kind])
        affine[s] = ridge(enc.dequantize(enc.encode(x)), y, ridge_lam)
    return ProducerEncoder(encoders, theta), affine


def decoder_for(encoder_all: ProducerEncoder, affine, patch: list[int], hidden: dict[str, int],
                consumer_ident: mf.ModelIdentity, context: str = "own", train: list[PairCapture] | None = None,
                ridge_lam: float = 1e-3) -> tuple[ProducerEncoder, torch.nn.Module]:
    """Encoder restricted to a patch plan, and its closed-form-initialized decoder. A context
    other than "own" refits the translators that read other slots' codes on train (context_affine)."""
    slots = plan_slots(consumer_ident.num_layers, patch)
    enc = ProducerEncoder({s: encoder_all.slots[s] for s in slots}, encoder_all.theta)
    dec = mf.build_decoder(enc, hidden, consumer_ident, context)
    if context != "own":
        if train is None:
            raise ValueError(f"decoder context {context!r} needs the calibration captures to fit on")
        affine = {**affine, **context_affine(train, enc, dec.inputs, ridge_lam)}
    for s in slots:
        dec.translator(s).set_affine(*affine[s])
    return enc, dec


def context_affine(train: list[PairCapture], enc: ProducerEncoder, inputs: dict[Slot, tuple[Slot, ...]],
                   ridge_lam: float) -> dict[Slot, tuple[torch.Tensor, torch.Tensor]]:
    """Ridge decoders (W, b) for the slots whose translator reads several slots' codes, each on
    those codes concatenated. Slots reading the same codes (a layer's K and V) share one solve
    (ridge is column-wise), and only one group's K/V codes are held at once."""

    def codes(s: Slot) -> torch.Tensor:
        e = enc.slots[s]
        return torch.cat([e.dequantize(e.encode(c.producer[s].float())) for c in train])

    groups: dict[tuple[Slot, ...], list[Slot]] = {}
    for s, ins in sorted(inputs.items()):
        if len(ins) > 1:
            groups.setdefault(ins, []).append(s)
    h_codes: dict[Slot, torch.Tensor] = {}
    out = {}
    for ins, targets in tqdm(groups.items(), desc="fit context decoders", file=sys.stderr):
        for i in ins:
            if i.kind == "h" and i not in h_codes:
                h_codes[i] = codes(i)
        x = torch.cat([h_codes[i] if i.kind == "h" else codes(i) for i in ins], 1)
        ys = [torch.cat([c.consumer[s] for c in train]).float() for s in targets]
        w, b = ridge(x, torch.cat(ys, 1), ridge_lam)
        off = 0
        for s, y in zip(targets, ys):
            out[s] = (w[:, off : off + y.shape[1]], b[off : off + y.shape[1]])
            off += y.shape[1]
    return out


def distill_samples(enc: ProducerEncoder, caps: list[PairCapture]) -> list[distill.DistillSample]:
    return [distill.DistillSample(c.ids, {s: e.dequantize(e.encode(c.producer[s].float())) for s, e in enc.slots.items()},
                                  c.positions, c.oracle_logp, **c.answer, reuse=c.reuse) for c in caps]


def rank_patch_layers(enc_all, affine, consumer, ident, dev: list[PairCapture], hidden) -> list[tuple[int, float]]:
    """Dev-KL gain (distill.dev_score) of patching each single layer (closed-form decoders), best first."""
    coded = distill_samples(enc_all, dev)  # every slot's codes, encoded once

    def score(patch: list[int]) -> float:
        enc, dec = decoder_for(enc_all, affine, patch, hidden, ident)
        plan = [distill.DistillSample(s.ids, {k: s.z[k] for k in enc.slots}, s.positions, s.oracle_logp) for s in coded]
        return distill.dev_score(consumer.model, dec, plan)[0]

    base_kl = score([])
    gains = [(layer, base_kl - score([layer]))
             for layer in tqdm(range(ident.num_layers), desc="rank patch layers", file=sys.stderr)]
    log(f"reuse-only closed-form dev KL {base_kl:.4f}; best single patches: "
        + ", ".join(f"L{l}:{g:+.4f}" for l, g in sorted(gains, key=lambda x: -x[1])[:8]))
    return sorted(gains, key=lambda x: -x[1])


def heldout_quality(producer, consumer, adapter: mf.Adapter, items: list[data.QAItem]) -> dict:
    from sgl_scd.evaluation.methods import scd_method

    rows = evaluate.evaluate(producer, consumer, items, {"scd": scd_method(adapter)}, desc="held-out eval")
    return next(r for r in rows if r["method"] == "scd")


def builtin_long_prompts(tok, n_train: int, n_dev: int) -> tuple[list[data.QAItem], list[data.QAItem]]:
    """Long calibration prompts from Hi-ToM's calib split (benchmarks use the eval split): one
    question per story (every 5th story held out for dev), and a quarter of each as >= 1k-token
    joined stories, so the decoders see the positions long prompts reach."""
    if n_train + n_dev == 0:
        return [], []
    by_story: dict[str, data.QAItem] = {}  # story -> its first question, longest stories first
    for it in data.load_hitom("calib"):
        by_story.setdefault(it.context, it)
    first_q = list(by_story.values())
    joined = data.load_long_context(tok, split="calib")
    dev_stories = first_q[::5]
    train_stories = [it for i, it in enumerate(first_q) if i % 5]
    n_tj, n_dj = n_train // 4, n_dev // 4
    # joined prompts alternate too, so a dev prompt's last story is never a train prompt's
    train = train_stories[: n_train - n_tj] + joined[1::2][:n_tj]
    dev = dev_stories[: n_dev - n_dj] + joined[0::2][:n_dj]
    return train, dev


def calibration_rows(args, tok) -> tuple[list, list, list, str]:
    """(train rows, dev rows, held-out QA items, source name); a row is (ids, QAItem | None)."""
    if args.prompts:
        rows = prompts_from_file(Path(args.prompts), tok)
        n_dev = max(8, len(rows) // 5)
        train_rows, dev_rows = rows[:-n_dev][: args.n_calib], rows[-n_dev:]
        return train_rows, dev_rows, [item for _, item in dev_rows if item is not None], str(args.prompts)
    # built-in demo set: ToMi items the fine-tunes never trained on, plus long prompts
    long_train, long_dev = builtin_long_prompts(tok, args.n_calib_long, args.n_dev_long)
    train_items = data.load_tomi("train")[1000 : 1000 + args.n_calib] + long_train
    dev_split = data.load_tomi("dev")
    train_rows = [(data.prompt_ids(tok, it), it) for it in train_items]
    dev_rows = [(data.prompt_ids(tok, it), it) for it in dev_split[: args.n_dev] + long_dev]
    eval_items = dev_split[args.n_dev : args.n_dev + args.n_eval]
    return train_rows, dev_rows, eval_items, "builtin:tomi-train[1000:]+tomi-dev+hitom-calib"


def shared_prefix_reuse(rows, share: float, page_size: int, tok, seed: int) -> list[int | None]:
    """Per row, the story tokens to train it as a served shared prefix (data.story_tokens), for a
    `share` of the rows that carry a QA item and a story of at least one page; None for the rest."""
    rng = random.Random(seed + 1)  # apart from the position sampling, so share 0 changes nothing
    out = []
    for _, item in rows:
        pick = share > 0 and rng.random() < share and item is not None
        out.append((data.story_tokens(tok, item, page_size) or None) if pick else None)
    return out


def calibrate(args) -> Path:
    """Run one calibration (see the module docstring); returns the directory written."""
    torch.manual_seed(args.seed)
    t_start = time.time()
    producer, consumer = models.load(args.producer), models.load(args.consumer)
    evaluate.check_compatible(producer, consumer)
    published = mf.load_encoder(Path(args.encoder)) if args.encoder else None
    if published is not None:
        published.manifest.producer.check("producer", producer.identity())
    tok = consumer.tokenizer
    train_rows, dev_rows, eval_items, source = calibration_rows(args, tok)
    lengths = [len(ids) for ids, _ in train_rows]
    digest = hashlib.sha256(json.dumps([ids for ids, _ in train_rows + dev_rows]).encode()).hexdigest()
    log(f"{len(train_rows)} calibration ({min(lengths)}-{max(lengths)} tokens) + {len(dev_rows)} held-out "
        f"prompts from {source}")
    rng = random.Random(args.seed)
    fit_idx = fit_subset(len(train_rows), args.n_fit)
    fit_set = set(fit_idx)
    rest_rows = [r for i, r in enumerate(train_rows) if i not in fit_set]
    slots = list(published.codec.slots) if published else None
    reuse = shared_prefix_reuse(train_rows, args.suffix_share, args.page_size, tok, args.seed)
    rest_reuse = [r for i, r in enumerate(reuse) if i not in fit_set]
    dev_reuse = shared_prefix_reuse(dev_rows, 1.0 if args.suffix_share > 0 else 0.0, args.page_size, tok, args.seed)
    train = [capture_pair(producer, consumer, train_rows[i][0], args.positions, rng, slots, args.answer_tokens, True,
                          reuse[i])
             for i in tqdm(fit_idx, desc="capture train", file=sys.stderr)]
    dev = [capture_pair(producer, consumer, ids, 1, rng, slots, targets=True, reuse=r)
           for (ids, _), r in tqdm(list(zip(dev_rows, dev_reuse)), desc="capture dev", file=sys.stderr)]
    ident = consumer.identity()
    hidden = {"k": args.hidden_kv, "v": args.hidden_kv, "h": args.hidden_h}
    theta = producer.identity().rope_theta
    if published:
        _, affine = fit_codec(train, {}, theta, args.ridge, fitted=published.codec)
        enc, patch = published.codec, published.codec.patch_layers
        recipe = published.manifest.recipe
    else:
        kv_dim = ident.kv_heads * ident.head_dim
        bits = {"k": round(args.bits_per_dim * kv_dim), "v": round(args.bits_per_dim * kv_dim),
                "h": round(args.patch_bits_per_dim * ident.hidden_size)}
        kinds = ("k", "v", "h") if args.patch_layers is not None or args.patch_count > 0 else ("k", "v")
        enc_all, affine = fit_codec(train, bits, theta, args.ridge, kinds=kinds)
        if args.patch_layers is not None:
            patch, chosen_by = args.patch_layers, "given"
        elif args.patch_count > 0:
            ranked = rank_patch_layers(enc_all, affine, consumer, ident, dev, hidden)
            patch, chosen_by = sorted(layer for layer, gain in ranked[: args.patch_count] if gain > 0), args.consumer
        else:
            patch, chosen_by = [], "none"
        enc = ProducerEncoder({s: enc_all.slots[s] for s in plan_slots(ident.num_layers, patch)}, theta)
        recipe = {"bits_per_dim": args.bits_per_dim, "patch_bits_per_dim": args.patch_bits_per_dim,
                  "patch_layers_chosen_by": chosen_by,
                  "basis": "producer-pca"}
        enc_out = Path(args.out or ADAPTERS_DIR / args.name) if args.encoder_only else encoder_dir_for(args)
        published = write_encoder(enc_out, enc, producer, args.page_size, recipe,
                                  {"source": source, "data_digest": digest, "n_fit": len(fit_idx),
                                   "wall_s": round(time.time() - t_start, 1)})
        log(f"patch layers: {patch}; wrote encoder {enc_out} (revision {published.revision[:12]})")
        if args.encoder_only:
            return enc_out
    _, dec = decoder_for(enc, affine, patch, hidden, ident, args.decoder_context, train, args.ridge)
    del train_rows
    for c in train + dev:  # free what the plan does not use
        for s in list(c.producer):
            if s not in enc.slots:
                del c.producer[s], c.consumer[s]
    train_s, dev_s = distill_samples(enc, train), distill_samples(enc, dev)
    del train, dev
    for (ids, _), r in tqdm(list(zip(rest_rows, rest_reuse)), desc="capture rest (codes + oracle only)",
                            file=sys.stderr):
        train_s += distill_samples(enc, [capture_pair(producer, consumer, ids, args.positions, rng, list(enc.slots),
                                                      args.answer_tokens, reuse=r)])
    result = distill.distill(consumer.model, dec, train_s, dev_s, epochs=args.epochs, lr=args.lr,
                             delta_rank=args.delta_rank, long_share=args.long_share,
                             last_share=args.last_share, answer_share=args.answer_share,
                             log=log)
    dec.eval().requires_grad_(False)
    out = Path(args.out or ADAPTERS_DIR / args.name)
    man = mf.AdapterManifest(
        name=args.name, consumer=ident,
        encoder=published.path.name if published.path.parent.resolve() == out.parent.resolve()
        else str(published.path.resolve()),
        encoder_revision=published.revision, decoder_context=args.decoder_context, decoder_hidden=hidden,
        max_tokens=max(lengths),
        calibration={"source": source, "data_digest": digest, "n_calib": len(train_s), "n_fit": len(fit_idx),
                     "n_dev": len(dev_s), "min_tokens": min(lengths), "positions": args.positions,
                     "epochs": args.epochs, "lr": args.lr,
                     "delta_rank": args.delta_rank, "long_share": args.long_share, "last_share": args.last_share,
                     "answer_tokens": args.answer_tokens, "answer_share": args.answer_share,
                     "suffix_share": args.suffix_share, "seed": args.seed,
                     "budget_kl": args.budget_kl, "distill": result})
    mf.save_adapter(out, man, dec)
    mf.save_projections(out, runtime.projections(consumer.model, published.manifest.h_layers))  # for SGLang
    adapter = check_models(mf.load_adapter(out), producer, consumer)
    if eval_items:
        q = heldout_quality(producer, consumer, adapter, eval_items)
        heldout = {k: q[k] for k in ("n", "f1", "em", "kl", "top1", "same_answer", "kl_answer", "n_answer")}
    else:
        # the budget is an expectation over prompts: the pooled mean, not the per-group selection score
        heldout = {"kl": distill.last_token_kl(consumer.model, dec, dev_s), "n": len(dev_s)}
    heldout["meets_budget"] = heldout["kl"] <= args.budget_kl
    man.calibration["wall_s"] = round(time.time() - t_start, 1)
    man = mf.AdapterManifest(**{**mf.as_dict(man), "consumer": ident, "heldout": heldout})
    mf.save_adapter(out, man, dec)
    em = published.manifest
    log(f"wrote {out}: payload {em.payload_bytes_per_token:.0f} B/token ({em.payload_ratio:.3f}x raw bf16 KV), "
        f"held-out {json.dumps(heldout)}")
    if not heldout["meets_budget"]:
        log(f"WARNING: held-out KL {heldout['kl']:.4f} exceeds the budget {args.budget_kl}")
    return out


def encoder_dir_for(args) -> Path:
    """Where a calibration that fits its own encoder writes it: beside the adapter, <name>-encoder."""
    out = Path(args.out or ADAPTERS_DIR / args.name)
    return out.parent / f"{out.name}-encoder"


def write_encoder(out: Path, enc: ProducerEncoder, producer, page_size: int, recipe: dict,
                  calibration: dict) -> mf.Encoder:
    """Save an encoder artifact and load it back (its revision checked)."""
    ident = producer.identity()
    raw = mf.raw_kv_bytes_per_token(ident)
    payload = wire.payload_bytes_per_token(enc, page_size)
    man = mf.EncoderManifest(
        name=out.name, producer=ident, tokenizer_digest=producer.tokenizer_digest(),
        revision=mf.encoder_revision(enc), page_size=page_size, h_layers=enc.patch_layers,
        bits_per_token=enc.bits_per_token(), payload_bytes_per_token=payload, raw_kv_bytes_per_token=raw,
        payload_ratio=payload / raw, recipe=recipe, slots=mf.slot_summary(enc), calibration=calibration)
    mf.save_encoder(out, man, enc)
    return mf.load_encoder(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m sgl_scd.calibrate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--producer", default="base", help="producer spec: base | demo-ft | demo-lora | DIR")
    p.add_argument("--consumer", required=True, help="consumer spec: base | demo-ft | demo-lora | DIR")
    p.add_argument("--name", help="adapter name (default: the consumer spec's last path part)")
    p.add_argument("--out", help="output directory (default adapters/<name>)")
    p.add_argument("--encoder", metavar="DIR",
                   help="calibrate decoders only, against this published encoder (its patch layers, bits and page "
                        "size; nothing is republished)")
    p.add_argument("--encoder-only", action="store_true",
                   help="fit and write an encoder only (patch layers ranked for --consumer, or --patch-layers)")
    p.add_argument("--prompts", help="JSONL calibration prompts (default: the built-in ToMi demo set)")
    p.add_argument("--n-calib", type=int, default=192, help="calibration prompts (default 192)")
    p.add_argument("--n-fit", type=int, default=544,
                   help="calibration prompts the closed-form fit uses (default 544, ~11 GB of captures on "
                        "the built-in set); distillation uses all")
    p.add_argument("--n-dev", type=int, default=48, help="held-out prompts for selection (default 48)")
    p.add_argument("--n-calib-long", type=int, default=32,
                   help="long (Hi-ToM, 200-1,200-token) calibration prompts added to the built-in set (default 32)")
    p.add_argument("--n-dev-long", type=int, default=8, help="long held-out prompts (default 8)")
    p.add_argument("--n-eval", type=int, default=100, help="held-out QA items for F1 (default 100)")
    p.add_argument("--budget-kl", type=float, default=0.05, help="expected held-out KL budget (default 0.05)")
    p.add_argument("--bits-per-dim", type=float, default=3.0,
                   help="average code bits per K/V dimension of reuse layers (default 3.0; with 8 patch layers "
                        "at the default --patch-bits-per-dim the payload is ~0.24x raw bf16 KV)")
    p.add_argument("--patch-bits-per-dim", type=float, default=4.0,
                   help="average code bits per hidden dimension of a patch layer's normalized input (default "
                        "4.0: a patch layer then costs 2x a reuse layer's K+V codes; patch codes buy more "
                        "KL per bit than reuse codes, docs/codec.md)")
    p.add_argument("--patch-count", type=int, default=6,
                   help="patch the N layers with the largest held-out gain (default 6; 0 = reuse only)")
    p.add_argument("--patch-layers", type=layer_list, help="explicit patch layers instead, e.g. 17,23 (overrides --patch-count)")
    p.add_argument("--hidden-kv", type=int, default=0, help="residual MLP width of K/V decoders (default 0)")
    p.add_argument("--hidden-h", type=int, default=256, help="residual MLP width of patch predictors")
    p.add_argument("--positions", type=int, default=24,
                   help="supervised positions per prompt (default 24; more cost little, the LM head is cheap "
                        "next to the forward)")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--delta-rank", type=int, default=0,
                   help="distill only a rank-N correction of each closed-form affine decoder map (default 0: "
                        "train the whole map)")
    p.add_argument("--long-share", type=float, default=0.25,
                   help="share of the distillation loss carried by long (>= 256-token) prompts, whatever "
                        "their number (default 0.25; the built-in set has ~5%% long prompts)")
    p.add_argument("--last-share", type=float, default=0.15,
                   help="share of each prompt's loss on its last position, the first answer token (what "
                        "serving is judged on); the other sampled positions share the rest (default 0.15)")
    p.add_argument("--answer-tokens", type=int, default=0,
                   help="also supervise the consumer's own first N greedy answer tokens, teacher-forced after "
                        "each calibration prompt, so multi-token answers keep agreeing after their first token "
                        "(default 0: prompt positions only)")
    p.add_argument("--answer-share", type=float, default=0.15,
                   help="share of each prompt's loss on those answer tokens (default 0.15)")
    p.add_argument("--suffix-share", type=float, default=0.0,
                   help="share of calibration prompts trained as a shared prefix is served: only the story's "
                        "whole pages rebuilt, the question and answer prefilled by the consumer on them, every "
                        "position after the story supervised; held-out prompts are then scored that way too "
                        "(default 0: every prompt token but the last rebuilt)")
    p.add_argument("--lr", type=float, default=1e-4, help="distillation learning rate (Adam)")
    p.add_argument("--ridge", type=float, default=1e-3, help="ridge penalty of closed-form decoders")
    p.add_argument("--decoder-context", type=decoder_context, default="kv+h",
                   help="codes each translator reads: own (its slot's), kv (a reuse slot its layer's K and V), "
                        "kv+h (those and the nearest patch layer's normalized input; kv without patch layers); "
                        "context costs no payload, only rebuild compute (default kv+h)")
    p.add_argument("--page-size", type=int, default=16, help="tokens per store page (SGLang --page-size)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.encoder and args.encoder_only:
        p.error("--encoder (fit decoders against a published encoder) and --encoder-only exclude each other")
    if args.encoder and not (Path(args.encoder) / mf.ENCODER_FILE).exists():
        p.error(f"--encoder takes a published encoder dir (with {mf.ENCODER_FILE}), got {args.encoder}")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.name = args.name or Path(args.consumer).name
    if args.bits_per_dim <= 0:
        p.error(f"--bits-per-dim must be > 0, got {args.bits_per_dim}")
    if args.patch_bits_per_dim <= 0:
        p.error(f"--patch-bits-per-dim must be > 0, got {args.patch_bits_per_dim}")
    if not 0 < args.long_share < 1:
        p.error(f"--long-share must be in (0, 1), got {args.long_share}")
    if not 0 < args.last_share <= 1:
        p.error(f"--last-share must be in (0, 1], got {args.last_share}")
    if args.answer_tokens < 0:
        p.error(f"--answer-tokens must be >= 0, got {args.answer_tokens}")
    if not 0 <= args.answer_share < 1:
        p.error(f"--answer-share must be in [0, 1), got {args.answer_share}")
    if not 0 <= args.suffix_share <= 1:
        p.error(f"--suffix-share must be in [0, 1], got {args.suffix_share}")
    if args.n_fit < 1:
        p.error(f"--n-fit must be >= 1, got {args.n_fit}")
    if args.delta_rank < 0:
        p.error(f"--delta-rank must be >= 0, got {args.delta_rank}")
    if args.patch_count < 0:
        p.error(f"--patch-count must be >= 0, got {args.patch_count}")
    calibrate(args)


if __name__ == "__main__":
    main()
