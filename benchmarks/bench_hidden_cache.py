"""The exact hidden-state cache vs the top-k cache vs the online teacher, on the demo's pair.

Teacher: Gemma 3 270M (`potstill teacher prepare`, the demo's GGUF, cached). Student: the demo's recipe at a small
scale, a 6-layer depth-pruned, vocabulary-trimmed copy (`potstill student init --layers 6`) over a corpus built
like the demo's (`potstill.data.corpus.build_corpus`, `--corpus-bytes` per domain). Both caches are built over the
same few thousand tokens (the first `--rows` packed rows of 128 tokens, the demo's `data.seq_len`):

- top-k: `cache build --k 64 --encoding compact` (the default encoding);
- hidden: `cache build --targets hidden` (bf16 final states, the teacher's head at train time).

Then three `DistillTrainer`s, built exactly as `potstill distill` builds them (`load_models`, `open_cache`), from the
same student weights, run `training_step` (forward + loss + backward, the demo's loss settings: fkl, T = 1,
alpha = 0.5, bf16 mixed precision, teacher in bf16) on the same batch of 8 x 128 tokens. The arms are interleaved
(one step of each per round, the order rotated every round) so load drift on a shared machine cannot favour one;
the median per arm is reported, with its ratio to the online teacher.

Run: `OMP_NUM_THREADS=1 python benchmarks/bench_hidden_cache.py --work DIR` (needs the `demo` extra). On 2 cores
at load 3-10 the student's layer scoring took 17 minutes, each cache 2-3, one step of 8 x 128 tokens 100-200 s
(a round of the three arms: ~7 minutes); `--work` keeps the corpus, student and caches, so a rerun only times the
steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from potstill.config import load_config
from potstill.data import collate, read_jsonl
from potstill.data.corpus import build_corpus
from potstill.models.load import prepare_teacher
from potstill.student.init import init_student
from potstill.teacher.cache import TeacherCache, build_cache
from potstill.train.setup import load_data, load_models, open_cache, training_args
from potstill.train.trainer import DistillTrainer, IndexedDataset

SEQ_LEN, BATCH = 128, 8
ARMS = ("online", "topk cache", "hidden cache")


def prepare(work: Path, corpus_bytes: int, rows: int) -> tuple[Path, Path, Path]:
    """(teacher dir, student dir, data file of ~rows x SEQ_LEN tokens) under `work` (reused when present)."""
    teacher = prepare_teacher(check=False)
    corpus = work / "corpus"
    if not (corpus / "corpus.json").is_file():
        build_corpus(corpus, seed=0, train_bytes=corpus_bytes, heldout_bytes=2_000)
    texts = [r.text for r in read_jsonl(corpus / "train.jsonl")]
    student = work / "student"
    if not student.is_dir():
        init_student(teacher, 6, student, texts, calib_tokens=1024, calib_dtype="bfloat16")
    data = work / "bench.jsonl"
    # ~4.5 characters per token on this corpus: enough text for `rows` packed rows
    data.write_text("\n".join(json.dumps({"text": t}) for t in _head(texts, rows * SEQ_LEN * 5)) + "\n")
    return teacher, student, data


def _head(texts: list[str], chars: int) -> list[str]:
    out, total = [], 0
    for text in texts:
        out.append(text[: chars - total])
        total += len(out[-1])
        if total >= chars:
            break
    return out


def arm_trainer(arm: str, teacher: Path, student: Path, data: Path, caches: dict[str, Path], out: Path):
    """A DistillTrainer for `arm` and its batch of BATCH rows (with `index` for a cache)."""
    overrides = [
        f"model.student={student}",
        f"model.teacher={teacher}",
        "model.teacher_dtype=bfloat16",
        f"data.train=[{data}]",
        f"data.seq_len={SEQ_LEN}",
        "loss.name=fkl",
        "loss.temperature=1.0",
        "loss.alpha=0.5",
        f"train.batch_size={BATCH}",
        "train.mixed_precision=bf16",
        f"train.output_dir={out / arm.replace(' ', '_')}",
    ]
    if arm != "online":
        overrides += ["teacher.source=cache", f"teacher.cache={caches[arm]}"]
    cfg = load_config(None, overrides)
    models = load_models(cfg)
    train_ds, _ = load_data(cfg, models.tokenizer)
    cache = open_cache(cfg, models.tokenizer, train_ds)
    trainer = DistillTrainer(
        model=models.student,
        args=training_args(cfg),
        teacher=models.teacher,
        teacher_cache=cache,
        loss_cfg=cfg.loss,
    )
    ds = train_ds if cache is None else IndexedDataset(train_ds)
    batch = collate([ds[i] for i in range(BATCH)])
    got, count = trainer.get_batch_samples(iter([batch]), 1, trainer.args.device)
    return trainer, got[0], count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=None, help="work directory (default: a temporary one)")
    parser.add_argument("--corpus-bytes", type=int, default=40_000, help="corpus text per domain for the student")
    parser.add_argument("--rows", type=int, default=32, help="packed rows of 128 tokens the caches cover")
    parser.add_argument("--rounds", type=int, default=3, help="timed steps per arm (after one warm-up)")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        teacher, student, data = prepare(work, args.corpus_bytes, args.rows)
        common = dict(seq_len=SEQ_LEN, add_bos=True, student=student, batch_size=8, dtype="bfloat16", progress=False)
        caches = {
            "topk cache": build_cache(teacher, [data], work / "topk", k=64, encoding="compact", **common),
            "hidden cache": build_cache(teacher, [data], work / "hidden", targets="hidden", **common),
        }
        print("| cache | tokens | bytes | bytes/token |\n|---|---|---|---|")
        for name, path in caches.items():
            m = TeacherCache(path).manifest
            print(f"| {name} | {m['tokens']} | {m['bytes']} | {m['bytes_per_token']:.1f} |", flush=True)
        arms = {arm: arm_trainer(arm, teacher, student, data, caches, work / "runs") for arm in ARMS}
        times: dict[str, list[float]] = {arm: [] for arm in ARMS}
        for r in range(args.rounds + 1):
            for arm in ARMS[r % 3 :] + ARMS[: r % 3]:
                trainer, batch, count = arms[arm]
                trainer.model.zero_grad(set_to_none=True)
                start = time.perf_counter()
                trainer.training_step(trainer.model, batch, count)
                if r:  # round 0 warms up
                    times[arm].append(time.perf_counter() - start)
        base = statistics.median(times["online"])
        print(f"\n| arm | median step (s), {BATCH} x {SEQ_LEN} tokens | vs online | steps |\n|---|---|---|---|")
        for arm in ARMS:
            med = statistics.median(times[arm])
            print(f"| {arm} | {med:.2f} | {med / base:.2f}x | {', '.join(f'{t:.2f}' for t in times[arm])} |")


if __name__ == "__main__":
    main()
