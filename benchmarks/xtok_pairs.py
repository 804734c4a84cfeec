"""Issue 16 measure (a): cross-tokenizer KD vs its CE-only twin on the real pair, both directions, bpb per domain.

- pair a: a student with the SmolLM2 tokenizer (SmolLM2-135M-Instruct cut to 6 evenly spaced layers, vocabulary
  trimmed to the corpus) distilled from Gemma 3 270M;
- pair b: a student with the Gemma tokenizer (Gemma 3 270M cut to 4 layers, vocabulary trimmed) distilled from
  SmolLM2-135M-Instruct.

The teacher runs once per pair into a cross-tokenizer cache (`potstill cache build --student`, k = 64, compact); the
KD arm trains from it (`teacher.source: cache`, fkl, alpha 0.5, T = 1), the CE arm is the same run with alpha 0. Both
arms: the same packed data, 35 steps of 4 x 128 tokens, lr 3e-4 cosine, bf16 autocast, the same seed. Held-out
bits per byte per domain (eval.json of each run): the demo's corpus (stdlib code, docstrings, docs) and a non-code
domain (the licenses of /usr/share/common-licenses, split by file).

Steps (each one a command; on the shared 2-core machine they were run as separate background jobs):

    python benchmarks/xtok_pairs.py data --work DIR
    python benchmarks/xtok_pairs.py students --work DIR
    python benchmarks/xtok_pairs.py cache a --work DIR        # and b
    python benchmarks/xtok_pairs.py arm a kd 0 --work DIR     # pair, kd|ce, seed
    python benchmarks/xtok_pairs.py table --work DIR          # the table of the runs that finished
    python benchmarks/xtok_pairs.py diagnose b --work DIR     # the cache's teacher side vs the untrained student

The real budget (issue 16 follow-up): `arm a kd 0 --steps 200 --lr 1e-3` (about 6.5 passes over the cached text);
such runs also score a validation split (`val-*`: training-corpus pieces outside the cached text), on which
`table` picks each arm's learning rate before it compares held-out bpb.

Models: GEMMA and SMOLLM2 (environment) or the defaults under /work/assets (HF dirs converted from the GGUFs).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

GEMMA = os.environ.get("GEMMA", "/work/assets/cache/models/a5fd3b62230aa5ec-gemma-3-270m-q4_k_m")
SMOLLM2 = os.environ.get("SMOLLM2", "/work/assets/cache/models/b179c9523d0e6a0f-SmolLM2-135M-Instruct.Q4_1")
PAIRS = {  # pair: (student, its source model, layers, teacher)
    "a": ("smol6", SMOLLM2, 6, GEMMA),
    "b": ("gemma4", GEMMA, 4, SMOLLM2),
}
DOMAINS = ("code", "docstrings", "docs", "licenses")
TRAIN_BYTES = 62_000  # the training text (both pairs): ~120 packed sequences of 128 tokens
STEPS, BATCH, SEQ_LEN = 35, 4, 128


def _cli(*args: str) -> None:
    cmd = [sys.executable, "-m", "potstill.cli", *args]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def data(work: Path) -> None:
    """The demo's corpus (small caps) + licenses, shuffled into one training file; held-out per domain."""
    from potstill.data.corpus import build_corpus

    out = work / "data"
    build_corpus(out / "stdlib", seed=0, heldout_frac=0.1, train_bytes=60_000, heldout_bytes=12_000, doc_bytes=4000)
    train, held = [], []
    for path in sorted(Path("/usr/share/common-licenses").iterdir()):
        if not path.is_file():
            continue
        pieces, cur = [], ""
        for line in path.read_text(errors="replace").splitlines(keepends=True):
            if len(cur) + len(line) > 4000 and cur:
                pieces, cur = [*pieces, cur], ""
            cur += line
        pieces += [cur] if cur else []
        split = held if int(hashlib.sha256(path.name.encode()).hexdigest(), 16) % 100 < 15 else train
        split.extend({"text": p, "domain": "licenses"} for p in pieces)
    rows = [json.loads(line) for line in open(out / "stdlib/train.jsonl")] + _cap(train, 60_000)
    random.Random(0).shuffle(rows)
    _write(out / "train.jsonl", rows)  # the students' vocabulary is trimmed to all of it
    _write(out / "train_small.jsonl", _cap(rows, TRAIN_BYTES))
    heldout = [json.loads(line) for line in open(out / "stdlib/heldout.jsonl")] + _cap(held, 12_000)
    for domain in DOMAINS:
        _write(out / f"heldout-{domain}.jsonl", [r for r in heldout if r["domain"] == domain])
    # validation: training-corpus pieces the arms never see (outside train_small), about 8 kB per domain
    seen = {r["text"] for r in _cap(rows, TRAIN_BYTES)}
    for domain in DOMAINS:
        val = [{"text": r["text"], "domain": f"val-{domain}"} for r in rows if r["domain"] == domain]
        _write(out / f"val-{domain}.jsonl", _cap([r for r in val if r["text"] not in seen], 8000))


def _cap(rows: list[dict], limit: int) -> list[dict]:
    out, size = [], 0
    for row in rows:
        if size >= limit:
            break
        out.append(row)
        size += len(row["text"].encode())
    return out


def _write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def students(work: Path) -> None:
    for name, source, layers, _ in PAIRS.values():
        corpus = str(work / "data/train.jsonl")
        _cli("student", "init", "--teacher", source, "--layers", str(layers), "--select", "even",
             "--corpus", corpus, "--out", str(work / "students" / name), "--overwrite")  # fmt: skip


def cache(work: Path, pair: str) -> None:
    name, _, _, teacher = PAIRS[pair]
    out = str(work / "caches" / pair)
    _cli("cache", "build", "--teacher", teacher, "--student", str(work / "students" / name),
         "--data", str(work / "data/train_small.jsonl"), "--out", out, "--seq-len", str(SEQ_LEN), "--k", "64",
         "--dtype", "bfloat16", "--batch-size", "4", "--shard-tokens", "2048")  # fmt: skip
    _cli("cache", "verify", out)


def arm(work: Path, pair: str, kind: str, seed: int, steps: int = STEPS, lr: float = 3e-4) -> None:
    name = PAIRS[pair][0]
    teacher = ["teacher.source=cache", f"teacher.cache={work / 'caches' / pair}", "loss.alpha=0.5"]
    files = [f"heldout-{d}.jsonl" for d in DOMAINS]
    if steps != STEPS:  # the real budget: the validation split too (it picks the lr), its own run names
        files += [f"val-{d}.jsonl" for d in DOMAINS]
    evals = ",".join(str(work / "data" / f) for f in files)
    run = f"{pair}-{kind}-s{seed}" + ("" if steps == STEPS else f"-lr{lr:g}-n{steps}")
    _cli("distill", f"model.student={work / 'students' / name}", "train.mixed_precision=bf16",
         f"data.train=[{work / 'data/train_small.jsonl'}]", f"data.eval=[{evals}]", f"data.seq_len={SEQ_LEN}",
         f"train.batch_size={BATCH}", f"train.max_steps={steps}", f"train.lr={lr:g}",
         f"train.warmup_steps={max(3, steps // 10)}", "train.scheduler=cosine",
         f"train.logging_steps={max(5, steps // 8)}", "train.save_steps=0", f"train.seed={seed}",
         f"train.output_dir={work / 'runs' / run}",
         *(teacher if kind == "kd" else ["loss.alpha=0"]))  # fmt: skip


def table(work: Path) -> None:
    """bpb per domain of every finished run, and KD - CE per pair, seed and budget (negative: KD better); at the
    real budget each arm at the learning rate with the lowest mean validation bpb."""
    runs = {}
    for path in sorted((work / "runs").glob("*/eval.json")):
        runs[path.parent.name] = json.loads(path.read_text())["domains"]
    val = [f"val-{d}" for d in DOMAINS]
    print(f"{'run':<24}" + "".join(f"{d:>12}" for d in DOMAINS) + f"{'val mean':>12}")
    for run, domains in runs.items():
        mean = sum(domains[v]["bpb"] for v in val) / len(val) if val[0] in domains else float("nan")
        print(f"{run:<24}" + "".join(f"{domains[d]['bpb']:>12.4f}" for d in DOMAINS) + f"{mean:>12.4f}")
    best = {}  # (pair, kind, seed, budget) -> the run with the lowest validation mean (or the only one)
    for run, domains in runs.items():
        pair, kind, seed, *rest = run.split("-")
        budget = rest[-1] if rest else f"n{STEPS}"
        mean = sum(domains[v]["bpb"] for v in val) / len(val) if val[0] in domains else 0.0
        key = (pair, kind, seed, budget)
        if key not in best or mean < best[key][1]:
            best[key] = (run, mean)
    print("KD - CE (bpb; < 0: KD better), each arm at its best lr on the validation split")
    for (pair, kind, seed, budget), (run, _) in sorted(best.items()):
        twin = best.get((pair, "ce", seed, budget))
        if kind == "kd" and twin:
            diffs = [runs[run][d]["bpb"] - runs[twin[0]][d]["bpb"] for d in DOMAINS]
            print(f"{pair} {seed} {budget:<5} {run} vs {twin[0]}:" + "".join(f"{x:>+9.4f}" for x in diffs))


def diagnose(work: Path, pair: str, n: int = 16) -> None:
    """What the KD arm of a pair learns from, on its first n cached sequences: the teacher's bits per byte (term
    (a)'s log-likelihoods), the share of 1:1 tokens, how often the teacher's most probable shared id is the text's
    next token, the teacher mass outside the cached top-k, and the untrained student's mean log-prob per token."""
    import math

    import torch

    from potstill.data import load_dataset
    from potstill.losses.align import one_to_one
    from potstill.models.load import load_model
    from potstill.teacher.cache.cross import CrossCache
    from potstill.teacher.cache.reader import TeacherCache

    model, tok = load_model(str(work / "students" / PAIRS[pair][0]))
    data = load_dataset([str(work / "data/train_small.jsonl")], tok, SEQ_LEN)
    batch = {k: getattr(data, k)[:n] for k in ("input_ids", "attention_mask", "labels")}
    batch["index"] = torch.arange(n)
    targets = CrossCache(TeacherCache(work / "caches" / pair), tok).targets_for(batch)
    al, teacher = targets.align, targets.teacher
    scored, _ = al.scored_groups()
    nats = float(-teacher.logp[scored[al.t_group] & al.t_ok].sum())
    s_tok, t_tok = one_to_one(al)
    views = teacher.views.rows(t_tok)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    logp = torch.log_softmax(logits.reshape(-1, logits.shape[-1]), -1)[al.s_rows[al.s_ok], al.s_ids[al.s_ok]]
    print(f"pair {pair}, {n} cached sequences, {int(al.s_ok.sum())} scored student tokens")
    print(f"teacher bits per byte (its log-likelihoods): {nats / int(data.n_bytes[:n].sum()) / math.log(2):.3f}")
    print(f"1:1 tokens: {len(s_tok) / int(al.s_ok.sum()):.1%}")
    print(f"teacher's top shared id = the next token: {float((views.ids[:, 0] == al.s_ids[s_tok]).float().mean()):.1%}")
    print(f"teacher mass outside the cached top-{views.k}: {float(views.tail.mean()):.3f}")
    print(f"untrained student: mean log-prob per token {float(logp.mean()):.2f} nats")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["data", "students", "cache", "arm", "table", "diagnose"])
    parser.add_argument("args", nargs="*")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=STEPS, help="arm: optimizer steps")
    parser.add_argument("--lr", type=float, default=3e-4, help="arm: peak learning rate")
    a = parser.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    if a.step == "cache":
        cache(a.work, *a.args)
    elif a.step == "diagnose":
        diagnose(a.work, a.args[0])
    elif a.step == "arm":
        arm(a.work, a.args[0], a.args[1], int(a.args[2]), a.steps, a.lr)
    else:
        {"data": data, "students": students, "table": table}[a.step](a.work)


if __name__ == "__main__":
    main()
