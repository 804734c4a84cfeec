"""Teacher-cache encodings: bytes per token and fidelity at k = 8, 32, 64, 128, vs a naive int32 + float32 store.

The teacher runs once over a few thousand tokens of Python standard-library source (Gemma 3 270M, V = 262,144;
`--tiny`: a random 2-layer model over a 1,024-token vocabulary). Per position we keep the entropy of the full
distribution and its top-128 ids and log-probs: that is enough to compute, exactly, for any k <= 128,

    KL(p || p_hat) = sum_v p log p - sum_kept p_i log p_hat_i - tail * log(tail_hat / (V - k)),

where p_hat is the reconstructed distribution a cache reader sees: the (decoded) kept log-probs, and the
(decoded) tail mass spread uniformly over the V - k other ids. Every setting then encodes the same targets with
`potstill.teacher.cache.Codec` (exactly what `potstill cache build` writes per sequence, zstd included) and
decodes them back. "top-1 kept" = fraction of positions whose decoded first id is the teacher's argmax.

Run: `python benchmarks/bench_cache.py` (real Gemma, < 3 min on 2 cores) or `--tiny` (seconds).
"""

from __future__ import annotations

import argparse
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch

from potstill.losses.sparse import topk_targets
from potstill.teacher.cache import Codec

KS = (8, 32, 64, 128)
SEQ_LEN = 256


def stdlib_text(chars: int) -> str:
    """The first `chars` characters of the standard library's .py files, in sorted order."""
    parts, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        parts.append(path.read_text(encoding="utf-8", errors="replace"))
        total += len(parts[-1])
        if total >= chars:
            break
    return "".join(parts)[:chars]


def teacher_targets(model, tokenizer, tokens: int, kmax: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the teacher over `tokens` tokens (rows of SEQ_LEN, <bos> first) once.

    Returns:
        entropy [N] float64 (full distribution), top ids [N, kmax], top log-probs [N, kmax] float64.
    """
    ids = tokenizer(stdlib_text(tokens * 8), add_special_tokens=False)["input_ids"]
    rows = -(-tokens // (SEQ_LEN - 1))
    ent, top_ids, top_lp = [], [], []
    for r in range(rows):
        chunk = ids[r * (SEQ_LEN - 1) : (r + 1) * (SEQ_LEN - 1)]
        with torch.inference_mode():
            logits = model(torch.tensor([[tokenizer.bos_token_id, *chunk]])).logits[0].float()
            logp = torch.log_softmax(logits, dim=-1)  # float32: [256, 262k] in float64 doubles the time
            ent.append(-(logp.exp() * logp).sum(-1, dtype=torch.float64))
            top = logp.topk(kmax, dim=-1)
        top_ids.append(top.indices)
        top_lp.append(top.values.double())
    return torch.cat(ent)[:tokens], torch.cat(top_ids)[:tokens], torch.cat(top_lp)[:tokens]


def fidelity(entropy, p_lp, ids_hat, lp_hat, tail_hat, true_ids, vocab: int) -> tuple[float, float]:
    """(mean KL(p || p_hat), fraction of positions whose first decoded id is the teacher's argmax).

    Args:
        entropy: [N] full entropy; p_lp: [N, kmax] true top log-probs (sorted) with ids `true_ids`.
        ids_hat, lp_hat, tail_hat: decoded [N, k], [N, k], [N].
    """
    k = ids_hat.shape[1]
    # True log-prob of each decoded id: look it up among the true top-kmax (the kept set is the true top-k).
    match = ids_hat.unsqueeze(-1) == true_ids.unsqueeze(1)  # [N, k, kmax]
    p_kept = (match.double() * p_lp.exp().unsqueeze(1)).sum(-1)  # [N, k]
    tail = (1 - p_kept.sum(-1)).clamp_min(0)
    cross = (p_kept * lp_hat.double()).sum(-1) + tail * torch.log(tail_hat.double().clamp_min(1e-30) / (vocab - k))
    kl = -entropy - cross
    top1 = (ids_hat[:, 0] == true_ids[:, 0]).double().mean().item()
    return kl.mean().item(), top1


def measure(entropy, top_ids, top_lp, vocab: int, k: int, encoding: str) -> dict:
    """Encode the top-k targets per SEQ_LEN-row sequence with `encoding`, decode, return size and fidelity."""
    sparse = topk_targets(top_lp, k)  # top_lp is sorted: its first k are the top-k of the full distribution
    ids = top_ids.gather(-1, sparse.ids)
    # The tail is 1 - kept mass of the *full* distribution (top_lp is normalized over V).
    tail = (-torch.expm1(torch.logsumexp(top_lp[:, :k], -1))).clamp_min(0)
    codec = Codec("topk", encoding, k, vocab, SEQ_LEN)
    size, decoded = 0, []
    start = time.perf_counter()
    for s in range(0, len(ids), SEQ_LEN):
        n = min(SEQ_LEN, len(ids) - s)
        mask = np.arange(SEQ_LEN) < n
        frame = codec.encode(
            mask, ids[s : s + n].numpy(), top_lp[s : s + n, :k].float().numpy(), tail[s : s + n].float().numpy()
        )
        size += len(frame)
        decoded.append(codec.decode(frame)[1:])
    seconds = time.perf_counter() - start
    ids_hat, lp_hat, tail_hat = (torch.from_numpy(np.concatenate(col)) for col in zip(*decoded, strict=True))
    kl, top1 = fidelity(entropy, top_lp, ids_hat, lp_hat, tail_hat, top_ids, vocab)
    return {"bytes": size / len(ids), "kl": kl, "top1": top1, "ms": 1000 * seconds}


def sampled_size(entropy, top_ids, top_lp, vocab: int, samples: int, seed: int = 0) -> float:
    """Bytes/token of sampled targets, drawing from the top-128 renormalized (the tail rarely matters for size)."""
    gen = torch.Generator().manual_seed(seed)
    draws = top_ids.gather(-1, torch.multinomial(top_lp.float().exp(), samples, replacement=True, generator=gen))
    codec = Codec("sampled", "compact", samples, vocab, SEQ_LEN)
    size = 0
    for s in range(0, len(draws), SEQ_LEN):
        n = min(SEQ_LEN, len(draws) - s)
        size += len(codec.encode(np.arange(SEQ_LEN) < n, draws[s : s + n].numpy(), None, None))
    return size / len(draws)


def load(tiny: bool):
    if tiny:
        import sys

        from transformers import LlamaConfig, LlamaForCausalLM

        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from conftest import build_tokenizer

        tokenizer = build_tokenizer(1024, [stdlib_text(200_000)])
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            tie_word_embeddings=False,
        )
        model = LlamaForCausalLM(config)
        with torch.no_grad():  # sharper than a random init, closer to a trained model's peaked distributions
            model.lm_head.weight.mul_(40)
        return model.eval(), tokenizer, "random Llama, 2 layers, hidden 64"
    from potstill.models.load import load_model, prepare_teacher

    model, tokenizer = load_model(prepare_teacher(check=False))
    return model, tokenizer, "Gemma 3 270M (Q4_K_M GGUF, dequantized float32)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="random tiny teacher (seconds)")
    parser.add_argument("--tokens", type=int, default=2048, help="positions scored by the teacher")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer, name = load(args.tiny)
    vocab = model.get_output_embeddings().weight.shape[0]
    start = time.perf_counter()
    entropy, top_ids, top_lp = teacher_targets(model, tokenizer, args.tokens, max(KS))
    seconds = time.perf_counter() - start
    print(f"teacher: {name}, V = {vocab}, {len(entropy)} tokens of stdlib source, forward {seconds:.0f} s")
    print(
        "| k | naive int32+f32 B/tok | lossless B/tok | compact B/tok | compact/naive | KL lossless | KL compact "
        "| top-1 kept (compact) | encode+decode ms/1k tok |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for k in KS:
        lossless = measure(entropy, top_ids, top_lp, vocab, k, "lossless")
        compact = measure(entropy, top_ids, top_lp, vocab, k, "compact")
        naive = 8 * k + 4  # int32 ids + float32 log-probs + a float32 tail
        print(
            f"| {k} | {naive} | {lossless['bytes']:.1f} | {compact['bytes']:.1f} | {compact['bytes'] / naive:.3f} "
            f"| {lossless['kl']:.4f} | {compact['kl']:.4f} | {compact['top1']:.4f} "
            f"| {compact['ms'] * 1000 / len(entropy):.0f} |"
        )
    for samples in (16, 32, 64):
        size = sampled_size(entropy, top_ids, top_lp, vocab, samples)
        print(f"sampled targets, {samples} draws/token: {size:.1f} B/tok")


if __name__ == "__main__":
    main()
