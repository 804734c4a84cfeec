"""The demo's eval step, before / after scoring the teacher's own NLL in vocabulary blocks, side by side.

The demo's `eval` step (`potstill.demo._step_eval`) runs the teacher twice: once on the held-out text in its own
tokenization with its full 262k head (its own ppl / bpb), once in the students' trimmed tokenization over their
17,031 ids (agreement and KL of both students, `evaluate_models`). The two passes read different token sequences
(the trimmed vocabulary splits words the teacher's tokenizer keeps whole), so one cannot serve both with the same
numbers; what this measures is the cost of the first pass's head. Before: each group of 512 rows made its
[512, 262144] float32 logits and `F.cross_entropy` over them (the code `eval.metrics._nll` replaced, reproduced
below). After: `_nll` computes the logits in blocks of 8192 ids and merges their log-sum-exp.

Also replaced: the model's hidden states came from the whole model with `logits_to_keep=1` (its head run on the last
position); for a frozen model `torch.matmul` runs that by copying the head once per sequence (`teacher_forward_cpu_s_*`
below: one batch, the teacher as loaded vs after `requires_grad_(False)`, as `OnlineTeacher` leaves it). The eval step
scored the teacher before freezing it, so it did not pay this; `_outputs` now reads the decoder's output alone.

Both arms run the same calls as the eval step on the first `--sequences` held-out sequences of each tokenization,
alternating (before, after, before, after, ...) so background load affects them alike; each prints its CPU seconds
(user + system), wall seconds and minor page faults, and the largest relative difference of any metric between the
arms. Also counted: the tokens of both tokenizations and how many packed sequences are the same ids in both.

    python benchmarks/demo_eval.py --demo /work/demo_out --teacher TEACHER_DIR [--sequences 24] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Subset

from potstill.data import collate, load_dataset
from potstill.eval import metrics
from potstill.losses.fused import TeacherHead
from potstill.models.heads import head_of
from potstill.models.load import load_model
from potstill.models.vocab import load_id_map
from potstill.teacher.online import OnlineTeacher


def usage() -> tuple[float, int]:
    """(CPU seconds user + system, minor page faults) of this process so far."""
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime, u.ru_minflt


def nll_before(out, idx, targets):
    """The replaced code: the group's full [n, V] float32 logits, then cross-entropy over them."""
    return F.cross_entropy(metrics._logits(out, idx), targets, reduction="none")


def outputs_before(model, ids, mask):
    """The replaced code: the whole model with `logits_to_keep=1`, its last hidden state (the head's input)."""
    weight, softcap = head_of(model)
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, logits_to_keep=1)
    return TeacherHead(hidden=out.hidden_states[-1].reshape(-1, weight.shape[1]), weight=weight, softcap=softcap)


def forward_cpu_s(model, batch: dict) -> float:
    """CPU seconds of one forward with `logits_to_keep=1` (what `outputs_before` runs)."""
    cpu = usage()[0]
    with torch.inference_mode():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=1)
    return usage()[0] - cpu


def flat(result: dict) -> dict[str, float]:
    """{model/scope/metric: value} of the numeric metrics of `{name: evaluate(...)}`."""
    out = {}
    for name, res in result.items():
        for scope, m in [("overall", res["overall"]), *res["domains"].items()]:
            out.update({f"{name}/{scope}/{k}": v for k, v in m.items() if isinstance(v, float)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", type=Path, required=True, help="a finished full demo directory")
    ap.add_argument("--teacher", type=Path, required=True, help="the teacher's HF directory")
    ap.add_argument("--sequences", type=int, default=24, help="held-out sequences per tokenization (0: all)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    heldout = [args.demo / "corpus" / "heldout.jsonl"]
    teacher, t_tok = load_model(args.teacher, dtype="bfloat16")  # the demo's teacher_dtype
    paths = {f"student_{arm}": args.demo / f"student_{arm}" / "student" for arm in ("kd", "ce")}
    students = {name: load_model(path) for name, path in paths.items()}
    s_tok, id_map = students["student_kd"][1], load_id_map(paths["student_kd"])
    t_data, s_data = load_dataset(heldout, t_tok, 128), load_dataset(heldout, s_tok, 128)
    n = min(len(t_data), len(s_data))
    same = int((id_map[s_data.input_ids[:n]] == t_data.input_ids[:n]).all(1).sum())
    info = {
        "teacher_tokens": int((t_data.labels != -100).sum()),
        "student_tokens": int((s_data.labels != -100).sum()),
        "sequences": [len(t_data), len(s_data)],
        "same_sequences": same,
    }
    if args.sequences:
        t_data, s_data = Subset(t_data, range(args.sequences)), Subset(s_data, range(args.sequences))
    models = {name: model for name, (model, _) in students.items()}
    batch = collate([t_data[i] for i in range(8)])
    info["teacher_forward_cpu_s_trainable"] = round(forward_cpu_s(teacher, batch), 2)
    teacher.requires_grad_(False)  # as OnlineTeacher leaves it
    info["teacher_forward_cpu_s_frozen"] = round(forward_cpu_s(teacher, batch), 2)

    after = (metrics._outputs, metrics._nll)
    rows, results = [], {}
    for r in range(args.rounds):
        for arm, (outputs, nll) in (("before", (outputs_before, nll_before)), ("after", after)):
            metrics._outputs, metrics._nll = outputs, nll
            teacher.requires_grad_(True)  # the eval step scores the teacher as loaded, then makes it an OnlineTeacher
            (cpu0, flt0), start = usage(), time.perf_counter()
            result = {"teacher": metrics.evaluate(teacher, t_data, progress=False)}
            cpu_teacher = usage()[0] - cpu0
            online = OnlineTeacher(teacher, id_map=id_map)
            result.update(metrics.evaluate_models(models, s_data, teacher=online, progress=False))
            cpu1, flt1 = usage()
            results[arm] = flat(result)
            rows.append(
                {
                    "round": r,
                    "arm": arm,
                    "cpu_s": cpu1 - cpu0,
                    "teacher_own_cpu_s": cpu_teacher,
                    "students_cpu_s": cpu1 - cpu0 - cpu_teacher,
                    "wall_s": time.perf_counter() - start,
                    "minflt": flt1 - flt0,
                }
            )
            print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in rows[-1].items()}), flush=True)
    metrics._outputs, metrics._nll = after
    diff, key = max((abs(results["after"][k] - v) / abs(v), k) for k, v in results["before"].items() if v)
    best = {arm: min(row["cpu_s"] for row in rows if row["arm"] == arm) for arm in ("before", "after")}
    summary = {
        **info,
        "scored_sequences": args.sequences or "all",
        "cpu_s_before": round(best["before"], 2),
        "cpu_s_after": round(best["after"], 2),
        "cpu_ratio_before_over_after": round(best["before"] / best["after"], 3),
        "max_rel_metric_diff": diff,
        "max_rel_metric_diff_of": key,
        "teacher_bpb": results["after"]["teacher/overall/bpb"],
        "threads": args.threads,
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
