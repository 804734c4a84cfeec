"""Cost of a cross-tokenizer KD step against a same-tokenizer one, side by side in one process (CPU, float32).

The same student, teacher and batch run both ways: `same` is the ordinary fused step (the teacher reads the student's
ids, `OnlineTeacher`), `cross` the cross-tokenizer step (`CrossTokenizerTeacher`, as `loss.cross_tokenizer: always`
runs it: the text written back to bytes, re-tokenized by the teacher's tokenizer, aligned, both heads chunked). The
ratio is the price of the cross-tokenizer machinery itself. Each repetition times forward + backward of both, in
alternating order; medians are printed.

    python benchmarks/bench_xtok_step.py --teacher GEMMA_DIR --data heldout.jsonl        # Gemma 3 270M teacher
    python benchmarks/bench_xtok_step.py --teacher GEMMA_DIR --data heldout.jsonl --student S  # + a real pair row

The student for the ratio is a random 2-layer Llama (hidden 64) over the teacher's tokenizer; `--student S` (e.g. a
SmolLM2-tokenizer student) adds the cross step of that real pair, in ms.

    python benchmarks/bench_xtok_step.py --loss-only [--vocab 262144]    # the two losses alone, no model files

`--loss-only` times the two loss functions alone on random tensors (student hidden 64, teacher hidden 640, 127
tokens, one tokenizer: every token a 1:1 group over the whole vocabulary), forward + backward with the planned
weights of a training step: the part of the step the cross-tokenizer machinery changes, without the models' own
forwards.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch


def _time_step(student, teacher, batch, loss_cfg) -> float:
    from potstill.losses import combine
    from potstill.train.step import kd_micro_step

    student.zero_grad(set_to_none=True)
    start = time.perf_counter()
    terms, _ = kd_micro_step(student, student, batch, teacher, loss_cfg, 0.5, None)
    combine(terms, 0.5, loss_cfg.temperature).backward()
    return time.perf_counter() - start


def _loss_only(vocab: int, reps: int) -> None:
    from potstill.config import LossConfig
    from potstill.losses import combine
    from potstill.losses.align import Alignment, CrossTargets, cross_tokenizer_terms
    from potstill.losses.fused import TeacherHead, fused_kd_terms
    from potstill.train.step import divergence

    torch.manual_seed(0)
    n, loss_cfg = 127, LossConfig()
    div, weights = divergence(loss_cfg), (0.5, 0.5)
    weight = (torch.randn(vocab, 64) * 0.05).requires_grad_()
    hidden = torch.randn(n + 1, 64, requires_grad=True)
    teacher = TeacherHead(hidden=torch.randn(n + 1, 640), weight=torch.randn(vocab, 640) * 0.05)
    ids = torch.randint(0, vocab, (n + 1,))
    rows, ok = torch.arange(n), torch.ones(n, dtype=torch.bool)
    align = Alignment(rows, ids[1:], ok, rows, rows, ids[1:], ok, rows, n)  # one tokenizer: every token 1:1
    shared = torch.arange(vocab)
    arms = {
        "same": lambda: fused_kd_terms(
            hidden[:-1], weight, replace(teacher, hidden=teacher.hidden[:-1]), ids[1:], div, loss_weights=weights
        ),
        "cross": lambda: cross_tokenizer_terms(
            hidden, weight, CrossTargets(teacher, align, shared, shared), div, loss_weights=weights
        ),
    }
    times = {name: [] for name in arms}
    for rep in range(reps + 1):  # the first repetition warms up
        for name in arms if rep % 2 else reversed(arms):
            weight.grad = hidden.grad = None
            start = time.perf_counter()
            combine(arms[name](), 0.5, loss_cfg.temperature).backward()
            if rep:
                times[name].append(time.perf_counter() - start)
    same, cross = (statistics.median(times[n]) for n in arms)
    print(f"loss only, {n} tokens, vocabulary {vocab:,} (median of {reps})")
    print(f"same-tokenizer fused loss {same * 1e3:8.0f} ms")
    print(f"cross-tokenizer loss      {cross * 1e3:8.0f} ms   ratio {cross / same:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher")
    parser.add_argument("--data")
    parser.add_argument("--loss-only", action="store_true")
    parser.add_argument("--vocab", type=int, default=262144)
    parser.add_argument("--student", default=None)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    if args.loss_only:
        return _loss_only(args.vocab, args.reps)
    if not (args.teacher and args.data):
        parser.error("--teacher and --data are needed (or --loss-only)")
    from transformers import LlamaConfig, LlamaForCausalLM

    from potstill.config import LossConfig
    from potstill.data import load_dataset
    from potstill.models.load import load_model
    from potstill.teacher.cross import CrossTokenizerTeacher
    from potstill.teacher.online import OnlineTeacher

    torch.manual_seed(0)
    t_model, t_tok = load_model(args.teacher)
    config = LlamaConfig(
        vocab_size=t_model.get_output_embeddings().weight.shape[0], hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=args.seq_len,
    )  # fmt: skip
    student = LlamaForCausalLM(config).train()
    loss_cfg = LossConfig()
    ds = load_dataset([args.data], t_tok, args.seq_len)
    batch = {k: getattr(ds, k)[: args.batch] for k in ("input_ids", "attention_mask", "labels")}
    arms = {"same": OnlineTeacher(t_model), "cross": CrossTokenizerTeacher(t_model, t_tok, t_tok)}
    times = {name: [] for name in arms}
    for rep in range(args.reps + 1):  # the first repetition warms up
        for name in arms if rep % 2 else reversed(arms):
            seconds = _time_step(student, arms[name], batch, loss_cfg)
            print(f"rep {rep} {name}: {seconds:.1f} s", flush=True)
            if rep:
                times[name].append(seconds)
    same, cross = (statistics.median(times[n]) for n in ("same", "cross"))
    tokens = int((batch["labels"][:, 1:] != -100).sum())
    print(f"batch {args.batch} x {args.seq_len} ({tokens} scored tokens), teacher vocab {config.vocab_size:,}")
    print(f"same-tokenizer step  {same * 1e3:8.0f} ms (median of {args.reps})")
    print(f"cross-tokenizer step {cross * 1e3:8.0f} ms   ratio {cross / same:.2f}x")
    if args.student:
        s_model, s_tok = load_model(args.student)
        s_model.train()
        ds = load_dataset([args.data], s_tok, args.seq_len)
        batch = {k: getattr(ds, k)[: args.batch] for k in ("input_ids", "attention_mask", "labels")}
        teacher = CrossTokenizerTeacher(t_model, s_tok, t_tok)
        real = [_time_step(s_model, teacher, batch, loss_cfg) for _ in range(args.reps + 1)][1:]
        print(f"real pair ({args.student}) cross step {statistics.median(real) * 1e3:8.0f} ms")


if __name__ == "__main__":
    main()
