"""The report of a teacher-vs-students comparison: report.json, report.md and PNG plots.

Inputs are plain dicts, so any run can be reported, not only the demo's:

```
results = {
  "models": {"teacher": M, "student_kd": M, "student_ce": M},   # M: {"path", "params",
                                                                 #     "latency_ms_per_token", "eval": eval.json}
  "curves": {"student_kd": [{"step", "loss", ...}], ...},         # optional: training logs (loss per step)
  "settings": {...}, "timings_s": {...},                          # optional: shown as they are
}
```

`summarize(results)` makes report.json: per model `params`, `ppl`, `bpb`, `top1_agreement`,
`kl_to_teacher`, `latency_ms_per_token`, per-domain bpb; the ratios (`param_ratio` = student / teacher,
`speedup` = teacher latency / student latency) and `gap_closed` = (bpb_ce - bpb_kd) / (bpb_ce - bpb_teacher),
overall and per domain: the share of the CE-only student's distance to the teacher that distillation removed.
"""

from __future__ import annotations

import json
from pathlib import Path

from potstill.fileio import atomic_path, jsonl_objects, write_json_atomic, write_text_atomic

STUDENTS = ("student_kd", "student_ce")
MODELS = ("teacher", *STUDENTS)
_METRICS = ("ppl", "bpb", "top1_agreement", "kl_to_teacher")
# The issue's targets: the student is <= 1/5 of the teacher's size, >= 3x faster, and KD closes >= 30%.
TARGETS = {"max_param_ratio": 0.2, "min_speedup": 3.0, "min_gap_closed": 0.3}
# Below this gap (bpb) there is nothing to close: the ratio would divide by noise (the students train on text of
# the held-out domains; the teacher never did, so a student can reach or pass it on one of them).
MIN_GAP_BPB = 0.01


def gap_closed(bpb_ce: float, bpb_kd: float, bpb_teacher: float) -> float | None:
    """(bpb_ce - bpb_kd) / (bpb_ce - bpb_teacher); None when the CE student is within MIN_GAP_BPB of the teacher
    (or better)."""
    gap = bpb_ce - bpb_teacher
    return (bpb_ce - bpb_kd) / gap if gap >= MIN_GAP_BPB else None


def summarize(results: dict) -> dict:
    """The content of report.json (see the module docstring for `results`)."""
    models = results["models"]
    summary: dict = {"models": {name: _model_summary(models[name]) for name in MODELS}}
    teacher, kd, ce = (summary["models"][n] for n in MODELS)
    domains = sorted(set(kd["domains"]) & set(ce["domains"]) & set(teacher["domains"]))
    per_domain = {d: gap_closed(ce["domains"][d], kd["domains"][d], teacher["domains"][d]) for d in domains}
    ratios = {
        "param_ratio": kd["params"] / teacher["params"],
        "speedup": _ratio(teacher["latency_ms_per_token"], kd["latency_ms_per_token"]),
        "gap_closed": gap_closed(ce["bpb"], kd["bpb"], teacher["bpb"]),
        "gap_closed_by_domain": per_domain,
    }
    kd_wins = {d: kd["domains"][d] < ce["domains"][d] for d in domains}
    summary["ratios"] = ratios
    summary["kd_better_than_ce"] = {"overall": kd["bpb"] < ce["bpb"], "by_domain": kd_wins}
    summary["targets"] = {
        "param_ratio_le_0.2": ratios["param_ratio"] <= TARGETS["max_param_ratio"],
        "speedup_ge_3": ratios["speedup"] is not None and ratios["speedup"] >= TARGETS["min_speedup"],
        "kd_better_every_domain": bool(kd_wins) and all(kd_wins.values()),
        "gap_closed_ge_0.3": ratios["gap_closed"] is not None and ratios["gap_closed"] >= TARGETS["min_gap_closed"],
    }
    for key in ("settings", "timings_s", "teacher_source"):
        if key in results:
            summary[key] = results[key]
    return summary


def _model_summary(model: dict) -> dict:
    ev = model["eval"]
    out = {"path": model.get("path"), "params": model["params"], "latency_ms_per_token": model["latency_ms_per_token"]}
    out.update({k: ev["overall"][k] for k in _METRICS if k in ev["overall"]})
    out["tokens"], out["bytes"] = ev["overall"]["tokens"], ev["overall"]["bytes"]
    out["domains"] = {name: d["bpb"] for name, d in ev.get("domains", {}).items()}
    return out


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num and den else None


def write_report(out_dir: str | Path, results: dict) -> Path:
    """Write report.json (last), report.md and plots/*.png into `out_dir`; return the report.md path."""
    out = Path(out_dir)
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    summary = summarize(results)
    names = plot_all(plots, summary, results.get("curves", {}))
    summary["plots"] = [f"plots/{n}" for n in names]
    md = out / "report.md"
    write_text_atomic(md, render_markdown(summary))
    write_json_atomic(out / "report.json", summary)
    return md


def _precision_note(settings: dict) -> str:
    """One sentence on the teacher's dtype when it is not the default float32 (it changes its bpb slightly)."""
    model = settings.get("distill", {}).get("model", {})
    dtype = model.get("teacher_dtype") or model.get("dtype")
    if dtype in (None, "float32"):
        return ""
    return (
        f" The teacher ran in {dtype} while teaching and when scored here; latency is measured in float32 "
        "for all three models."
    )


def _teacher_source_line(source: dict | None) -> list[str]:
    """One line (+ blank) on where the KD arm's teacher targets came from: `{"kd_arm": "online" | "cache", "cache":
    {"k", "encoding", "tokens", "bytes_per_token", "teacher_dtype", ...}}`; nothing when the results do not say."""
    if not source:
        return []
    cache = source.get("cache")
    if source["kd_arm"] != "cache" or not cache:
        return ["Teacher source of the distilled student: **online** (the teacher ran on every training batch).", ""]
    dtype = f", the teacher in {cache['teacher_dtype']} for that pass" if cache.get("teacher_dtype") else ""
    return [
        f"Teacher source of the distilled student: **a teacher cache** built before training (top-{cache['k']}, "
        f"{cache['encoding']}, {cache['bytes_per_token']:.1f} bytes per token over {cache['tokens']:,} tokens{dtype}); "
        "no teacher in memory while it trained.",
        "",
    ]


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "n/a" if x is None else format(x, spec)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def render_markdown(summary: dict) -> str:
    """report.md: the result in words first, then the tables."""
    m, r = summary["models"], summary["ratios"]
    teacher, kd, ce = (m[n] for n in MODELS)
    wins = summary["kd_better_than_ce"]["by_domain"]
    won = [d for d, ok in wins.items() if ok]
    lines = [
        "# potstill demo: distilling a teacher into a smaller, faster student",
        "",
        "## In one paragraph",
        "",
        f"The student has **{kd['params'] / 1e6:.1f}M** parameters, **{_pct(r['param_ratio'])}** of the teacher's "
        f"{teacher['params'] / 1e6:.1f}M, and writes text **{_fmt(r['speedup'], '.1f')}x faster** "
        f"({_fmt(kd['latency_ms_per_token'], '.1f')} vs {_fmt(teacher['latency_ms_per_token'], '.1f')} ms per "
        "token, greedy, batch 1). Two copies of the same student were trained on the same text for the same "
        "number of steps: one learned from the teacher's next-token distributions (**distillation**), the "
        "other only from the text itself (**CE only**). On held-out text neither saw, the distilled student "
        f"needs **{_fmt(kd['bpb'])}** bits per byte, the CE-only student {_fmt(ce['bpb'])}, the teacher "
        f"{_fmt(teacher['bpb'])} (lower is better). Distillation closed **{_pct(r['gap_closed'])}** of the gap "
        f"between the CE-only student and the teacher, and beat CE-only in {len(won)} of {len(wins)} domains.",
        "",
        "Bits per byte (bpb) measure how well a model predicts text, per UTF-8 byte, so models with different "
        "tokenizers compare fairly. Agreement is how often the student's most likely next token is the "
        "teacher's." + _precision_note(summary.get("settings", {})),
        "",
        *_teacher_source_line(summary.get("teacher_source")),
        "## Models",
        "",
        "| model | params | ms/token | ppl | bpb | top-1 agreement | KL to teacher |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in MODELS:
        x = m[name]
        lines.append(
            f"| {name} | {x['params'] / 1e6:.1f}M | {_fmt(x['latency_ms_per_token'], '.1f')} | {_fmt(x['ppl'], '.2f')} "
            f"| {_fmt(x['bpb'])} | {_pct(x.get('top1_agreement'))} | {_fmt(x.get('kl_to_teacher'))} |"
        )
    lines += ["", "## Per domain (held-out bpb)", "", "| domain | teacher | student_kd | student_ce | gap closed |"]
    lines.append("|---|---|---|---|---|")
    for d, g in r["gap_closed_by_domain"].items():
        lines.append(
            f"| {d} | {_fmt(teacher['domains'][d])} | {_fmt(kd['domains'][d])} | {_fmt(ce['domains'][d])} | {_pct(g)} |"
        )
    if None in r["gap_closed_by_domain"].values():
        lines += [
            "",
            f"n/a: the CE-only student is within {MIN_GAP_BPB} bpb of the teacher there (or better), so there is no "
            "gap to close. Both students trained on text of these domains and the teacher did not, so on one "
            "of them a student can match or beat the teacher.",
        ]
    lines += ["", "## Targets", ""]
    lines += [f"- {'met' if ok else 'NOT met'}: `{name}`" for name, ok in summary["targets"].items()]
    if summary.get("plots"):
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in summary["plots"]]
    for key, title in (("settings", "Settings"), ("timings_s", "Time per step (s)")):
        if key in summary:
            lines += ["", f"## {title}", "", "```json", json.dumps(summary[key], indent=2), "```"]
    return "\n".join(lines) + "\n"


def plot_all(plots_dir: Path, summary: dict, curves: dict) -> list[str]:
    """Write the PNG plots; return their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    if curves:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, rows in curves.items():
            ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=name)
        ax.set(xlabel="step", ylabel="training loss", title="Training loss (KD arm: alpha*KD + (1-alpha)*CE)")
        ax.legend()
        names.append(_save(fig, plots_dir, "loss_curves.png"))
    m = summary["models"]
    domains = list(summary["ratios"]["gap_closed_by_domain"])
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(MODELS)
    for i, name in enumerate(MODELS):
        xs = [j + i * width for j in range(len(domains))]
        ax.bar(xs, [m[name]["domains"][d] for d in domains], width, label=name)
    ax.set_xticks([j + width for j in range(len(domains))], domains)
    ax.set(ylabel="held-out bits per byte (lower is better)", title="Held-out bpb per domain")
    ax.legend()
    names.append(_save(fig, plots_dir, "bpb_by_domain.png"))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3.5))
    a1.bar(MODELS, [m[n]["params"] / 1e6 for n in MODELS], color="tab:blue")
    a1.set(ylabel="parameters (M)", title="Size")
    a2.bar(MODELS, [m[n]["latency_ms_per_token"] or 0 for n in MODELS], color="tab:orange")
    a2.set(ylabel="ms per generated token", title="Latency (greedy, batch 1)")
    for a in (a1, a2):
        a.tick_params(axis="x", labelrotation=15)
    names.append(_save(fig, plots_dir, "size_latency.png"))
    return names


def _save(fig, plots_dir: Path, name: str) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(plots_dir / name) as tmp:
        fig.savefig(tmp, dpi=100, format="png")  # the temp name has no .png suffix to infer it from
    plt.close(fig)
    return name


# ---- `potstill report RUN_DIR`: the domain mix of a training run (data.mixing) ----

MIXING_FILE = "mixing.jsonl"
_GAP_NAMES = {"ppl": "student/teacher ppl", "bpb": "student/teacher bpb", "kl": "KL(teacher || student)"}


def report_mixing(run_dir: str | Path) -> Path:
    """Plot the domain weights over training and tabulate each domain's student/teacher gap before and after.

    Reads `RUN_DIR/mixing.jsonl` (written by runs with `data.mixing`) and `RUN_DIR/eval.json` when present;
    writes `RUN_DIR/plots/mixing_weights.png` and `RUN_DIR/mixing_report.md` (last).

    Returns:
        The path of mixing_report.md.

    Raises:
        UserError: no such run directory, or no (readable) mixing.jsonl in it.
    """
    from potstill.errors import UserError

    run = Path(run_dir)
    path = run / MIXING_FILE
    if not path.is_file():
        raise UserError(f"{path}: not found; `potstill report` needs a run trained with data.mixing set")
    entries = [entry for _, entry in jsonl_objects(path, "mixing log")]
    if not entries:
        raise UserError(f"{path}: empty; the run has not started mixing yet")
    plots = run / "plots"
    plots.mkdir(exist_ok=True)
    plot_weights(plots, entries)
    evals = json.loads((run / "eval.json").read_text()) if (run / "eval.json").is_file() else None
    md = run / "mixing_report.md"
    write_text_atomic(md, render_mixing(entries, evals))
    return md


def plot_weights(plots_dir: Path, entries: list[dict]) -> str:
    """plots/mixing_weights.png: each domain's sampling weight against the step it was set at."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [e for e in entries if e["rule"] != "final"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for domain in rows[0]["weights"]:
        ax.step([e["step"] for e in rows], [e["weights"][domain] for e in rows], where="post", marker="o", label=domain)
    ax.set(xlabel="step", ylabel="sampling weight", title="Domain weights during training", ylim=(0, None))
    ax.legend()
    return _save(fig, plots_dir, "mixing_weights.png")


def render_mixing(entries: list[dict], evals: dict | None) -> str:
    """mixing_report.md: the weights table and, for DDK, the per-domain gap before and after training."""
    first, last = entries[0], entries[-1]
    domains = list(first["weights"])
    lines = ["# Domain mixing", "", f"Mode: `{first['rule'] if 'gap' not in first else 'ddk'}`.", ""]
    if "gap" in first:
        name = {
            "ppl": "student/teacher ppl",
            "logppl": "ln(student/teacher ppl) (0.0 = as good as the teacher)",
            "bpb": "student/teacher bpb",
            "kl": "KL(teacher || student)",
        }[first["gap"]]
        worst = {e: max(x["gaps"].values()) for e, x in (("before", first), ("after", last))}
        lines += [
            f"Gap measure: {name} on each domain's held-out data (1.0 = as good as the teacher for the ratios). "
            f"Worst domain: {_fmt(worst['before'])} before, {_fmt(worst['after'])} after (step {last['step']}).",
            "",
            "| domain | gap before | gap after | first weight | last weight |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {d} | {_fmt(first['gaps'][d])} | {_fmt(last['gaps'][d])} | {_fmt(first['weights'][d])} "
            f"| {_fmt(last['weights'][d])} |"
            for d in domains
        ]
    lines += ["", "## Weights by step", "", "| step | " + " | ".join(domains) + " |", "|---" * (len(domains) + 1) + "|"]
    lines += [
        f"| {e['step']} | " + " | ".join(_fmt(e["weights"][d]) for d in domains) + " |"
        for e in entries
        if e["rule"] != "final"
    ]
    if evals is not None:
        lines += ["", "## Held-out figures of the trained student (eval.json)", "", "| domain | tokens | ppl | bpb |"]
        lines.append("|---|---|---|---|")
        for d, x in {**evals.get("domains", {}), "overall": evals["overall"]}.items():
            lines.append(f"| {d} | {x['tokens']} | {_fmt(x['ppl'], '.2f')} | {_fmt(x['bpb'])} |")
    lines += ["", "![domain weights](plots/mixing_weights.png)"]
    return "\n".join(lines) + "\n"
