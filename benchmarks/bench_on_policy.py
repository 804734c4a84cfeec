"""One on-policy distillation step (student sampling + teacher scoring + update), tokens/s: potstill vs TRL.

Arms, all in one process, same random-init models (Llama student and teacher, one vocabulary), same prompts, same
batch, same loss (generalized JSD, beta = 0.5, T = 1, no CE term), same optimizer (AdamW, lr 1e-4, cosine, no
warmup, clip 1), fp32, no gradient checkpointing, every micro-batch completed by the student (lambda = 1):

- `potstill`: `OnPolicyTrainer` (`train.recipe: on_policy`, `on_policy.lmbda: 1`, `objective: gkd`,
  `loss.name: jsd`, `loss.alpha: 1`), fused chunked loss (the default).
- `potstill dense`: the same with `loss.fused: false` (full [B, L, V] logits): shows what the fused loss buys here.
- `TRL GKD`: `trl.experimental.gkd.GKDTrainer`, lmbda = 1, seq_kd off, temperature 1 (TRL's default is 0.9).
- `TRL Distillation`: `trl.DistillationTrainer`, TRL's newer (stable-API) on-policy trainer: always on-policy,
  completion-only chunked JSD (`logits_to_keep`), beta = 0.5 (its default is 1), temperature 1.

Data: a prompt/completion JSONL written to a temp dir, read by potstill's `PromptDataset` (what the recipe reads);
TRL GKD gets the same token rows (prompts as `prompts` / `prompt_attention_mask`, as its ChatML collator gives),
TRL Distillation the prompts as text through the same word-level tokenizer (ids checked equal). Every prompt is
`--prompt-len` tokens (`<bos>` included), so every step of every arm has the same shapes.

Sampling: multinomial over the whole vocabulary (top-k 0, top-p 1, temperature 1), KV cache (HF `generate`),
exactly `--new-tokens` per completion in every arm: the stop id is one past the model's vocabulary (a `<stop>` token
of the tokenizer), so no sample can end early (transformers warns once about that eos id). Each arm's sampling call
is wrapped (`potstill.train.on_policy.rollout`, `GKDTrainer.generate_on_policy_outputs`,
`DistillationTrainer._generate_single_turn`) to time it and to check that every timed step sampled once,
`--new-tokens` tokens per row: an arm that trained on the data's completions (off-policy) or stopped early fails.

Time: wall time from one optimizer step's end to the next (`on_step_end`), so the batch fetch is inside: potstill
samples in `get_batch_samples`, before the Trainer's `on_step_begin`. The first step (warm-up) and the last (logging:
potstill measures gradient norms there) are left out. Each arm runs `--rounds` times, in the listed order and then
reversed, alternately; the rate is from the median step over all rounds (other jobs on a shared machine slow some
steps many times over: the median ignores them), the per-round medians are printed next to it.
Tokens per step: batch x (prompt + new tokens) (what the teacher and the student's update see) and batch x new
tokens (sampled and scored).

    python benchmarks/bench_on_policy.py            # student 256 x 4 layers, teacher 512 x 4, vocab 32,768
    python benchmarks/bench_on_policy.py --quick    # vocab 8,192, prompt 16, 32 new tokens

On a machine shared with other jobs, `--threads 1` keeps the numbers stable: with two threads on two cores, every
parallel region waits for the thread that another process has descheduled, and decoding (thousands of tiny ops per
step) then runs 10-30x slower for as long as the other job runs.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import tempfile
import time

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback
from transformers.trainer_callback import PrinterCallback

import potstill.train.on_policy as on_policy
from potstill.config import load_config
from potstill.data import collate
from potstill.teacher.online import OnlineTeacher
from potstill.train.setup import training_args

PAD, BOS, EOS, UNK = 0, 1, 2, 3  # the tokenizer's special ids; words are w4 .. w{V-1}, `<stop>` is V


class Sampling:
    """What the wrapped sampling calls did since the last `take`: seconds, calls, completion lengths."""

    def __init__(self):
        self.seconds, self.calls, self.lengths = 0.0, 0, []

    def take(self) -> tuple[float, int, list[int]]:
        out = self.seconds, self.calls, self.lengths
        self.seconds, self.calls, self.lengths = 0.0, 0, []
        return out


SAMPLING = Sampling()


def timed(fn, lengths):
    """`fn` that adds its wall time, one call and `lengths(result)` (completion lengths) to SAMPLING."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        SAMPLING.seconds += time.perf_counter() - start
        SAMPLING.calls += 1
        SAMPLING.lengths += [int(n) for n in lengths(result)]
        return result

    return wrapper


def install_timers() -> None:
    """Wrap each arm's sampling call (see the module docstring)."""
    from trl import DistillationTrainer
    from trl.experimental.gkd import GKDTrainer

    on_policy.rollout = timed(on_policy.rollout, lambda batch: batch["completion_len"].tolist())
    gkd = GKDTrainer.generate_on_policy_outputs  # staticmethod: (ids, attention_mask, labels)
    GKDTrainer.generate_on_policy_outputs = staticmethod(timed(gkd, lambda out: (out[2] != -100).sum(1).tolist()))
    DistillationTrainer._generate_single_turn = timed(
        DistillationTrainer._generate_single_turn, lambda completions: [len(c) for c in completions]
    )


class StepClock(TrainerCallback):
    """Per optimizer step between the first and the last: seconds since the previous step ended, and the sampling
    (seconds, calls, lengths) inside it."""

    def __init__(self):
        self.times: list[float] = []
        self.sampling: list[tuple[float, int, list[int]]] = []
        self._last: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        SAMPLING.take()

    def on_step_end(self, args, state, control, **kwargs):
        now, sampled = time.perf_counter(), SAMPLING.take()
        if self._last is not None and state.global_step < state.max_steps:
            self.times.append(now - self._last)
            self.sampling.append(sampled)
        self._last = now


def llama(vocab: int, hidden: int, layers: int, max_len: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                         num_attention_heads=max(1, hidden // 64), max_position_embeddings=max_len,
                         tie_word_embeddings=False, bos_token_id=BOS, eos_token_id=vocab, pad_token_id=PAD)  # fmt: skip
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = vocab  # the `<stop>` id: never sampled (outside the vocabulary)
    model.generation_config.pad_token_id = PAD
    return model


def tokenizer(vocab: int, eos: str = "<eos>", padding_side: str = "right"):
    """A word-level fast tokenizer: `<pad> <bos> <eos> <unk>`, words `w4` .. `w{vocab-1}` (their ids), `<stop>` =
    vocab; `eos` names its end-of-sequence token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": PAD, "<bos>": BOS, "<eos>": EOS, "<unk>": UNK, **{f"w{i}": i for i in range(4, vocab)}}
    tok = Tokenizer(models.WordLevel({**words, "<stop>": vocab}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token=eos,
                                   unk_token="<unk>", additional_special_tokens=["<stop>"] if eos != "<stop>" else [],
                                   padding_side=padding_side)  # fmt: skip


def write_data(path: str, vocab: int, prompt_words: int, completion_words: int, n: int) -> list[str]:
    """`n` prompt/completion records of random words; returns the prompts."""
    g = torch.Generator().manual_seed(0)
    prompts = []
    with open(path, "w") as fh:
        for _ in range(n):
            p, c = (torch.randint(4, vocab, (k,), generator=g).tolist() for k in (prompt_words, completion_words))
            prompts.append(" ".join(f"w{i}" for i in p))
            fh.write(json.dumps({"prompt": prompts[-1], "completion": " ".join(f"w{i}" for i in c)}) + "\n")
    return prompts


def run_potstill(student, teacher, data, path, args, out, fused: bool) -> StepClock:
    opts = ["model.student=unused", "model.teacher=unused", f"train.output_dir={out}", "train.recipe=on_policy",
            f"train.max_steps={args.steps + 2}", f"train.batch_size={args.batch}", "train.warmup_steps=0",
            "train.logging_steps=1000", "train.lr=1e-4", "loss.name=jsd", "loss.beta=0.5", "loss.alpha=1.0",
            "loss.temperature=1.0", f"loss.fused={str(fused).lower()}", f"data.train=[{path}]",
            f"data.seq_len={data.input_ids.shape[1]}", "on_policy.lmbda=1", "on_policy.objective=gkd",
            f"on_policy.max_new_tokens={args.new_tokens}", "on_policy.temperature=1.0",
            "on_policy.top_p=1.0"]  # fmt: skip
    cfg = load_config(None, opts)
    clock = StepClock()
    trainer = on_policy.OnPolicyTrainer(model=student, args=training_args(cfg), train_dataset=data,
                                        data_collator=collate, teacher=teacher, loss_cfg=cfg.loss,
                                        on_policy=cfg.on_policy, pad_id=PAD, eos_id=args.vocab,
                                        callbacks=[clock])  # fmt: skip
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return clock


def _trl_common(args, out: str) -> dict:
    return dict(output_dir=out, max_steps=args.steps + 2, per_device_train_batch_size=args.batch, learning_rate=1e-4,
                lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, seed=0,
                gradient_checkpointing=False, bf16=False, report_to=[], logging_steps=1000, save_strategy="no",
                use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, beta=0.5, temperature=1.0)  # fmt: skip


def run_trl_gkd(student, teacher_model, data, args, out: str) -> StepClock:
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    keys = ("input_ids", "attention_mask", "labels", "prompt_len")
    rows = Dataset.from_dict({key: getattr(data, key).tolist() for key in keys})

    def collator(batch):  # what DataCollatorForChatML returns, from potstill's token rows (prompts all one length)
        out = {key: torch.tensor([r[key] for r in batch]) for key in keys[:3]}
        width = batch[0]["prompt_len"]
        assert all(r["prompt_len"] == width for r in batch)
        out["prompts"] = out["input_ids"][:, :width].clone()
        out["prompt_attention_mask"] = torch.ones_like(out["prompts"])
        return out

    config = GKDConfig(**_trl_common(args, out), lmbda=1.0, seq_kd=False, max_new_tokens=args.new_tokens,
                       max_length=data.input_ids.shape[1])  # fmt: skip
    clock = StepClock()
    trainer = GKDTrainer(model=student, teacher_model=teacher_model, args=config, train_dataset=rows,
                         data_collator=collator, processing_class=tokenizer(args.vocab, eos="<stop>"),
                         callbacks=[clock])  # fmt: skip
    # The Trainer aligns the model's eos with the tokenizer's, and GKD samples with the model's: `<stop>` both.
    assert trainer.generation_config.eos_token_id == args.vocab, trainer.generation_config.eos_token_id
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return clock


def run_trl_distillation(student, teacher_model, prompts: list[str], args, out: str) -> StepClock:
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    config = DistillationConfig(**_trl_common(args, out), max_completion_length=args.new_tokens)
    clock = StepClock()
    tok = tokenizer(args.vocab, eos="<stop>", padding_side="left")  # it samples until the tokenizer's eos
    trainer = DistillationTrainer(model=student, teacher_model=teacher_model, args=config, processing_class=tok,
                                  train_dataset=Dataset.from_dict({"prompt": prompts}), callbacks=[clock])  # fmt: skip
    assert trainer.eos_token_ids == [args.vocab], trainer.eos_token_ids
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return clock


def check(name: str, clock: StepClock, args) -> None:
    """Every timed step sampled once, `new_tokens` per row (on-policy, no early stop)."""
    for step, (_, calls, lengths) in enumerate(clock.sampling, start=2):
        expected = [args.new_tokens] * args.batch
        if calls != 1 or lengths != expected:
            raise SystemExit(f"{name}, step {step}: {calls} sampling calls, completion lengths {lengths} != {expected}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--student-hidden", type=int, default=256)
    parser.add_argument("--teacher-hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=64, help="prompt tokens, <bos> included")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens sampled per prompt (exactly)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (between a warm-up and a final step)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of every arm, order alternating")
    parser.add_argument("--arms", default="potstill,potstill dense,TRL GKD,TRL Distillation", help="comma-separated")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="vocab 8,192, prompt 16, 32 new tokens")
    args = parser.parse_args()
    if args.quick:
        args.vocab, args.prompt_len, args.new_tokens = 8192, 16, 32
    if args.threads:
        torch.set_num_threads(args.threads)
    install_timers()
    seq_len = args.prompt_len + args.new_tokens + 1  # the data's rows: <bos> prompt completion <eos>
    teacher_model = llama(args.vocab, args.teacher_hidden, args.layers, seq_len, seed=1)
    teacher = OnlineTeacher(teacher_model)
    tmp_dir = tempfile.TemporaryDirectory()
    tmp = tmp_dir.name
    path = os.path.join(tmp, "train.jsonl")
    n_rows = args.batch * (args.steps + 2)
    words = write_data(path, args.vocab, args.prompt_len - 1, args.new_tokens, n_rows)
    data = on_policy.PromptDataset([path], tokenizer(args.vocab), seq_len, args.new_tokens)
    prompts = [f"<bos> {p}" for p in words]
    trl_ids = tokenizer(args.vocab, eos="<stop>", padding_side="left")(text=prompts)["input_ids"]
    assert trl_ids == data.input_ids[:, : args.prompt_len].tolist(), "the TRL prompts must be potstill's token ids"
    assert data.prompt_len.eq(args.prompt_len).all()
    all_arms = {
        "potstill": lambda s, out: run_potstill(s, teacher, data, path, args, out, fused=True),
        "potstill dense": lambda s, out: run_potstill(s, teacher, data, path, args, out, fused=False),
        "TRL GKD": lambda s, out: run_trl_gkd(s, teacher_model, data, args, out),
        "TRL Distillation": lambda s, out: run_trl_distillation(s, teacher_model, prompts, args, out),
    }
    arms = {name: all_arms[name] for name in args.arms.split(",")}
    tokens = args.batch * (args.prompt_len + args.new_tokens)
    new = args.batch * args.new_tokens
    print(f"{time.strftime('%Y-%m-%d %H:%M %Z')}, load {os.getloadavg()[0]:.2f}: student {args.student_hidden}x"
          f"{args.layers}, teacher {args.teacher_hidden}x{args.layers}, vocab {args.vocab}, batch {args.batch} x "
          f"(prompt {args.prompt_len} + {args.new_tokens} new) = {tokens} tokens/step ({new} sampled), "
          f"{args.steps} timed steps x {args.rounds} rounds, torch threads {torch.get_num_threads()}")  # fmt: skip
    steps: dict[str, list[float]] = {name: [] for name in arms}
    shares: dict[str, list[float]] = {name: [] for name in arms}
    gens: dict[str, list[float]] = {name: [] for name in arms}
    rest: dict[str, list[float]] = {name: [] for name in arms}
    round_medians: dict[str, list[float]] = {name: [] for name in arms}
    with tmp_dir:
        for r in range(args.rounds):
            for name in list(arms) if r % 2 == 0 else list(reversed(arms)):
                student = llama(args.vocab, args.student_hidden, args.layers, seq_len, seed=0)
                clock = arms[name](student, os.path.join(tmp, f"{name.replace(' ', '_')}_{r}"))
                check(name, clock, args)
                steps[name] += clock.times
                gens[name] += [s for s, _, _ in clock.sampling]
                shares[name] += [s / t for (s, _, _), t in zip(clock.sampling, clock.times, strict=True)]
                rest[name] += [t - s for (s, _, _), t in zip(clock.sampling, clock.times, strict=True)]
                round_medians[name].append(statistics.median(clock.times))
                print(f"round {r + 1}: {name:16s} {round_medians[name][-1]:.2f} s/step (median), steps "
                      f"{' '.join(f'{t:.2f}' for t in clock.times)}, sampling "
                      f"{' '.join(f'{s:.2f}' for s, _, _ in clock.sampling)}, load {os.getloadavg()[0]:.2f}",
                      flush=True)  # fmt: skip
    print(f"load at the end {os.getloadavg()[0]:.2f}")
    med = {name: statistics.median(times) for name, times in steps.items()}
    base = "TRL GKD" if "TRL GKD" in arms else next(iter(arms))
    print(f"\n| arm | s/step (median) | per-round medians | tokens/s | sampled tokens/s | sampling s/step | "
          f"rest s/step | sampling share | vs {base} |\n|---|---:|---|---:|---:|---:|---:|---:|---:|")  # fmt: skip
    for name, t in med.items():
        spread = ", ".join(f"{m:.2f}" for m in round_medians[name])
        print(f"| {name} | {t:.2f} | {spread} | {tokens / t:.0f} | {new / t:.0f} | "
              f"{statistics.median(gens[name]):.2f} | {statistics.median(rest[name]):.2f} | "
              f"{statistics.median(shares[name]):.0%} | "
              f"{med[base] / t:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
