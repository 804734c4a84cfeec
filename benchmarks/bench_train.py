"""Student training throughput (tokens/s): potstill with a cached vs an online teacher vs TRL's GKDTrainer.

Arms, all in one process, same random-init models, same data, same batch, same loss (generalized JSD,
beta = 0.5, T = 1, no CE term: alpha = 1, which is what GKD optimizes at lmbda = 0):

- `cache fused`: DistillTrainer from top-k (k = 64) teacher targets, fused loss; no teacher model in the step.
- `cache dense`: the same targets on the student's full logits (`sparse_kd_terms`).
- `online fused`: DistillTrainer with the online teacher and the fused loss (the default).
- `online dense`: the online teacher on full logits (`loss.fused: false`).
- `TRL GKD`: `trl.experimental.gkd.GKDTrainer`, lmbda = 0 (no student generation), seq_kd off.

The cached arms serve targets that were computed before the timing starts (the cache build is the
teacher's one-off cost, paid once for many students); they are held in memory, so the time to read and
decode shards from disk (`potstill.teacher.cache`, measured in bench_cache.py) is not in these numbers.
Time: wall time of the optimizer steps between a warm-up step and the last (logging) step; each arm runs
`--rounds` times, in the listed order and then reversed, alternately (so drifting load or a warm-up effect
does not favour the arms that run late); the rate is from the median step over all rounds, and the spread of
the per-round means is printed next to it. Tokens = batch x seq_len per step.

    python benchmarks/bench_train.py            # student 256 x 4 layers, teacher 512 x 4, vocab 32,768
    python benchmarks/bench_train.py --quick    # a smaller check (vocab 8,192, seq 64)
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback
from transformers.trainer_callback import PrinterCallback

from potstill.config import load_config
from potstill.data import collate
from potstill.data.packing import PackedDataset
from potstill.losses.sparse import topk_targets
from potstill.teacher.online import OnlineTeacher
from potstill.train.setup import training_args
from potstill.train.trainer import DistillTrainer, IndexedDataset


class StepTimer(TrainerCallback):
    """Wall time of the optimizer steps between the first (warm-up) and the last (potstill's final log measures
    the kd/ce gradient norms there: extra backward passes that a long run pays once per logging_steps)."""

    def __init__(self):
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if 1 < state.global_step < state.max_steps:
            self.times.append(time.perf_counter() - self._start)


class MemoryCache:
    """Top-k targets of every packed sequence, computed up front: `targets(indices)` as `TeacherCache` serves them."""

    def __init__(self, teacher: OnlineTeacher, data: PackedDataset, k: int, batch: int):
        parts = [
            topk_targets(teacher.logits(data.input_ids[i : i + batch], data.attention_mask[i : i + batch]), k)
            for i in range(0, len(data), batch)
        ]
        self.all = parts[0].__class__(
            ids=torch.cat([p.ids for p in parts]),
            logprobs=torch.cat([p.logprobs for p in parts]),
            tail=torch.cat([p.tail for p in parts]),
        )

    def targets(self, indices: torch.Tensor):
        return self.all.rows(indices)


def llama(vocab: int, hidden: int, layers: int, seq_len: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                         num_attention_heads=max(1, hidden // 64), max_position_embeddings=seq_len,
                         tie_word_embeddings=False)  # fmt: skip
    return LlamaForCausalLM(config)


def random_data(vocab: int, seq_len: int, n: int) -> PackedDataset:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (n, seq_len), generator=g)
    labels = ids.clone()
    labels[:, 0] = -100
    return PackedDataset(ids, torch.ones_like(ids), labels, torch.zeros(n, dtype=torch.long), ["default"] * n)


def run_potstill(student, teacher, cache, data, opts: list[str], out: str) -> StepTimer:
    cfg = load_config(None, ["model.student=unused", f"train.output_dir={out}", *opts])
    timer = StepTimer()
    trainer = DistillTrainer(model=student, args=training_args(cfg), data_collator=collate, callbacks=[timer],
                             train_dataset=IndexedDataset(data) if cache else data, teacher=teacher,
                             teacher_cache=cache, loss_cfg=cfg.loss)  # fmt: skip
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return timer


def run_trl(student, teacher_model, data, args, out: str) -> StepTimer:
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    keys = ("input_ids", "attention_mask", "labels")
    rows = Dataset.from_dict({key: getattr(data, key).tolist() for key in keys})  # SFTTrainer wants a `Dataset`
    # TRL's GKDConfig turns gradient checkpointing and bf16 on by default: off, for the same float32 step as ours.
    config = GKDConfig(output_dir=out, max_steps=args.steps + 2, per_device_train_batch_size=args.batch,
                       learning_rate=1e-4, lmbda=0.0, beta=0.5, temperature=1.0, seq_kd=False, report_to=[],
                       logging_steps=1000, save_strategy="no", use_cpu=True, disable_tqdm=True,
                       max_length=args.seq_len, dataloader_num_workers=0,
                       gradient_checkpointing=False, bf16=False)  # fmt: skip
    timer = StepTimer()
    trainer = GKDTrainer(model=student, teacher_model=teacher_model, args=config, train_dataset=rows,
                         data_collator=lambda batch: {key: torch.tensor([r[key] for r in batch]) for key in keys},
                         processing_class=_tokenizer(), callbacks=[timer])  # fmt: skip
    trainer.train()
    return timer


def _tokenizer():
    """A tiny fast tokenizer: GKDTrainer wants a processing class; the data here is already token ids."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1, "<unk>": 2}, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--student-hidden", type=int, default=256)
    parser.add_argument("--teacher-hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (between a warm-up and a final step)")
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="runs of every arm, order alternating")
    parser.add_argument("--quick", action="store_true", help="vocab 8,192, seq 64, 2 timed steps")
    args = parser.parse_args()
    if args.quick:
        args.vocab, args.seq_len, args.steps = 8192, 64, 2
    data = random_data(args.vocab, args.seq_len, args.batch * (args.steps + 2))
    teacher_model = llama(args.vocab, args.teacher_hidden, args.layers, args.seq_len, seed=1)
    teacher = OnlineTeacher(teacher_model)
    cache = MemoryCache(teacher, data, args.k, args.batch)
    common = [f"train.max_steps={args.steps + 2}", f"train.batch_size={args.batch}", "train.warmup_steps=0",
              "train.logging_steps=1000", "train.lr=1e-4", "loss.name=jsd", "loss.beta=0.5", "loss.alpha=1.0",
              f"data.seq_len={args.seq_len}"]  # fmt: skip
    arms = {
        "cache fused": lambda s, out: run_potstill(s, None, cache, data, common, out),
        "cache dense": lambda s, out: run_potstill(s, None, cache, data, [*common, "loss.fused=false"], out),
        "online fused": lambda s, out: run_potstill(s, teacher, None, data, common, out),
        "online dense": lambda s, out: run_potstill(s, teacher, None, data, [*common, "loss.fused=false"], out),
        "TRL GKD": lambda s, out: run_trl(s, teacher_model, data, args, out),
    }
    tokens = args.batch * args.seq_len
    print(f"student {args.student_hidden}x{args.layers}, teacher {args.teacher_hidden}x{args.layers}, "
          f"vocab {args.vocab}, batch {args.batch} x seq {args.seq_len} = {tokens} tokens/step, k = {args.k}, "
          f"{args.steps} timed steps, torch threads {torch.get_num_threads()}")  # fmt: skip
    steps: dict[str, list[float]] = {name: [] for name in arms}
    means: dict[str, list[float]] = {name: [] for name in arms}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name in list(arms) if r % 2 == 0 else list(reversed(arms)):
                student = llama(args.vocab, args.student_hidden, args.layers, args.seq_len, seed=0)
                timer = arms[name](student, os.path.join(tmp, f"{name.replace(' ', '_')}_{r}"))
                steps[name] += timer.times
                means[name].append(statistics.mean(timer.times))
                print(f"round {r + 1}: {name:13s} {means[name][-1]:.2f} s/step")
    rates = {name: tokens / statistics.median(times) for name, times in steps.items()}
    print("\n| arm | tokens/s | s/step (per-round means) | vs online dense | vs TRL GKD |\n|---|---:|---|---:|---:|")
    for name, rate in rates.items():
        spread = ", ".join(f"{m:.2f}" for m in means[name])
        vs = f"{rate / rates['online dense']:.2f} | {rate / rates['TRL GKD']:.2f}"
        print(f"| {name} | {rate:.0f} | {spread} | {vs} |")


if __name__ == "__main__":
    main()
