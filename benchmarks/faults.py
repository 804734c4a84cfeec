"""Fault injection: SIGKILL a long job at random moments, rerun it, and compare with an uninterrupted run.

For each job (a tiny `potstill distill` with checkpoints, the same with the on-policy recipe and with a teacher of
another tokenizer, a `potstill cache build` of several shards, a `potstill generate` of many records) the harness
runs the command once uninterrupted (the reference), then N seeded trials: start the command, SIGKILL it after a
random delay drawn uniformly between the moment the reference first wrote its output and the reference's end (so
kills land while checkpoints, shards, records, the final save and the manifest are written, not during Python's
imports), rerun the same command to the end, and compare:

- distill, on_policy, xtok: the final student's tensors bitwise equal to the reference's, and `log.jsonl` holding
  each logged step exactly once with the reference's values;
- cache build: every shard byte-identical to the reference's, the manifest equal but for its `created` time (and so
  its checksum), and `potstill cache verify` passing;
- generate (greedy, one prompt per batch): the records equal the reference's but for their provenance time, in the
  same order, none lost, none twice.

`--jobs torchrun_sigterm` runs another kind of trial: `potstill distill` under `torchrun --nproc_per_node 2` (gloo),
sent SIGTERM (to the torchrun agent, which forwards it to both ranks) at a random moment between its output
directory appearing (the models are loaded) and the reference's end; its exit status and `potstill:` line are
printed (the one-line stop after a saved checkpoint, or a normal end when the signal came in the last step), and
the trial passes when the rerun under torchrun ends with the uninterrupted 2-process run's weights and log. These
runs are fresh processes (torchrun cannot fork from the harness), a minute each on a loaded machine.

`--jobs demo` kills `potstill demo --quick` with a tiny settings file (`DEMO_SETTINGS`: a few hundred tokens of
corpus, 4 training steps per arm with a checkpoint every 2, a tiny held-out split) on the real Gemma 3 270M teacher,
already converted (set `POTSTILL_CACHE`, e.g. /work/assets/cache, so the `teacher` step is a cache hit); pass = the
rerun exits 0, both students' tensors are bitwise equal to the reference's, and `report.json` equals the
reference's but for the latency figures, the speed-up and its target, and the step timings (`same_demo`).
`--jobs demo_sigterm` sends SIGTERM instead (the demo finishes its step, or the training step its optimizer step
and a checkpoint, then exits 143 with one line) and prints the exit status of each signalled run.

A run that ends before its kill time does not count (the upper bound of the delays shrinks to its length). A
trial passes when the rerun exits 0 and its outputs are equal. Prints one line per trial and "N/N recovered" per
job. The models are tiny random Llamas (tests/conftest.py), so a run takes seconds; everything happens in a
temporary directory.

    OMP_NUM_THREADS=1 python benchmarks/faults.py --trials 10 [--seed 0] [--jobs distill cache ...]
    POTSTILL_CACHE=/work/assets/cache OMP_NUM_THREADS=1 python benchmarks/faults.py --trials 10 --jobs demo
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from potstill.fileio import is_temp

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked children must not inherit a started thread pool
os.environ.setdefault("OMP_NUM_THREADS", "1")


def workspace(root: Path) -> None:
    """A tiny student and teacher (the test suite's builders), a 48-line corpus, 48 prompt/completion rows, and a
    student / teacher pair of two tokenizer families with their corpus (xtok/)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import WORDS, build_model, build_tokenizer, write_corpus
    from xtok_tokenizers import TEXTS, byte_level_bpe, metaspace_bpe

    tokenizer = build_tokenizer()
    build_model(tokenizer, 0, hidden=32, max_positions=64, save_to=root / "student")
    build_model(tokenizer, 1, hidden=64, max_positions=64, save_to=root / "teacher")
    write_corpus(root / "train.jsonl", 48)
    rng = random.Random(0)
    rows = [{"prompt": " ".join(rng.choice(WORDS) for _ in range(3)) + ":", "completion": " " + rng.choice(WORDS)}
            for _ in range(48)]  # fmt: skip
    (root / "prompts.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    build_model(byte_level_bpe(), 0, hidden=32, max_positions=64, save_to=root / "xtok" / "student")
    build_model(metaspace_bpe(), 1, hidden=48, max_positions=64, save_to=root / "xtok" / "teacher")
    (root / "xtok" / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS * 4))


DEMO_SETTINGS = """\
quick: &tiny
  corpus: {seed: 0, heldout_frac: 0.1, train_bytes: 8000, heldout_bytes: 600, doc_bytes: 2000}
  student: {layers: 4, calib_tokens: 64, calib_seq_len: 32, calib_dtype: bfloat16}
  distill:
    model: {teacher_dtype: bfloat16}
    loss: {name: fkl, temperature: 1.0}
    data: {seq_len: 64, add_bos: true}
    train: {max_steps: 4, batch_size: 2, warmup_steps: 1, scheduler: cosine, max_grad_norm: 1.0, seed: 0,
            mixed_precision: bf16, logging_steps: 1, save_steps: 2}
  kd: {loss.alpha: 0.5, train.lr: 3.0e-4}
  ce: {train.lr: 3.0e-4}
  eval_batch_size: 4
  bench: {prompt: "def fibonacci(n):", new_tokens: 2, warmup: 1, runs: 1}
full: *tiny
"""


def demo_cmd(root: Path, out: Path) -> list[str]:
    """`potstill demo --quick` with the tiny settings (`DEMO_SETTINGS`, written by `main` for the demo jobs)."""
    return ["demo", "--quick", "--out", str(out), "--settings", str(root / "demo.yaml")]


def distill_cmd(root: Path, out: Path) -> list[str]:
    return [
        "distill", f"model.student={root / 'student'}", f"model.teacher={root / 'teacher'}",
        f"data.train=[{root / 'train.jsonl'}]", "data.seq_len=16", f"train.output_dir={out}", "train.batch_size=2",
        "train.max_steps=12", "train.save_steps=2", "train.logging_steps=1", "train.lr=0.003", "train.warmup_steps=0",
    ]  # fmt: skip


def on_policy_cmd(root: Path, out: Path) -> list[str]:
    """The on-policy recipe with DistiLLM's replay buffer (carried in checkpoints) and fresh samples each step."""
    return [
        "distill", f"model.student={root / 'student'}", f"model.teacher={root / 'teacher'}",
        f"data.train=[{root / 'prompts.jsonl'}]", "data.seq_len=40", f"train.output_dir={out}", "train.batch_size=2",
        "train.max_steps=12", "train.save_steps=2", "train.logging_steps=1", "train.lr=0.003", "train.warmup_steps=0",
        "train.recipe=on_policy", "loss.alpha=1.0", "loss.name=srkl", "on_policy.max_new_tokens=4",
        "on_policy.lmbda=0.7", "on_policy.replay_size=4", "on_policy.replay_ratio=0.5",
    ]  # fmt: skip


def xtok_cmd(root: Path, out: Path) -> list[str]:
    """Cross-tokenizer KD: the teacher reads the text with its own tokenizer."""
    x = root / "xtok"
    return [
        "distill", f"model.student={x / 'student'}", f"model.teacher={x / 'teacher'}",
        f"data.train=[{x / 'train.jsonl'}]", "data.seq_len=24", f"train.output_dir={out}", "train.batch_size=2",
        "train.max_steps=12", "train.save_steps=2", "train.logging_steps=1", "train.lr=0.01", "train.warmup_steps=0",
        "loss.alpha=0.5",
    ]  # fmt: skip


def sigterm_cmd(root: Path, out: Path) -> list[str]:
    """`distill_cmd` with 60 steps, a checkpoint every 5: most of a signal's window is training, not teardown."""
    return [*distill_cmd(root, out), "train.max_steps=60", "train.save_steps=5"]


def generate_cmd(root: Path, out: Path) -> list[str]:
    """Greedy completions of 48 prompts by the local teacher, one prompt per batch (`out` is the JSONL file)."""
    return [
        "generate", "mode=complete", f"inputs=[{root / 'prompts.jsonl'}]", f"output={out}",
        f"teacher.model={root / 'teacher'}", "teacher.batch_size=1", "sampling.max_tokens=8",
    ]  # fmt: skip


def cache_cmd(root: Path, out: Path) -> list[str]:
    return [
        "cache", "build", "--teacher", str(root / "teacher"), "--data", str(root / "train.jsonl"), "--out", str(out),
        "--k", "8", "--seq-len", "16", "--shard-tokens", "64", "--batch-size", "2",
    ]  # fmt: skip


def preload() -> None:
    """Import what the commands import, once: each run is a fork of this process, so a kill lands in the job's
    work, not in seconds of imports (on a loaded 2-core machine the imports alone took 80 s)."""
    import potstill.cli  # noqa: F401
    import potstill.teacher.cache  # noqa: F401
    import potstill.train.recipes  # noqa: F401


def run(
    args: list[str], out: Path, kill_after: float | None = None, sig: int = signal.SIGKILL, log: Path | None = None
) -> tuple[int, float, float | None]:
    """`potstill ARGS` in a forked child writing `out`; send it `sig` after `kill_after` s; its stderr to `log`.

    Returns:
        (exit status: -9 when killed, 128 + the signal after a graceful stop; wall seconds; seconds until `out`
        first existed, or None).
    """
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the child: the CLI entry point, its output discarded
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC) if log else devnull, 2)
        code = 1
        try:
            from potstill.cli import main

            main(args)
            code = 0
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else 1
        finally:
            os._exit(code)
    first, status = None, None
    while status is None:
        done, raw = os.waitpid(pid, os.WNOHANG)
        now = time.perf_counter() - start
        if done:
            status = os.waitstatus_to_exitcode(raw)
            break
        if first is None and out.exists():
            first = now
        if kill_after is not None and now >= kill_after:
            os.kill(pid, sig)
            status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        time.sleep(0.005)
    return status, time.perf_counter() - start, first


def half_written(out: Path) -> list[str]:
    """What a kill left unfinished in `out`: temporary files, checkpoints without trainer_state.json (written last),
    a JSONL output whose last record has no newline."""
    if out.is_file():
        return ["torn last record"] if not out.read_bytes().endswith(b"\n") else []
    if not out.exists():
        return []
    temps = [p.name for p in out.rglob("*") if is_temp(p.name)]
    cut = [p.name for p in out.rglob("checkpoint-*") if p.is_dir() and not (p / "trainer_state.json").is_file()]
    return sorted(temps + cut)


def same_distill(ref: Path, out: Path) -> str | None:
    """None when `out` ended as `ref` did; else what differs."""
    from safetensors.torch import load_file

    a, b = load_file(ref / "student" / "model.safetensors"), load_file(out / "student" / "model.safetensors")
    if a.keys() != b.keys():
        return "other tensors"
    worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    if worst != 0.0:
        return f"weights differ (max |diff| {worst:.3g})"
    logs = [[json.loads(line) for line in (d / "log.jsonl").read_text().splitlines()] for d in (ref, out)]
    steps = [[row["step"] for row in log if "loss" in row] for log in logs]
    if steps[0] != steps[1]:
        return f"log steps {steps[1]} vs {steps[0]}"
    losses = [[row["loss"] for row in log if "loss" in row] for log in logs]
    return None if losses[0] == losses[1] else "logged losses differ"


def same_cache(ref: Path, out: Path) -> str | None:
    names = sorted(p.name for p in ref.glob("shard-*.bin"))
    if names != sorted(p.name for p in out.glob("shard-*.bin")):
        return "other shard files"
    bad = [n for n in names if (ref / n).read_bytes() != (out / n).read_bytes()]
    if bad:
        return f"shards differ: {bad}"
    drop = ("created", "manifest_sha256")
    manifests = [{k: v for k, v in json.loads((d / "manifest.json").read_text()).items() if k not in drop}
                 for d in (ref, out)]  # fmt: skip
    if manifests[0] != manifests[1]:
        return "manifests differ"
    if run(["cache", "verify", str(out)], out)[0] != 0:
        return "cache verify failed"
    return None


def same_generate(ref: Path, out: Path) -> str | None:
    """None when `out` holds the reference's records (provenance times aside) in order, each once."""

    def records(path: Path) -> list[dict]:
        rows = [json.loads(line) for line in path.read_bytes().decode().split("\n") if line]
        return [row | {"provenance": {**row["provenance"], "time": None}} for row in rows]

    want, got = records(ref), records(out)
    keys = [(row["source"], row["sample"]) for row in got]
    if len(set(keys)) != len(keys):
        return f"{len(keys) - len(set(keys))} record(s) twice"
    if len(got) != len(want):
        return f"{len(got)} records, the reference has {len(want)}"
    return None if got == want else "records differ"


def same_demo(ref: Path, out: Path) -> str | None:
    """None when both students are bitwise the reference's and report.json equals it but for what a clock measures."""
    for arm in ("student_kd", "student_ce"):
        problem = same_distill(ref / arm, out / arm)
        if problem is not None:
            return f"{arm}: {problem}"
    clocked = {"latency_ms_per_token", "latency_runs_ms", "speedup", "speedup_ge_3", "timings_s"}

    def figures(value):
        if isinstance(value, dict):
            return {k: figures(v) for k, v in value.items() if k not in clocked}
        return [figures(v) for v in value] if isinstance(value, list) else value

    reports = [figures(json.loads((d / "report.json").read_text())) for d in (ref, out)]
    reports[1] = json.loads(json.dumps(reports[1]).replace(str(out), str(ref)))  # paths inside the demo dir
    return None if reports[0] == reports[1] else "report.json figures differ"


JOBS = {
    "distill": (distill_cmd, same_distill),
    "cache": (cache_cmd, same_cache),
    "generate": (generate_cmd, same_generate),
    "on_policy": (on_policy_cmd, same_distill),
    "xtok": (xtok_cmd, same_distill),
    "demo": (demo_cmd, same_demo),
    "demo_sigterm": (demo_cmd, same_demo),
}


def torchrun(args: list[str], out: Path, signal_after: float | None = None) -> tuple[int | None, float, float, str]:
    """`torchrun --standalone --nproc_per_node 2 -m potstill.cli ARGS` writing the run directory `out`; SIGTERM the
    agent `signal_after` s after `out` first exists (the models are loaded then: fresh processes vary by tens of
    seconds in their imports and loads on a loaded machine).

    Returns:
        (exit status, None when the run finished its work (`summary.json`) before its signal; seconds from `out`
        appearing to `summary.json` appearing; seconds until `out` first existed; the last stderr line starting
        "potstill:", or "").
    """
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT / "src")}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    start = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            [*launcher, "-m", "potstill.cli", *args], stdout=subprocess.DEVNULL, stderr=err, env=env
        )
        first, finished, signalled = None, None, signal_after is None
        while proc.poll() is None:
            now = time.perf_counter() - start
            if first is None and out.exists():
                first = now
            if finished is None and (out / "summary.json").exists():
                finished = now
            if not signalled and finished is None and first is not None and now >= first + signal_after:
                proc.send_signal(signal.SIGTERM)
                signalled = True
            time.sleep(0.02)
        err.seek(0)
        lines = [ln for ln in err.read().decode(errors="replace").splitlines() if ln.startswith("potstill:")]
    work = (finished or 0.0) - (first or 0.0)
    return proc.returncode if signalled else None, work, first or 0.0, lines[-1] if lines else ""


def torchrun_sigterm(root: Path, trials: int, seed: int) -> None:
    """SIGTERM trials of a 2-process `potstill distill` (see the module docstring)."""
    ref = root / "torchrun-ref"
    status, work, first, _ = torchrun(sigterm_cmd(root, ref), ref)
    assert status == 0, "torchrun_sigterm: the reference run failed"
    print(f"torchrun_sigterm: reference: output from {first:.1f} s, training and saves {work:.1f} s", flush=True)
    rng = random.Random(seed)
    recovered = signals = attempt = ended = 0
    while signals < trials and attempt < 3 * trials:
        attempt += 1
        out = root / f"torchrun-{attempt}"
        delay = rng.uniform(0, work)  # after the output appeared: during training, checkpoints and the final save
        status, _, _, line = torchrun(sigterm_cmd(root, out), out, signal_after=delay)
        if status is None:  # it finished first: not a trial
            ended += 1
            continue
        signals += 1
        left = half_written(out)
        if (out / "summary.json").exists():  # the signal came after the run's work (teardown): nothing to resume
            rerun, rerun_wall = 0, 0.0
        else:
            rerun, rerun_wall, _, _ = torchrun(sigterm_cmd(root, out), out)
        problem = f"rerun exited {rerun}" if rerun != 0 else same_distill(ref, out)
        recovered += problem is None
        print(f"  SIGTERM {signals}: {delay:.1f} s after the output appeared, exit {status} "
              f"({line or 'no potstill line'}), half-written: {', '.join(left) or 'none'}; rerun "
              f"{rerun_wall:.1f} s from its output to its summary: {problem or 'equal'}", flush=True)  # fmt: skip
    print(f"torchrun_sigterm: {recovered}/{signals} recovered ({ended} run(s) ended before their signal)", flush=True)


def kill_trials(root: Path, job: str, trials: int, seed: int) -> None:
    """SIGKILL trials of one job (SIGTERM for `demo_sigterm`); see the module docstring."""
    command, same = JOBS[job]
    sig = signal.SIGTERM if job.endswith("_sigterm") else signal.SIGKILL
    suffix = ".jsonl" if job == "generate" else ""
    ref = root / f"{job}-ref{suffix}"
    status, wall, first = run(command(root, ref), ref)
    assert status == 0, f"{job}: the reference run failed"
    print(f"{job}: reference {wall:.1f} s (output from {first:.1f} s)", flush=True)
    rng = random.Random(seed)
    kills = recovered = attempt = ended = cut = 0
    while kills < trials and attempt < 3 * trials:
        out = root / f"{job}-{attempt}{suffix}"
        attempt += 1
        delay = rng.uniform(first, wall)
        err = root / f"{job}-{attempt}.stderr"
        status, took, _ = run(command(root, out), out, kill_after=delay, sig=sig, log=err)
        if status == 0:  # it finished first (runs vary in length): not a trial
            ended, wall = ended + 1, min(wall, took)
            continue
        kills += 1
        left = half_written(out)
        cut += bool(left)
        name = signal.Signals(sig).name
        lines = [ln for ln in err.read_text(errors="replace").splitlines() if ln.startswith("potstill: stopped")]
        stopped = f"exit {status} ({lines[-1] if lines else 'no stop line'}), " if status != -signal.SIGKILL else ""
        status, rerun_wall, _ = run(command(root, out), out)
        problem = f"rerun exited {status}" if status != 0 else same(ref, out)
        recovered += problem is None
        shutil.rmtree(out) if out.is_dir() else out.unlink()  # a demo directory holds ~1 GB of checkpoints
        print(f"  {name} {kills}: at {delay:.2f} s, {stopped}half-written: {', '.join(left) or 'none'}; rerun "
              f"{rerun_wall:.1f} s: {problem or 'equal'}", flush=True)  # fmt: skip
    print(f"{job}: {recovered}/{kills} recovered ({cut} kill(s) left a half-written file or checkpoint;"
          f" {ended} run(s) ended before their kill time)", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10, help="kill trials per job")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", nargs="+", default=[*JOBS][:5], choices=[*JOBS, "torchrun_sigterm"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="potstill-faults-") as tmp:
        root = Path(tmp)
        workspace(root)
        (root / "demo.yaml").write_text(DEMO_SETTINGS)
        preload()
        for job in args.jobs:
            if job == "torchrun_sigterm":
                torchrun_sigterm(root, args.trials, args.seed)
            else:
                kill_trials(root, job, args.trials, args.seed)


if __name__ == "__main__":
    main()
