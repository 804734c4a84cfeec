"""`potstill teacher select`: rank candidate teachers for one student on one data set by measured fit.

For each candidate, on held-out text of every domain (`--eval`, or the last records of each domain of `--data`,
carved off so no probe trains on them):

- its bits per byte per domain (each model reads the text through its own tokenizer: comparable across them);
- its cost: parameters, forward ms per token (its own tokens) and per kB of text, and the memory scoring added to
  the process (peak RSS above the level before it was loaded; Linux `VmHWM`, reset through /proc/self/clear_refs);
- the student-teacher KL at the start: KL(p_teacher || q_student) per token on the student's ids for a teacher of
  the same tokenizer; for another tokenizer, on the positions whose tokens align one to one, over the shared
  vocabulary with one rest bucket per side (term (b) of docs/cross_tokenizer.md);
- a probe: the student distilled from it for `--probe-steps` steps (`potstill distill`, the same budget, seed and
  settings for every candidate), beside one CE-only probe. `gain` = held-out bpb of the CE probe - that of the
  candidate's probe (bits per byte the teacher's signal took off in the probe); `gap closed` = gain / (CE probe's
  bpb - teacher's bpb), the project's `gap_closed`.

Ranking signal: gain per unit of cost (`gain / teacher ms per kB`), the issue's "gap closure per unit of cost"
(candidates that did not beat the CE probe come last, by gain); absolute gain, not the closed fraction, since the
fraction favours weak teachers close to the student (docs/teachers.md). The best gain regardless of cost is named
too. Writes OUT/select.json, OUT/select.md, OUT/plots/teacher_select.png.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from potstill.errors import UserError
from potstill.fileio import atomic_path, write_json_atomic, write_text_atomic

_HWM = re.compile(r"VmHWM:\s*(\d+) kB")
_RSS = re.compile(r"VmRSS:\s*(\d+) kB")


def _status(pattern: re.Pattern) -> int | None:
    """A /proc/self/status figure in bytes (None off Linux)."""
    try:
        return int(pattern.search(Path("/proc/self/status").read_text())[1]) * 1024
    except (OSError, TypeError):
        return None


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        pass


def _resolved(path) -> Path:
    return Path(path).resolve()


def short_names(paths: list[Path]) -> list[str]:
    """Each path's shortest trailing part that no other path ends with (`t64/student`, `t128/student`)."""
    parts = [Path(p).resolve().parts for p in paths]

    def unique(i: int, depth: int) -> bool:
        return depth >= len(parts[i]) or all(q[-depth:] != parts[i][-depth:] for j, q in enumerate(parts) if j != i)

    return ["/".join(q[-next(d for d in range(1, len(q) + 1) if unique(i, d)) :]) for i, q in enumerate(parts)]


def split_data(data: list[Path], eval_files: list[Path], out: Path, eval_bytes: int) -> tuple[Path, Path]:
    """The probes' training file and the held-out file (OUT/data/{train,heldout}.jsonl).

    Without `eval_files`, the last records of each domain of `data` (at least `eval_bytes` bytes of text each) are
    held out, and the probes train on the rest.

    Raises:
        UserError: unreadable data; a domain with a single record (nothing left to train on or to hold out).
    """
    from potstill.data.sources import read_many

    read_many([*data, *eval_files])  # every file checked first: one-line errors naming the file and line
    rows = [json.loads(line) for path in data for line in Path(path).read_text().splitlines() if line.strip()]
    held: set[int] = set()
    if not eval_files:
        need = {r.get("domain", "default"): eval_bytes for r in rows}
        counts = {d: sum(r.get("domain", "default") == d for r in rows) for d in need}
        single = next((d for d, n in counts.items() if n < 2), None)
        if single is not None:
            raise UserError(f"--data: domain {single!r} has one record; give --eval, or more records to hold out")
        for i in reversed(range(len(rows))):
            domain = rows[i].get("domain", "default")
            if need[domain] > 0 and counts[domain] > 1:  # each domain keeps at least one record to train on
                need[domain] -= len(json.dumps(rows[i]).encode())
                counts[domain] -= 1
                held.add(i)
    root = out / "data"
    root.mkdir(parents=True, exist_ok=True)
    lines = lambda keep: "".join(json.dumps(r) + "\n" for i, r in enumerate(rows) if keep(i))  # noqa: E731
    write_text_atomic(root / "train.jsonl", lines(lambda i: i not in held))
    if eval_files:
        heldout = "".join(Path(p).read_text().rstrip("\n") + "\n" for p in eval_files)
    else:
        heldout = lines(lambda i: i in held)
    write_text_atomic(root / "heldout.jsonl", heldout)
    return root / "train.jsonl", root / "heldout.jsonl"


def measure_teacher(path: str, student, student_tok, id_map, heldout: Path, seq_len: int, batch_size: int) -> dict:
    """bpb per domain, cost and the student's KL at the start for one candidate (module docstring)."""
    import torch

    from potstill.data import collate, load_dataset
    from potstill.eval.bench import param_count
    from potstill.eval.metrics import evaluate
    from potstill.models.load import load_model
    from potstill.teacher.cross import CrossTokenizerTeacher, same_tokenizer
    from potstill.teacher.online import OnlineTeacher

    _reset_peak()
    before = _status(_RSS)
    model, tok = load_model(path)
    ds = load_dataset([heldout], tok, seq_len, True)
    began = time.perf_counter()
    ev = evaluate(model, ds, batch_size=batch_size, progress=False)
    seconds = time.perf_counter() - began
    peak = _status(_HWM)
    tokens, n_bytes = ev["overall"]["tokens"], ev["overall"]["bytes"]
    out = {
        "path": str(path),
        "params": param_count(model),
        "tokenizer": "same" if id_map is not None or same_tokenizer(student_tok, tok) else "cross",
        "bpb": ev["overall"]["bpb"],
        "bpb_by_domain": {d: m["bpb"] for d, m in ev["domains"].items()},
        "ms_per_token": 1000 * seconds / max(tokens, 1),
        "ms_per_kb": 1000 * seconds / max(n_bytes / 1000, 1e-9),
        "peak_mb": None if peak is None or before is None else (peak - before) / 2**20,
    }
    s_ds = load_dataset([heldout], student_tok, seq_len, True)
    if out["tokenizer"] == "same":
        kl = evaluate(student, s_ds, teacher=OnlineTeacher(model, id_map=id_map), batch_size=batch_size, progress=False)
        out["kl_start"], out["kl_positions"] = kl["overall"]["kl_to_teacher"], 1.0
        return out
    from potstill.losses import Divergence
    from potstill.losses.align import cross_tokenizer_terms
    from potstill.models.heads import head_of

    teacher = CrossTokenizerTeacher(model, student_tok, tok)
    weight, softcap = head_of(student)
    kd = one = scored = 0.0
    with torch.no_grad():
        for start in range(0, len(s_ds), batch_size):
            batch = collate([s_ds[i] for i in range(start, min(start + batch_size, len(s_ds)))])
            hidden = student(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True
            ).hidden_states[-1]
            terms = cross_tokenizer_terms(
                hidden.reshape(-1, hidden.shape[-1]),
                weight,
                teacher.targets_for(batch),
                Divergence(),
                num_tokens=1,
                softcap=softcap,
                seq_weight=0.0,
            )
            kd += float(terms.kd)  # summed KL over the 1:1 positions of the batch
            one += terms.stats["xtok_one_to_one"] * terms.n_tokens
            scored += terms.n_tokens
    out["kl_start"], out["kl_positions"] = (kd / one if one else None), one / max(scored, 1)
    return out


def probe(base, name: str, teacher: str | None, train: Path, out: Path) -> dict:
    """One probe run (`potstill distill`, CE only when `teacher` is None): its held-out student and wall time."""
    from potstill.config import load_config
    from potstill.train.recipes import run_distill

    run = out / "probes" / name.replace("/", "_")
    overrides = [
        f"model.student={base['student']}",
        f"data.train=[{train}]",
        "data.eval=[]",
        f"train.output_dir={run}",
        "train.overwrite=true",
        "data.mixing=null",
        *base["overrides"],
    ]
    overrides += [f"model.teacher={teacher}"] if teacher else ["model.teacher=null", "loss.alpha=0"]
    began = time.perf_counter()
    run_distill(load_config(base["config"], overrides))
    return {"run": str(run), "seconds": time.perf_counter() - began}


def select_teachers(
    candidates: list[Path],
    student: Path,
    data: list[Path],
    out: Path,
    eval_files: list[Path] = (),
    config: Path | None = None,
    overrides: list[str] = (),
    probe_steps: int = 30,
    seq_len: int = 256,
    batch_size: int = 8,
    eval_bytes: int = 20_000,
) -> dict:
    """Measure and probe every candidate, rank them, write the report (module docstring). Returns select.json."""
    from potstill.config import load_config
    from potstill.data import load_dataset
    from potstill.eval.metrics import evaluate
    from potstill.eval.report import gap_closed
    from potstill.models.load import load_model, quiet_hf_progress
    from potstill.models.vocab import load_id_map

    if not candidates:
        raise UserError("--candidates: give at least one teacher")
    twice = next((c for i, c in enumerate(candidates) if Path(c).resolve() in map(_resolved, candidates[:i])), None)
    if twice is not None:
        raise UserError(f"--candidates: {twice} is given twice")
    names = short_names(candidates)
    settings = [
        f"data.seq_len={seq_len}",
        f"train.max_steps={probe_steps}",
        f"train.batch_size={batch_size}",
        *overrides,
    ]
    # before anything is written: the output, the models and the probes' config (as `probe` will read it)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: --out exists and is not a directory")
    for path in (*candidates, student):
        if not Path(path).exists():
            raise UserError(f"{path}: no such model directory or GGUF file")
    load_config(config, [f"model.student={student}", f"data.train=[{data[0]}]", "model.teacher=null", *settings])
    out.mkdir(parents=True, exist_ok=True)
    train, heldout = split_data(data, list(eval_files), out, eval_bytes)
    base = {"student": str(student), "config": config, "overrides": settings}
    with quiet_hf_progress():
        model, tok = load_model(student)
        id_map = load_id_map(student)
        start = evaluate(model, load_dataset([heldout], tok, seq_len, True), batch_size=batch_size, progress=False)
        teachers = {
            n: measure_teacher(str(c), model, tok, id_map, heldout, seq_len, batch_size)
            for n, c in zip(names, candidates, strict=True)
        }
        del model
        runs = {"ce": probe(base, "ce", None, train, out)}
        runs |= {n: probe(base, n, str(c), train, out) for n, c in zip(names, candidates, strict=True)}
        probes = {}
        for n, r in runs.items():
            m, t = load_model(Path(r["run"]) / "student")
            ev = evaluate(m, load_dataset([heldout], t, seq_len, True), batch_size=batch_size, progress=False)
            probes[n] = {
                **r,
                "bpb": ev["overall"]["bpb"],
                "bpb_by_domain": {d: x["bpb"] for d, x in ev["domains"].items()},
            }
    ce = probes["ce"]["bpb"]
    for n, t in teachers.items():
        t["probe"] = probes[n]
        t["gain"] = ce - probes[n]["bpb"]
        t["gain_by_domain"] = {d: probes["ce"]["bpb_by_domain"][d] - b for d, b in probes[n]["bpb_by_domain"].items()}
        t["gap_closed"] = gap_closed(ce, probes[n]["bpb"], t["bpb"])
        t["score"] = t["gain"] / t["ms_per_kb"]
    # candidates that helped, by gain per cost; then the others by gain (a loss per cost would favour the dearest)
    ranked = sorted(
        teachers,
        key=lambda n: (
            teachers[n]["gain"] <= 0,
            -teachers[n]["score"] if teachers[n]["gain"] > 0 else -teachers[n]["gain"],
        ),
    )
    result = {
        "student": {
            "path": str(student),
            "bpb": start["overall"]["bpb"],
            "bpb_by_domain": {d: m["bpb"] for d, m in start["domains"].items()},
        },
        "ce_probe": probes["ce"],
        "candidates": teachers,
        "ranking": ranked,
        "best_gain": max(teachers, key=lambda n: teachers[n]["gain"]),
        "settings": {
            "probe_steps": probe_steps,
            "seq_len": seq_len,
            "batch_size": batch_size,
            "overrides": list(overrides),
            "config": None if config is None else str(config),
        },
    }
    result["recommendation"] = recommendation(result)
    write_json_atomic(out / "select.json", result)
    plot_select(out / "plots", result)
    write_text_atomic(out / "select.md", render_select(result))
    return result


def recommendation(result: dict) -> str:
    """One sentence: the best gain per cost, the best gain if another, or that no candidate beat CE-only."""
    c, top, best = result["candidates"], result["ranking"][0], result["best_gain"]
    if c[best]["gain"] <= 0:
        return (
            f"no candidate beat the CE-only probe (best gain {c[best]['gain']:+.4f} bpb, {best}): on this budget"
            " distillation from these teachers is not supported by the probe"
        )
    t = c[top]
    line = f"{top}: the most held-out bpb per unit of teacher cost ({t['gain']:+.4f} bpb at {t['ms_per_kb']:.1f} ms/kB)"
    if best != top:
        line += f"; for the best student regardless of cost, {best} ({c[best]['gain']:+.4f} bpb)"
    return line


def render_select(result: dict) -> str:
    """select.md: the ranked table, per-domain figures, the recommendation."""
    c = result["candidates"]
    domains = list(result["student"]["bpb_by_domain"])
    lines = [
        "# Teacher selection",
        "",
        f"Student: `{result['student']['path']}` (held-out bpb {result['student']['bpb']:.3f});"
        f" CE-only probe: {result['ce_probe']['bpb']:.3f} bpb after {result['settings']['probe_steps']} steps.",
        "",
        "| rank | teacher | tokenizer | params | teacher bpb | ms/token | ms/kB | peak MB | KL at start | probe bpb"
        " | gain | gap closed | gain per ms/kB |",
        "|---" * 13 + "|",
    ]
    for i, n in enumerate(result["ranking"], 1):
        t = c[n]
        peak = "" if t["peak_mb"] is None else f"{t['peak_mb']:.0f}"
        kl = (
            ""
            if t["kl_start"] is None
            else f"{t['kl_start']:.3f}" + ("" if t["tokenizer"] == "same" else f" ({100 * t['kl_positions']:.0f}% 1:1)")
        )
        closed = "" if t["gap_closed"] is None else f"{100 * t['gap_closed']:.1f}%"
        lines.append(
            f"| {i} | {n} | {t['tokenizer']} | {t['params'] / 1e6:.2f}M | {t['bpb']:.3f} | {t['ms_per_token']:.2f}"
            f" | {t['ms_per_kb']:.1f} | {peak} | {kl} | {t['probe']['bpb']:.3f} | {t['gain']:+.4f} | {closed}"
            f" | {1000 * t['score']:+.3f}e-3 |"
        )
    lines += [
        "",
        "Per domain (teacher bpb / probe gain):",
        "",
        "| teacher | " + " | ".join(domains) + " |",
        "|---" * (len(domains) + 1) + "|",
    ]
    for n in result["ranking"]:
        cells = [f"{c[n]['bpb_by_domain'][d]:.3f} / {c[n]['gain_by_domain'][d]:+.4f}" for d in domains]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += ["", f"**Recommendation:** {result['recommendation']}.", "", "![](plots/teacher_select.png)", ""]
    return "\n".join(lines)


def plot_select(plots_dir: Path, result: dict) -> None:
    """plots/teacher_select.png: probe gain against teacher cost, and each teacher's bpb per domain."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = result["candidates"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for n, t in c.items():
        left.scatter(t["ms_per_kb"], t["gain"])
        left.annotate(n, (t["ms_per_kb"], t["gain"]), textcoords="offset points", xytext=(4, 4))
    left.axhline(0, color="grey", linewidth=0.8)
    left.set(
        xlabel="teacher cost (forward ms per kB of text)",
        ylabel="probe gain over CE-only (bpb)",
        title="Probe gain per cost",
    )
    domains = list(result["student"]["bpb_by_domain"])
    width = 0.8 / (len(c) + 1)
    bars = {"student": result["student"]["bpb_by_domain"], **{n: t["bpb_by_domain"] for n, t in c.items()}}
    for i, (n, by) in enumerate(bars.items()):
        right.bar([j + i * width for j in range(len(domains))], [by[d] for d in domains], width, label=n)
    right.set_xticks([j + 0.4 - width / 2 for j in range(len(domains))], domains)
    right.set(ylabel="held-out bpb", title="Teachers (and the student at the start) per domain")
    right.legend(fontsize=8)
    fig.tight_layout()
    plots_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(plots_dir / "teacher_select.png") as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
