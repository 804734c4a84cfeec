"""What every vision recipe writes into its run directory: report.json, report.md, grid.png; seed statistics.

- `started(recipe, images)` / `finish(out, report, markdown)`: the date, load average, settings and wall time around
  a run; report.json and report.md written atomically (a rerun never leaves half a report).
- `mean_spread` / `arm_rows`: a metric over seeds as "mean ± half the range", one Markdown row per arm; `margins`:
  an arm minus its twin, per seed (same seed = same initial weights and batch order).
- `draw_grid`: held-out images in a grid, each with lines of text under it (reference, teacher, students).
"""

from __future__ import annotations

import json
import os
import textwrap
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

import torch
from pydantic import BaseModel

from potstill.data.images import ImageSet
from potstill.fileio import write_json_atomic, write_text_atomic


def started(recipe: BaseModel, images: ImageSet | None = None) -> dict:
    """The start of a run: UTC date, load average, a clock (removed by `finish`), the recipe's settings and, for
    the recipes that read images, what was read and how many files were skipped."""
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    report = {"date": stamp, "load_before": list(os.getloadavg()), "_clock": time.perf_counter()}
    report["recipe"] = recipe.model_dump(mode="json")
    if images is not None:
        report |= {"images": images.summary(), "skipped": len(images.skipped)}
    return report


def finish(out: Path, report: dict, markdown: Callable[[dict], str]) -> dict:
    """Add the wall time and load after, then write OUT/report.json and OUT/report.md; returns the report."""
    report["wall_s"] = round(time.perf_counter() - report.pop("_clock"), 1)
    report["load_after"] = list(os.getloadavg())
    report = json.loads(json.dumps(report, default=str))  # paths, tuples -> JSON values
    write_json_atomic(out / "report.json", report)
    write_text_atomic(out / "report.md", markdown(report))
    return report


def footer(report: dict) -> str:
    """The last line of a report.md: when, how long, under what load."""
    load = lambda v: " ".join(f"{x:.1f}" for x in v)  # noqa: E731
    return (
        f"\nRun {report['date']}, {report['wall_s']:.0f} s, load average {load(report['load_before'])} -> "
        f"{load(report['load_after'])}, 1 thread.\n"
    )


def mean_spread(values: Sequence[float]) -> tuple[float, float]:
    """(mean, half the range) of a metric over seeds."""
    return sum(values) / len(values), (max(values) - min(values)) / 2


def arm_rows(runs: list[dict], arms: Sequence[str], metrics: dict[str, Callable[[dict], float]], fmt: str) -> list[str]:
    """Markdown rows "| arm (n seeds) | mean ± spread | ..." of `runs` (dicts with "arm"), one column per metric."""
    rows = []
    for arm in arms:
        mine = [r for r in runs if r["arm"] == arm]
        if mine:
            cells = [" ± ".join(fmt.format(x) for x in mean_spread([get(r) for r in mine])) for get in metrics.values()]
            rows.append(f"| {arm} ({len(mine)} seeds) | " + " | ".join(cells) + " |")
    return rows


def margins(runs: list[dict], arm: str, twin: str, get: Callable[[dict], float]) -> dict[int, float]:
    """seed -> metric(arm) - metric(twin), for the seeds that have both."""
    by = {(r["arm"], r["seed"]): get(r) for r in runs}
    return {s: by[arm, s] - by[twin, s] for a, s in by if a == arm and (twin, s) in by}


def table(header: Sequence[str], rows: list[str]) -> str:
    """A Markdown table: the header's first column left-aligned, the others right-aligned."""
    return "\n".join(["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1), *rows])


def draw_grid(pictures: Sequence[torch.Tensor], texts: Sequence[str], path: Path, width: int = 40) -> Path:
    """Images [H, W, 3] (values in [0, 1]) in rows of four, each with its text (lines wrapped at `width`) below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 4
    rows = max(1, -(-len(pictures) // cols))
    wrap = lambda t: "\n".join(textwrap.fill(line, width, subsequent_indent="    ") for line in t.split("\n"))  # noqa: E731
    texts = [wrap(t) for t in texts]
    lines = max((t.count("\n") + 1 for t in texts), default=1)
    text_in = 0.16 * lines + 0.2  # inches of text under a picture (8 pt monospace)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, (3.0 + text_in) * rows), squeeze=False)
    for ax, picture, text in zip(axes.flat, pictures, texts, strict=False):
        ax.imshow(picture.numpy() if isinstance(picture, torch.Tensor) else picture)
        ax.text(0, -0.03, text, transform=ax.transAxes, va="top", fontsize=8, family="monospace")
    for ax in axes.flat:
        ax.axis("off")
    height = (3.0 + text_in) * rows
    fig.subplots_adjust(left=0.02, right=0.98, top=0.98, bottom=text_in / height, wspace=0.1, hspace=text_in / 3.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=72)
    plt.close(fig)
    return path
