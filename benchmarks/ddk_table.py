"""The DDK paper's baseline table on one budget: CPT, KD, KD + hidden states (raw and TED), MiniLLM, DDK, DDK + best.

The four domains, the held-out split and DDK's own split (`data/ddk_eval.jsonl`, kept out of every run) are
`ddk_vs_uniform.py`'s. Every arm trains the same pruned student for the same optimizer steps x batch, with the same
learning rate and seeds, through `potstill distill` (`run_distill`):

- `ce`: CE only (the paper's CPT: continued pretraining on the same text), uniform domain mix;
- `kd`: fkl, alpha 0.5, uniform mix;
- `kd_hidden`: `kd` + `hidden.weight` (normalized MSE of each kept layer's state against the teacher layer it was cut
  from: `hidden.layers: auto`);
- `kd_ted`: `kd_hidden` with TED's task-aware filters (`hidden.filters.steps` stage-1 steps first);
- `minillm`: `train.recipe: on_policy`, `objective: minillm` (lmbda 1, teacher_mix 0.2, batch baseline) on a corpus
  task: each prompt is a `--prompt-tokens` prefix of a training window, the student writes the next
  `--new-tokens` (MiniLLM's pretraining-loss term is not built: docs/on_policy.md);
- `ddk`: `kd` with `data.mixing.mode: ddk` (`gap: logppl`, a uniform first interval: the student is freshly pruned,
  docs/ddk.md);
- `ddk_best`: `ddk` + the term of the best arm among kd_hidden / kd_ted / minillm (lowest mean overall bpb);
  MiniLLM cannot be combined (data.mixing is the distill recipe's), so if it is best the best combinable one is
  taken and the table says so.

Then the teacher and every student are scored on the held-out split (per-domain bpb, student/teacher ratio, worst
domain), one row per (arm, seed) and one row per arm averaged over seeds with the seed spread. OUT/results.json,
OUT/table.md. A finished (arm, seed) run and its scores are kept in OUT/runs.json (the teacher's in
OUT/teacher_eval_<N>.json; `--heldout-seqs N` scores only each domain's first N held-out sequences) and not
trained or scored again, so a killed benchmark resumes (`--rerun ARM` trains it again), and several processes may
share one OUT (each given other `--arms` / `--seeds`: runs.json is updated under a lock, OUT/data is built once and
checked against `--train-bytes` / `--eval-tokens`, ddk_best's partner is chosen once, in OUT/best.json).

Models: by default (what finishes on a shared 2-core CPU) a tiny teacher trained here (`ddk_vs_uniform.tiny_pair`:
a byte-level BPE of 512 ids, a Llama of `--teacher-shape` hidden x layers trained CE-only on the training split) and
a student pruned from it by `potstill student init` (`--student-layers`, measured layers, full vocabulary so
MiniLLM's teacher-mixed sampling can run). `--teacher DIR --student DIR` takes any pair instead (the student must
come from `student init` for `hidden.layers: auto`; MiniLLM with teacher_mix > 0 needs an untrimmed vocabulary:
`--teacher-mix 0` for a trimmed student).

    python benchmarks/ddk_table.py --out runs/ddk_table --steps 300 --seeds 1 2
"""

from __future__ import annotations

import argparse
import fcntl
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).parent))
from ddk_vs_uniform import add_licenses, render, split_ddk_eval, summarize, tiny_pair, train  # noqa: E402
from torch.utils.data import Subset  # noqa: E402

from potstill.data import load_dataset  # noqa: E402
from potstill.data.corpus import build_corpus  # noqa: E402
from potstill.eval.metrics import evaluate  # noqa: E402
from potstill.eval.report import report_mixing  # noqa: E402
from potstill.fileio import write_text_atomic  # noqa: E402
from potstill.models.load import load_model  # noqa: E402
from potstill.student.init import init_student  # noqa: E402

ARMS = ("ce", "kd", "kd_hidden", "kd_ted", "minillm", "ddk", "ddk_best")
COMBINABLE = ("kd_hidden", "kd_ted")  # terms of the distill recipe, which DDK's mixing belongs to


def prompt_rows(data: Path, tokenizer_dir: Path, prompt_tokens: int, new_tokens: int, seq_len: int) -> Path:
    """fit.jsonl -> minillm.jsonl: each record cut into windows of prompt + completion tokens (prefix -> its
    continuation), the domain kept. Windows whose prompt re-tokenizes too long for seq_len are dropped."""
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    rows, width = [], prompt_tokens + new_tokens
    for line in (data / "fit.jsonl").read_text().splitlines():
        record = json.loads(line)
        ids = tok(record["text"], add_special_tokens=False)["input_ids"]
        for i in range(0, len(ids) - width + 1, width):
            prompt = tok.decode(ids[i : i + prompt_tokens])
            if 1 + len(tok(prompt, add_special_tokens=False)["input_ids"]) + new_tokens <= seq_len:
                completion = tok.decode(ids[i + prompt_tokens : i + width])
                rows.append({"prompt": prompt, "completion": completion, "domain": record["domain"]})
    path = data / "minillm.jsonl"
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))
    return path


def build_data(data: Path, train_bytes: int, eval_tokens: int) -> None:
    """OUT/data once (the four domains, DDK's split); a later or parallel invocation reuses it, if built alike."""
    settings = {"train_bytes": train_bytes, "eval_tokens": eval_tokens}
    stamp = data / "table_data.json"
    if stamp.is_file():
        built = json.loads(stamp.read_text())
        if built != settings:
            raise SystemExit(f"{data}: built with {built}, not {settings}: give another --out or the same options")
        return
    build_corpus(data, seed=0, train_bytes=train_bytes, heldout_bytes=train_bytes // 10)
    add_licenses(data, max_bytes=train_bytes)
    split_ddk_eval(data, eval_tokens)
    write_text_atomic(stamp, json.dumps(settings) + "\n")


def update_runs(runs_file: Path, key: str, entry: dict) -> dict:
    """runs.json[key] |= entry, re-read under a lock (other processes may share the file); returns all runs."""
    with (runs_file.parent / "runs.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        runs = json.loads(runs_file.read_text()) if runs_file.is_file() else {}
        runs[key] = runs.get(key, {}) | entry
        write_text_atomic(runs_file, json.dumps(runs, indent=2) + "\n")
    return runs


def once(path: Path, make) -> dict:
    """path's JSON, made by `make()` by the first process to get here (the others wait under the lock)."""
    with (path.parent / "runs.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.is_file():
            write_text_atomic(path, json.dumps(make()) + "\n")
        return json.loads(path.read_text())


def first_of_each(domains: list[str], n: int) -> list[int]:
    """Indices of the first n items of each domain, in order."""
    rank, keep = Counter(), []
    for i, domain in enumerate(domains):
        rank[domain] += 1
        if rank[domain] <= n:
            keep.append(i)
    return keep


def score(model_dir: Path, data: Path, seq_len: int, per_domain: int) -> dict:
    """`evaluate` on the held-out split: every packed sequence, or the first `per_domain` of each domain (0: all),
    so that the same tokens are scored for every model."""
    model, tokenizer = load_model(str(model_dir))
    ds = load_dataset([data / "heldout.jsonl"], tokenizer, seq_len, add_bos=True)
    if per_domain:
        ds = Subset(ds, first_of_each(ds.domains, per_domain))
    return evaluate(model, ds, batch_size=8, progress=False)


def arm_overrides(name: str, args, data: Path, best: str | None) -> list[str]:
    """The `potstill distill` overrides of one arm (on top of `ddk_vs_uniform.train`'s shared ones)."""
    kd = ["loss.name=fkl", "loss.alpha=0.5"]
    uniform = ["data.mixing.mode=uniform"]
    hidden = [f"hidden.weight={args.hidden_weight}"]
    terms = {
        "kd_hidden": hidden,
        "kd_ted": [*hidden, f"hidden.filters.steps={args.filter_steps}"],
    }
    ddk = ["data.mixing.mode=ddk", f"data.eval=[{data / 'ddk_eval.jsonl'}]", f"data.mixing.interval={args.interval}",
           f"data.mixing.eval_tokens={args.eval_tokens}", "data.mixing.gap=logppl",
           f"data.mixing.warmup={args.interval}"]  # fmt: skip
    if name == "ce":
        return ["loss.alpha=0", *uniform]
    if name == "kd":
        return [*kd, *uniform]
    if name in terms:
        return [*kd, *uniform, *terms[name]]
    if name == "minillm":
        return [
            "train.recipe=on_policy", f"data.train=[{data / 'minillm.jsonl'}]", "loss.alpha=1.0",
            "on_policy.objective=minillm", "on_policy.lmbda=1.0", f"on_policy.teacher_mix={args.teacher_mix}",
            "on_policy.baseline=batch", f"on_policy.max_new_tokens={args.new_tokens}",
        ]  # fmt: skip
    if name == "ddk":
        return [*kd, *ddk]
    return [*kd, *ddk, *terms[best]]  # ddk_best


def pick_best(runs: dict) -> dict[str, str]:
    """{"best": the best of kd_hidden / kd_ted / minillm by mean overall bpb over their scored runs,
    "combined_with": the best of those DDK can take}."""
    means = {
        arm: statistics.mean(
            r["eval"]["overall"]["bpb"] for k, r in runs.items() if k.split(" seed ")[0] == arm and r.get("eval")
        )
        for arm in ("kd_hidden", "kd_ted", "minillm")
        if any(k.split(" seed ")[0] == arm and r.get("eval") for k, r in runs.items())
    }
    best = min(means, key=means.get)
    combinable = min((a for a in means if a in COMBINABLE), key=means.get)
    return {"best": best, "combined_with": combinable}


def means_table(results: dict, seeds: list[int]) -> str:
    """One row per arm: mean over seeds of overall / per-domain bpb and of the worst ratio, +- half the spread."""
    domains, rows = results["domains"], {}
    for key, a in results["arms"].items():
        rows.setdefault(key.split(" seed ")[0], []).append(a)

    def cell(values: list[float]) -> str:
        mean = statistics.mean(values)
        return f"{mean:.3f} ± {(max(values) - min(values)) / 2:.3f}" if len(values) > 1 else f"{mean:.3f}"

    head = "| arm | seeds | overall bpb | " + " | ".join(domains) + " | worst ratio (domains) |"
    lines = [f"Means over seeds {seeds} (± half the spread between seeds):", "", head]
    lines.append("|---" * (len(domains) + 4) + "|")
    for arm, runs in rows.items():
        worst = sorted({r["worst_domain"] for r in runs})
        lines.append(
            f"| {arm} | {len(runs)} | {cell([r['bpb'] for r in runs])} | "
            + " | ".join(cell([r["bpb_by_domain"][d] for r in runs]) for d in domains)
            + f" | {cell([r['worst_ratio'] for r in runs])} ({', '.join(worst)}) |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/ddk_table"))
    parser.add_argument("--teacher", type=Path, help="teacher HF dir (default: a tiny one trained here)")
    parser.add_argument("--student", type=Path, help="student HF dir from `student init` (default: pruned here)")
    parser.add_argument("--teacher-shape", type=int, nargs=2, default=[128, 6], metavar=("HIDDEN", "LAYERS"))
    parser.add_argument("--teacher-steps", type=int, default=1000)
    parser.add_argument("--student-layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--hidden-weight", type=float, default=1.0)
    parser.add_argument("--filter-steps", type=int, default=100, help="TED stage-1 steps")
    parser.add_argument("--prompt-tokens", type=int, default=48, help="MiniLLM: prefix length of each prompt")
    parser.add_argument("--new-tokens", type=int, default=64, help="MiniLLM: tokens the student writes")
    parser.add_argument(
        "--teacher-mix", type=float, default=0.2, help="MiniLLM: teacher-mixed sampling (0 for a trimmed student)"
    )
    parser.add_argument("--interval", type=int, default=50, help="DDK: K (and its uniform warm-up)")
    parser.add_argument("--eval-tokens", type=int, default=2048, help="DDK: held-out tokens per domain per update")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2], help="data-order seeds; every arm runs each")
    parser.add_argument("--train-bytes", type=int, default=150_000, help="training text per stdlib domain")
    parser.add_argument("--bf16", action="store_true", help="teacher in bfloat16, student autocast (as the demo)")
    parser.add_argument(
        "--heldout-seqs", type=int, default=0, help="score the first N packed held-out sequences per domain (0: all)"
    )
    parser.add_argument("--table-only", action="store_true", help="train nothing: the table of the runs in OUT")
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--rerun", nargs="+", choices=ARMS, default=[], help="train these arms again")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = args.out / "data"
    build_data(data, args.train_bytes, args.eval_tokens)
    if args.teacher is None:
        began = time.perf_counter()
        teacher, _ = tiny_pair(data, args.out / "models", args.teacher_steps, args.seq_len, tuple(args.teacher_shape))
        student = args.out / "models" / "pruned"
        if not student.is_dir():
            texts = [json.loads(x)["text"] for x in (data / "fit.jsonl").read_text().splitlines()]
            init_student(teacher, args.student_layers, student, texts, trim_vocab=False)
        print(f"pair ready in {time.perf_counter() - began:.0f}s: teacher {teacher}, student {student}")
    else:
        teacher, student = args.teacher, args.student
    if "minillm" in args.arms:
        prompt_rows(data, student, args.prompt_tokens, args.new_tokens, args.seq_len)
    runs_file = args.out / "runs.json"
    runs = json.loads(runs_file.read_text()) if runs_file.is_file() else {}
    evals, best = {}, None
    for name in args.arms:
        if name == "ddk_best":  # chosen once, on the candidates scored by then, and kept for every seed
            best = once(args.out / "best.json", lambda: pick_best(json.loads(runs_file.read_text())))
            print(f"best of the others: {best['best']}; DDK is combined with {best['combined_with']}")
        for seed in args.seeds:
            key = f"{name} seed {seed}"
            if args.table_only and key not in runs:
                continue
            if key not in runs or name in args.rerun:
                out = args.out / name / f"seed{seed}"
                extra = arm_overrides(name, args, data, best and best["combined_with"])
                began = time.perf_counter()
                train(out, student, teacher, data, args, args.steps, seed, extra)
                entry = {"run": str(out), "seconds": time.perf_counter() - began, "eval": None}
                runs = update_runs(runs_file, key, entry)
            if runs[key].get("eval") is None or runs[key].get("heldout_seqs", 0) != args.heldout_seqs:
                result = score(Path(runs[key]["run"]) / "student", data, args.seq_len, args.heldout_seqs)
                runs = update_runs(runs_file, key, {"eval": result, "heldout_seqs": args.heldout_seqs})
            evals[key] = runs[key]["eval"]
    teacher_file = args.out / f"teacher_eval_{args.heldout_seqs or 'all'}.json"
    evals["teacher"] = once(teacher_file, lambda: score(teacher, data, args.seq_len, args.heldout_seqs))
    arms = {k: {"run": runs[k]["run"], "seconds": runs[k]["seconds"]} for k in evals if k != "teacher"}
    mixing = {}
    for name in (k for k in arms if k.startswith("ddk")):
        mixing[name] = [json.loads(x) for x in (Path(arms[name]["run"]) / "mixing.jsonl").read_text().splitlines()]
        report_mixing(arms[name]["run"])
    results = summarize(evals, arms, mixing, vars(args)) | {"ddk_best": best}
    text = render(results) + "\n" + means_table(results, args.seeds)
    if best:
        text += f"\nBest of kd_hidden / kd_ted / minillm: {best['best']}; ddk_best = ddk + {best['combined_with']}.\n"
    write_text_atomic(args.out / "results.json", json.dumps(results, indent=2, default=str) + "\n")
    write_text_atomic(args.out / "table.md", text)
    print(text)


if __name__ == "__main__":
    main()
