"""Experiment: label-only fine-tuning vs Distilling step-by-step on a synthetic two-step arithmetic task.

Task: "a + b * c" with digits 0-9; label = a + b*c. A rule-based teacher writes a correct rationale
("b * c = p. a + p = y."). The same tiny random Llama student (from scratch), the same training budget
(steps, batch, lr) and the same examples: label-only (rationale_weight = 0) vs step-by-step
(rationale_weight = 1) on 10/25/50/100% of the training set. Metric: exact-match label accuracy on a
held-out set, greedy, label task only. Run: `python benchmarks/step_by_step.py [--steps N] [--train N]`.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from potstill.config import DistillConfig, validate_config
from potstill.models.load import load_model
from potstill.train.recipes import run_distill
from potstill.train.step_by_step import predict_labels


def example(rng: random.Random) -> dict[str, str]:
    a, b, c = (rng.randint(0, 9) for _ in range(3))
    p = b * c
    return {"input": f"{a} + {b} * {c}", "label": str(a + p), "rationale": f"{b} * {c} = {p}. {a} + {p} = {a + p}."}


def tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")  # one token per character
    tok.decoder = decoders.Fuse()
    tok.train_from_iterator(
        texts, trainers.BpeTrainer(vocab_size=64, special_tokens=["<pad>", "<bos>", "<eos>", "<unk>"])
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )


def student_dir(root: Path, tok, seed: int) -> Path:
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    path = root / "student0"
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def run(root: Path, student: Path, train: list[dict], weight: float, steps: int, name: str) -> Path:
    data = root / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in train))
    raw = {
        "model": {"student": str(student)},
        "loss": {"alpha": 0.0, "rationale_weight": weight},
        "data": {"train": [str(data)], "seq_len": 64},
        "train": {
            "output_dir": str(root / name),
            "max_steps": steps,
            "batch_size": 32,
            "lr": 3e-3,
            "warmup_steps": 20,
            "logging_steps": 50,
            "seed": 0,
        },
    }
    return run_distill(validate_config(raw, DistillConfig)) / "student"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=400, help="examples in the full training set")
    ap.add_argument("--test", type=int, default=300)
    ap.add_argument("--steps", type=int, default=400)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rng = random.Random(0)
    pool = [example(rng) for _ in range(args.train + args.test)]
    train_all, test = pool[: args.train], pool[args.train :]
    tok = tokenizer([f"[label] [rationale] {r['input']} {r['rationale']}" for r in pool])
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        student = student_dir(root, tok, seed=0)
        for frac in (0.1, 0.25, 0.5, 1.0):
            train = train_all[: int(frac * args.train)]
            row = {"fraction": frac, "examples": len(train)}
            for name, weight in (("label_only", 0.0), ("step_by_step", 1.0)):
                start = time.time()
                model, t = load_model(run(root, student, train, weight, args.steps, f"{name}-{frac}"))
                answers = predict_labels(model, t, [r["input"] for r in test], max_tokens=3, batch_size=64)
                row[name] = sum(a == r["label"] for a, r in zip(answers, test, strict=True)) / len(test)
                row[f"{name}_s"] = round(time.time() - start, 1)
            results.append(row)
            print(json.dumps(row), flush=True)
    print("| data | examples | label-only acc | step-by-step acc |\n|---|---|---|---|")
    for r in results:
        print(f"| {r['fraction']:.0%} | {r['examples']} | {r['label_only']:.3f} | {r['step_by_step']:.3f} |")


if __name__ == "__main__":
    main()
