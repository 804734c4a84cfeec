"""Why does KD not beat CE for the speech student? Arms of one budget on one teacher cache, per seed.

Every arm trains the same student (made once: the teacher's layers, a trimmed vocabulary) on the same cached
teacher targets (built by `benchmarks/speech_distill.py` or `build_speech_targets` at the largest k and with
every clip kept), and is evaluated on the held-out synthetic clips and the real recordings (WER per domain,
batched greedy decoding; real-time factors: `--rtf`). An arm is a set of overrides of DEFAULT (the recipe as
it was before this study, T = 1; the recipe's default is now T = 2, the arm kd_T2):

    alpha (KD weight), k (top-k of the cache, by truncation), max_wer (teacher WER filter; inf = off),
    lr, epochs, loss (divergence), T (needs a cache built at that temperature: --targets-t2)

    python benchmarks/speech_study.py --run runs/speech --targets runs/speech/targets_k256 \\
        --arms ce kd kd_a0.9 ... --seeds 0 1

Results go to RUN/study/<arm>_seed<s>/ (trained models, reused) and RUN/study/study.json / study.md.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from potstill.data.audio import read_audio_jsonl, word_error_rate
from potstill.data.speech_corpus import real_recordings
from potstill.eval.speech import evaluate_speech
from potstill.fileio import write_json_atomic, write_text_atomic
from potstill.losses import Divergence
from potstill.models.whisper import load_whisper
from potstill.student.speech import init_speech_student
from potstill.teacher.speech import keep_clips, read_speech_targets, transcribe
from potstill.train.speech import SpeechTrainConfig, train_speech_student

DEFAULT = {"alpha": 0.5, "k": 64, "max_wer": 0.2, "lr": 3e-4, "epochs": 20, "loss": "fkl", "T": 1.0}
ARMS = {
    "ce": {"alpha": 0.0},
    "kd": {},
    "kd_a0.9": {"alpha": 0.9},
    "kd_a1": {"alpha": 1.0},
    "kd_k8": {"k": 8},
    "kd_k256": {"k": 256},
    "kd_T2": {"T": 2.0},
    "kd_rkl": {"loss": "rkl"},
    "ce_nofilter": {"alpha": 0.0, "max_wer": math.inf},
    "kd_nofilter": {"max_wer": math.inf},
    "kd_a0.9_nofilter": {"alpha": 0.9, "max_wer": math.inf},
    "ce_lr1e-3": {"alpha": 0.0, "lr": 1e-3},
    "kd_lr1e-3": {"lr": 1e-3},
    "ce_lr1e-4": {"alpha": 0.0, "lr": 1e-4},
    "kd_lr1e-4": {"lr": 1e-4},
}


def wer_per_domain(model_dir: Path, records) -> dict:
    """Held-out WER per domain and overall (greedy, batches of 8)."""
    model, processor = load_whisper(model_dir)
    hyps = processor.tokenizer.batch_decode(
        transcribe(model, processor, records, batch_size=8), skip_special_tokens=True
    )
    out = {}
    for domain in sorted({r.domain for r in records}):
        pairs = [(r.text, h) for r, h in zip(records, hyps, strict=True) if r.domain == domain]
        out[domain] = word_error_rate([p for p, _ in pairs], [h for _, h in pairs])
    out["overall"] = word_error_rate([r.text for r in records], hyps)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="recipe directory (teacher/, data/)")
    ap.add_argument("--targets", type=Path, required=True, help="teacher targets directory, every clip kept, largest k")
    ap.add_argument("--targets-t2", type=Path, default=None, help="the same at temperature 2")
    ap.add_argument("--arms", nargs="+", default=["ce", "kd"], choices=sorted(ARMS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--vocab-size", type=int, default=12288)
    ap.add_argument("--rtf", nargs="+", default=None, help="instead: real-time factors of these models (RUN/NAME)")
    ap.add_argument("--rtf-clips", type=int, default=10, help="with --rtf: first N synthetic + every real clip")
    args = ap.parse_args()
    torch.set_num_threads(1)
    study = args.run / "study"
    heldout = read_audio_jsonl(args.run / "data" / "heldout.jsonl") + real_recordings()
    if args.rtf:
        clips = heldout[: args.rtf_clips] + real_recordings()
        return real_time_factors([args.run / name for name in args.rtf], clips, study / "rtf.json")
    every = read_speech_targets(args.targets)
    student = study / "student_init"
    if not (student / "config.json").is_file():
        init_speech_student(args.run / "teacher", student, corpus_ids=every.ids, vocab_size=args.vocab_size)
    results_path = study / "study.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    for seed in args.seeds:
        for arm in args.arms:
            name = f"{arm}_seed{seed}"
            if name in results:
                continue
            hp = {**DEFAULT, **ARMS[arm]}
            source = every if hp["T"] == 1.0 else read_speech_targets(args.targets_t2)
            cut = [t.truncate(hp["k"]) for t in source.targets]
            targets = keep_clips(replace(source, targets=cut), hp["max_wer"])
            cfg = SpeechTrainConfig(
                alpha=hp["alpha"],
                divergence=Divergence(name=hp["loss"], temperature=hp["T"]),
                epochs=hp["epochs"],
                lr=hp["lr"],
                seed=seed,
            )
            start, start_cpu = time.perf_counter(), time.process_time()
            summary = train_speech_student(student, targets, study / name, cfg)
            train_s, train_cpu = time.perf_counter() - start, time.process_time() - start_cpu
            wer = wer_per_domain(study / name, heldout)
            results[name] = {
                "arm": arm,
                "seed": seed,
                "hp": {k: (str(v) if v == math.inf else v) for k, v in hp.items()},
                "clips": len(targets.records),
                "wer": wer,
                "train_s": round(train_s, 1),
                "train_cpu_s": round(train_cpu, 1),
                "eval_s": round(time.perf_counter() - start - train_s, 1),
                "loss_last_epoch": summary["loss_last_epoch"],
                "finished": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                "load": Path("/proc/loadavg").read_text().split()[:3],
            }
            print(name, json.dumps(results[name]), flush=True)
            results = {**(json.loads(results_path.read_text()) if results_path.is_file() else {}), **results}
            write_json_atomic(results_path, results)
    write_text_atomic(study / "study.md", markdown(results))
    print(markdown(results))


def real_time_factors(models: list[Path], clips, out: Path) -> None:
    """`eval.speech.evaluate_speech` (each clip alone, wall and CPU real-time factor) of each model, in one process."""
    results = {}
    for model in models:
        r = evaluate_speech(model, clips)
        results[model.name] = {
            key: r[key] for key in ("params", "weights_mb", "rtf", "rtf_cpu", "audio_seconds", "wer")
        }
        print(model.name, json.dumps(results[model.name]), flush=True)
    first = results[models[0].name]
    for name, r in results.items():
        print(
            f"{name}: RTF wall {r['rtf']:.3f} CPU {r['rtf_cpu']:.3f}, CPU speed-up vs {models[0].name} "
            f"{first['rtf_cpu'] / r['rtf_cpu']:.2f}x, size {r['params'] / first['params']:.2f}x"
        )
    results["date"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    results["load"] = Path("/proc/loadavg").read_text().split()[:3]
    write_json_atomic(out, results)


def markdown(results: dict) -> str:
    arms = sorted({r["arm"] for r in results.values()}, key=list(ARMS).index)
    domains = sorted({d for r in results.values() for d in r["wer"]})
    lines = [
        "| arm | clips | " + " | ".join(f"WER {d} % (mean ± sd)" for d in domains) + " | seeds |",
        "|---|---|" + "---|" * (len(domains) + 1),
    ]
    for arm in arms:
        runs = [r for r in results.values() if r["arm"] == arm]
        cells = []
        for d in domains:
            values = [100 * r["wer"][d] for r in runs]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.fmean(values):.1f} ± {sd:.1f} ({', '.join(f'{v:.1f}' for v in values)})")
        lines.append(f"| {arm} | {runs[0]['clips']} | " + " | ".join(cells) + f" | {len(runs)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
