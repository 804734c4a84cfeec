"""The on-policy baseline arena: several ways to train the same small student on a task with checkable answers.

Task: 2-digit addition at character level, `"12+34="` -> `"046"` (the sum zero-padded to 3 digits, so every row
has the same length: `<bos>` + 6 prompt + 3 answer + `<eos>` = 11 tokens, and the distill recipe's packing puts
exactly one row in each sequence of `data.seq_len` 11, as the on_policy recipe does). The operand pairs
(10..99)^2 are split into held-out prompts, a validation split (`--val`, 200 by default: `data.eval`, DistiLLM's
validation loss, and the lr sweep) and training prompts. `--digits 3` makes 3-digit operands and 4-digit answers
(60,000 sampled pairs). `--task reverse --digits N`: an N-digit string, reversed (`"04172="` -> `"27140"`; above 4
digits, 60,000 sampled strings): a long answer whose every character is defined by its position alone, so the right
next character is well defined after any wrong prefix.

1. A teacher (Llama, hidden 128 x 4 layers) is trained here by CE (`train.recipe=distill`, `loss.alpha=0`) and
   its greedy exact-match accuracy on the held-out prompts is printed (cached in the work dir; `--retrain-teacher`).
   `--teacher` sets its size. With `--teacher-corrupt P`, a share P of its training rows are recovery rows: a wrong
   answer prefix (a random cut, at least one character changed) moved into the prompt, and the true rest of the
   answer as the completion. Such a teacher is robust to wrong prefixes: it says the right next character after an
   error, which is what the on-policy arms ask it at their own samples.
2. A smaller student (Llama, hidden 48 x 2 layers by default, `--student`; the same random init per seed for every
   arm) is trained by each arm on the same training prompts, with the same `train.max_steps`, `train.batch_size`,
   `train.lr`. With `--sft-steps N`, the init is first trained by CE for N steps, and every arm of the seed starts
   from that supervised checkpoint (the setting of GKD, MiniLLM and DistiLLM). The teacher's mean entropy and
   p(true token) at the answer positions are printed, to show how soft it is (`--teacher-steps` sets how trained):

   - `ce`: CE on the data (distill recipe, `loss.alpha=0`);
   - `kd_fkl`: off-policy KD on the data's completions (distill recipe, `loss.alpha=1`, `loss.name=fkl`);
   - `kd_jsd`: the same with `loss.name=jsd` (beta 0.5): GKD's divergence without the student's samples, so that
     `gkd_jsd` can be read apart from its divergence;
   - `seq_kd`: sequence-level KD (on_policy recipe, `lmbda=0`, `seq_kd=true`: the teacher samples the completions,
     graded by fkl);
   - `gkd_jsd`: GKD (on_policy, `lmbda=0.5`, `objective=gkd`, `loss.name=jsd`, beta 0.5);
   - `gkd_fkl1`, `gkd_rkl1`: fully on-policy GKD (lmbda 1) with fkl / rkl over the full vocabulary (`gkd_rkl1` is
     the exact expectation of the sampled reverse KL below, at the same samples);
   - `rkl_onpolicy`: on-policy sampled reverse KL (on_policy, `lmbda=1`, `objective=rkl_sampled`);
   - `rkl_baseline`: the same with `baseline=batch` (the micro-batch's mean advantage subtracted);
   - `rkl_topk4`: on-policy reverse KL over the teacher's top-4 tokens + the rest bucket (`objective=rkl_topk`);
   - `rkl_topk2`: the same with K = 2;
   - `minillm`: MiniLLM (`objective=minillm`: single step, length normalization, `teacher_mix=0.2`, batch baseline);
   - `distillm`: DistiLLM (`objective=gkd` with `loss.name=srkl`, skew 0.1; lmbda from 0, adaptive every 50 steps on
     the validation split; replay buffer of 1,000).

With several `--lr`, every arm is trained at each of them on `--sweep-seed` and scored on the validation prompts
(exact match, ties broken by char accuracy); its best lr is then run on the other seeds, and the sweep seed's run at
that lr is the table's first seed. `--jobs N` runs N trainings at a time (worker processes); the work dir is a
cache: a run whose `arena.json` records the same overrides is scored, not retrained; the dir holds one task,
teacher and student start (`arena_settings.json`: a second `--student` or `--sft-steps` there is refused).
`--lsd-first` writes the answer least-significant digit first; `--start` picks the recipe of the `--sft-steps` stage
(e.g. `kd_fkl` for a KD start).

Metrics (`score_rows`), all on the same greedy answers to the held-out prompts: exact match (answer tokens up to
`<eos>` equal to the true answer: the issue's "accuracy of greedy answers"), char accuracy (right answer positions,
position-wise) and normalized edit distance (Levenshtein / longer length, lower is better): the last two credit an
answer that is right again after an error. One table per metric, each with every arm's paired difference to
`kd_fkl` and to `seq_kd` on the same seed (same start: it removes the start's luck) as mean [min, max] and the 95 %
t-interval's half-width, then a `beats` line per arm: every paired difference favours it by more than the
reference's seed spread. Also printed: recovery (over the wrong answers, the right positions after the first wrong
one), the wall seconds of each training run (load + train + save, without the evaluation), and, for each start,
the scores of its temperature-1 samples (what the on-policy arms' rollouts look like).

    python benchmarks/on_policy_arena.py                  # the from-scratch table of benchmarks/README.md
    python benchmarks/on_policy_arena.py --teacher-steps 600 --sft-steps 300 --steps 300 --seeds 2 \
        --arms ce kd_fkl seq_kd gkd_jsd rkl_baseline rkl_topk4 minillm distillm     # from an SFT start, soft teacher
    python benchmarks/on_policy_arena.py --teacher-steps 600 --sft-steps 600 --steps 400 --seeds 3 --eval 2000 \
        --val 500 --lr 3e-4 1e-3 3e-3 --jobs 2 --arms ce kd_fkl seq_kd gkd_jsd gkd_rkl1 rkl_baseline minillm
    python benchmarks/on_policy_arena.py --task reverse --digits 8 --teacher-corrupt 0.5 --teacher-steps 600 \
        --student 24x2 --sft-steps 600 --steps 200 --seeds 3 --eval 1000 --val 300 --lr 1e-3 3e-3 --jobs 2 \
        --arms ce kd_fkl seq_kd gkd_rkl1        # long answers, a teacher robust to wrong prefixes, a smaller student
    python benchmarks/on_policy_arena.py --task reverse --digits 8 --teacher-corrupt 0.5 --teacher-steps 600 \
        --student 24x2 --sft-steps 300 --steps 200 --seeds 5 --eval 1000 --val 300 --lr 1e-3 3e-3 --jobs 2 \
        --arms ce kd_fkl seq_kd gkd_jsd gkd_rkl1     # the same with a shorter start, 5 seeds
    python benchmarks/on_policy_arena.py --quick          # a smoke run (tiny teacher budget, 20 student steps)
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
ALPHABET = list("0123456789+=")
ARMS = {
    "ce": ["train.recipe=distill", "loss.alpha=0"],
    "kd_fkl": ["train.recipe=distill", "loss.alpha=1", "loss.name=fkl"],
    "kd_jsd": ["train.recipe=distill", "loss.alpha=1", "loss.name=jsd", "loss.beta=0.5"],
    "seq_kd": ["train.recipe=on_policy", "loss.alpha=1", "loss.name=fkl", "on_policy.lmbda=0", "on_policy.seq_kd=true"],
    "gkd_jsd": [
        "train.recipe=on_policy",
        "loss.alpha=1",
        "loss.name=jsd",
        "loss.beta=0.5",
        "on_policy.lmbda=0.5",
        "on_policy.objective=gkd",
    ],
    "gkd_fkl1": [
        "train.recipe=on_policy",
        "loss.alpha=1",
        "loss.name=fkl",
        "on_policy.lmbda=1",
        "on_policy.objective=gkd",
    ],
    "gkd_rkl1": [
        "train.recipe=on_policy",
        "loss.alpha=1",
        "loss.name=rkl",
        "on_policy.lmbda=1",
        "on_policy.objective=gkd",
    ],
    "rkl_onpolicy": ["train.recipe=on_policy", "loss.alpha=1", "on_policy.lmbda=1", "on_policy.objective=rkl_sampled"],
    "rkl_baseline": [
        "train.recipe=on_policy",
        "loss.alpha=1",
        "on_policy.lmbda=1",
        "on_policy.objective=rkl_sampled",
        "on_policy.baseline=batch",
    ],
    "rkl_topk4": [
        "train.recipe=on_policy",
        "loss.alpha=1",
        "on_policy.lmbda=1",
        "on_policy.objective=rkl_topk",
        "on_policy.top_k=4",
    ],
    "rkl_topk2": [
        "train.recipe=on_policy",
        "loss.alpha=1",
        "on_policy.lmbda=1",
        "on_policy.objective=rkl_topk",
        "on_policy.top_k=2",
    ],
    "distillm": [
        "train.recipe=on_policy",
        "loss.alpha=1",
        "loss.name=srkl",
        "loss.skew=0.1",
        "on_policy.objective=gkd",
        "on_policy.lmbda=0",
        "on_policy.adaptive=true",
        "on_policy.adaptive_every=50",
        "on_policy.replay_size=1000",
    ],
    "minillm": [
        "train.recipe=on_policy",
        "loss.alpha=1",
        "on_policy.lmbda=1",
        "on_policy.objective=minillm",
        "on_policy.teacher_mix=0.2",
        "on_policy.baseline=batch",
    ],
}


def build_tokenizer():
    """A character-level tokenizer (a BPE with no merges over digits, '+', '='), with <pad>/<bos>/<eos>/<unk>."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + ALPHABET)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )


def build_model(tokenizer, out: Path, seed: int, hidden: int, layers: int, heads: int) -> Path:
    """A random LlamaForCausalLM over `tokenizer`, saved with it as an HF directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def task_pairs(task: str, digits: int) -> list[tuple[str, str]]:
    """Every (prompt, answer) of the task, shuffled (seed 0). `add`: operands of `digits` digits, the sum zero-padded
    to `digits + 1` (`"57+68="` -> `"125"`); `reverse`: a string of `digits` digits, reversed (`"0417="` ->
    `"7140"`). Above 2 digits (add) or 4 (reverse), 60,000 distinct prompts sampled (seed 1) keep the files small."""
    rng = random.Random(1)
    if task == "add":
        lo, hi = 10 ** (digits - 1), 10**digits
        if digits <= 2:
            ops = [(a, b) for a in range(lo, hi) for b in range(lo, hi)]
        else:
            ops = sorted({(rng.randrange(lo, hi), rng.randrange(lo, hi)) for _ in range(60_000)})
        pairs = [(f"{a}+{b}=", f"{a + b:0{digits + 1}d}") for a, b in ops]
    else:
        if digits <= 4:
            strings = [f"{i:0{digits}d}" for i in range(10**digits)]
        else:
            strings = sorted({"".join(rng.choice("0123456789") for _ in range(digits)) for _ in range(60_000)})
        pairs = [(f"{x}=", x[::-1]) for x in strings]
    random.Random(0).shuffle(pairs)
    return pairs


def corrupt(prompt: str, answer: str, rng: random.Random) -> tuple[str, str]:
    """A recovery row for a teacher robust to wrong prefixes: a random cut j in [1, len - 1]; the first j answer
    characters, at least one of them changed to another digit, join the prompt, and the completion is the true
    answer from j on. Trained on such rows, the teacher learns to write the right next characters after an error
    (the labels never follow the error); the row keeps its length."""
    j = rng.randint(1, len(answer) - 1)
    prefix = list(answer[:j])
    wrong = {rng.randrange(j)} | {i for i in range(j) if rng.random() < 0.3}
    for i in wrong:
        prefix[i] = rng.choice([d for d in "0123456789" if d != prefix[i]])
    return prompt + "".join(prefix), answer[j:]


def write_rows(path: Path, pairs: list[tuple[str, str]]) -> Path:
    with path.open("w") as f:
        for prompt, answer in pairs:
            f.write(json.dumps({"prompt": prompt, "completion": answer}) + "\n")
    return path


def make_task(
    work: Path, digits: int, n_eval: int, n_val: int, lsd_first: bool = False, task: str = "add", corrupt_p: float = 0
) -> tuple:
    """Write the training and validation prompts (prompt/completion JSONL) and the teacher's training rows (the
    training rows, a share `corrupt_p` of them made recovery rows by `corrupt`, seed 2); return the three paths,
    the held-out and the validation (prompt, answer) pairs. With `lsd_first`, answers are written reversed
    (least-significant digit first for `add`: `"57+68="` -> `"521"`)."""
    pairs = [(p, a[::-1] if lsd_first else a) for p, a in task_pairs(task, digits)]
    held, val, train = pairs[:n_eval], pairs[n_eval : n_eval + n_val], pairs[n_eval + n_val :]
    rng = random.Random(2)
    teacher_rows = [corrupt(p, a, rng) if rng.random() < corrupt_p else (p, a) for p, a in train]
    return (
        write_rows(work / "train.jsonl", train),
        write_rows(work / "val.jsonl", val),
        write_rows(work / "teacher_train.jsonl", teacher_rows),
        held,
        val,
    )


def _held_ids(tok, held: list[tuple[str, str]]) -> torch.Tensor:
    """[N, 1 + prompt] `<bos>` + prompt ids of the held-out prompts (all the same length)."""
    return torch.tensor([[tok.bos_token_id] + tok(p, add_special_tokens=False)["input_ids"] for p, _ in held])


def score_rows(rows: list[list[int]], answers: list[list[int]], eos: int) -> dict[str, float]:
    """Scores of generated token rows against the true answers' tokens, each row cut at its first `<eos>`:
    `exact`: the row spells the answer. `char`: the share of answer positions whose generated token is right
    (position-wise: a dropped character makes the rest wrong). `edit`: the mean normalized Levenshtein distance
    (rapidfuzz: edits / max(len(row), len(answer)); 0 = right, lower is better), which, unlike `char`, does not
    punish a shifted rest twice. `recovery`: over the rows with a wrong position, the share of the positions after
    the first wrong one that are right again (the answers' later tokens do not depend on the earlier ones: what a
    student continues with after its own error; 0 when no row has an error followed by positions)."""
    from rapidfuzz.distance import Levenshtein

    exact = chars = edit = after = after_n = 0
    for row, answer in zip(rows, answers, strict=True):
        row = row[: row.index(eos)] if eos in row else row
        exact += row == answer
        edit += Levenshtein.normalized_distance(row, answer)
        ok = [i < len(row) and row[i] == tok for i, tok in enumerate(answer)]
        chars += sum(ok)
        if not all(ok):
            first = ok.index(False)
            after, after_n = after + sum(ok[first + 1 :]), after_n + len(ok) - first - 1
    n = len(rows)
    return {
        "exact": exact / n,
        "char": chars / sum(map(len, answers)),
        "edit": edit / n,
        "recovery": after / after_n if after_n else 0.0,
    }


@torch.no_grad()
def accuracy(model_dir: Path, held: list[tuple[str, str]], sample: bool = False) -> dict[str, float]:
    """Greedy answers (at most the answer + 1 tokens) to `held`, scored by `score_rows`.
    With `sample`, temperature-1 samples (seed 0) instead, as the on-policy arms' rollouts draw them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = _held_ids(tok, held)
    torch.manual_seed(0)
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        do_sample=sample,
        temperature=1.0,
        top_p=1.0,
        max_new_tokens=len(held[0][1]) + 1,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )[:, ids.shape[1] :]
    answers = [tok(answer, add_special_tokens=False)["input_ids"] for _, answer in held]
    return score_rows(out.tolist(), answers, tok.eos_token_id)


@torch.no_grad()
def teacher_softness(model_dir: Path, held: list[tuple[str, str]]) -> tuple[float, float]:
    """The teacher's mean entropy (nats) and mean probability of the true token, over the answer positions of the
    held-out rows, teacher-forced on the true answer: how much its distributions carry beyond the label."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    answers = torch.tensor([tok(a, add_special_tokens=False)["input_ids"] for _, a in held])
    prompts = _held_ids(tok, held)
    ids = torch.cat([prompts, answers], dim=1)
    logp = model(input_ids=ids).logits[:, prompts.shape[1] - 1 : -1].float().log_softmax(-1)
    entropy = -(logp.exp() * logp).sum(-1).mean().item()
    p_true = logp.gather(-1, answers.unsqueeze(-1)).exp().mean().item()
    return entropy, p_true


def train(out: Path, overrides: list[str]) -> float:
    """One `run_distill` into `out` (overwritten); returns its wall seconds."""
    from potstill.config import load_config
    from potstill.train.recipes import run_distill

    cfg = load_config(None, [f"train.output_dir={out}", "train.overwrite=true", *overrides], run=True)
    start = time.perf_counter()
    run_distill(cfg)
    return time.perf_counter() - start


def train_and_score(out: Path, overrides: list[str], prompts: list[tuple[str, str]], threads: int) -> tuple:
    """`train` (unless `out/arena.json` records a finished run with the same overrides: the work dir is a cache),
    then the student's greedy scores on `prompts` (`accuracy`), train seconds, final training log.
    Runs in a worker process (`--jobs`), so it sets its own thread count."""
    torch.set_num_threads(threads)
    record = out / "arena.json"
    done = json.loads(record.read_text()) if record.exists() else {}
    if done.get("overrides") != overrides:
        done = {"overrides": overrides, "seconds": train(out, overrides)}
        record.write_text(json.dumps(done))
    log_file = out / "log.jsonl"  # (none when no logging step came)
    lines = log_file.read_text().splitlines() if log_file.exists() else []
    logs = [json.loads(line) for line in lines if line.strip()]
    last = next((row for row in reversed(logs) if "loss" in row), {})
    return accuracy(out / "student", prompts), done["seconds"], last


def _scores(sc: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.3f}" for k, v in sc.items())


def _health(log: dict) -> str:
    """The last training log's health figures, for the run lines."""
    keys = ("kd", "rollout_eos_rate", "rollout_len", "rollout_distinct2", "advantage_std", "grad_norm")
    return " ".join(f"{k} {log[k]:.3g}" for k in keys if k in log)


def run_all(jobs: list[tuple[Path, list[str], list]], threads: int, workers: int) -> list[tuple]:
    """Every (out, overrides, prompts) job through `train_and_score`, `workers` at a time; results in job order."""
    if workers <= 1:
        return [train_and_score(out, o, pr, threads) for out, o, pr in jobs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(train_and_score, out, o, pr, threads) for out, o, pr in jobs]
        return [f.result() for f in futures]


# what lies behind the work dir's fixed paths (data, teacher, inits, starts): the runs' records key on overrides only
WORK_SETTINGS = ("task", "digits", "lsd_first", "teacher", "teacher_steps", "teacher_corrupt", "eval", "val", "student")
WORK_SETTINGS += ("start", "sft_steps", "sft_lr", "batch_size")


def claim_work(work: Path, settings: dict) -> None:
    """Refuse a `--work` dir made with other `settings` (the `WORK_SETTINGS` of the args), else record them.

    Its data files, teacher, student inits and starts sit at paths that do not name these settings, and a finished
    run is reused when its overrides match, so a second student size in the same dir would silently score the
    first size's runs. Raises SystemExit with one line naming the options that differ."""
    stamp = work / "arena_settings.json"
    if stamp.exists():
        old = json.loads(stamp.read_text())
        diff = [f"--{k.replace('_', '-')} {old.get(k)} (now {v})" for k, v in settings.items() if old.get(k) != v]
        if diff:
            raise SystemExit(
                f"on_policy_arena: --work {work} holds runs made with {', '.join(diff)}; use another --work"
            )
    else:
        stamp.write_text(json.dumps(settings))


LOWER_BETTER = {"exact": False, "char": False, "edit": True}  # the table's metrics, and their direction


def paired(values: list[float], reference: list[float], lower_better: bool = False) -> dict:
    """Per-seed differences `values - reference` (the same seeds, in order) and their summary: mean, min, max, the
    half-width of the 95 % t-interval of the mean (nan below 2 seeds), and `beats`: every difference favours
    `values` (one-signed, strictly) by more than the reference's seed spread (max - min of its levels)."""
    from scipy.stats import t

    diffs = [a - b for a, b in zip(values, reference, strict=True)]
    n, mean = len(diffs), statistics.mean(diffs)
    half = float(t.ppf(0.975, n - 1)) * statistics.stdev(diffs) / n**0.5 if n > 1 else float("nan")
    sign = -1 if lower_better else 1
    spread = max(reference) - min(reference)
    beats = all(sign * d > 0 for d in diffs) and sign * mean > spread
    return {"diffs": diffs, "mean": mean, "min": min(diffs), "max": max(diffs), "half": half, "beats": beats}


def _paired_cell(d: dict) -> str:
    return f"{d['mean']:+.3f} [{d['min']:+.3f}, {d['max']:+.3f}] ±{d['half']:.3f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="add", choices=["add", "reverse"], help="addition, or reversing a digit string")
    p.add_argument(
        "--digits",
        type=int,
        default=2,
        help="add: digits per operand (the answer has one more); reverse: the string's length",
    )
    p.add_argument("--lsd-first", action="store_true", help="write the answer least-significant digit first")
    p.add_argument("--steps", type=int, default=1500, help="student optimizer steps, every arm")
    p.add_argument("--seeds", type=int, default=3, help="seeds per arm (student init and train.seed)")
    p.add_argument("--batch-size", type=int, default=32, help="student train.batch_size, every arm")
    p.add_argument("--lr", type=float, nargs="+", default=[2e-3], help="student train.lr; several: a sweep per arm")
    p.add_argument("--sweep-seed", type=int, default=100, help="the seed of the lr sweep (scored on the val split)")
    p.add_argument("--sft-steps", type=int, default=0, help="steps of --start from random init before every arm")
    p.add_argument("--start", default="ce", choices=list(ARMS), help="the recipe of those steps (ce: SFT)")
    p.add_argument("--sft-lr", type=float, default=2e-3, help="train.lr of the start stage")
    p.add_argument("--student", default="48x2", help="student hidden x layers")
    p.add_argument("--teacher", default="128x4", help="teacher hidden x layers")
    p.add_argument("--teacher-steps", type=int, default=3000)
    p.add_argument("--teacher-corrupt", type=float, default=0.0, help="share of the teacher's rows made recovery rows")
    p.add_argument("--eval", type=int, default=500, help="held-out prompts")
    p.add_argument("--val", type=int, default=200, help="validation prompts (DistiLLM's data.eval, the lr sweep)")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--work", type=Path, default=Path("/tmp/potstill_arena"))
    p.add_argument("--retrain-teacher", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="torch threads per training run")
    p.add_argument("--jobs", type=int, default=1, help="training runs at a time (worker processes)")
    p.add_argument("--quick", action="store_true", help="smoke run: 20 student steps, 1 seed, 200 teacher steps")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.seeds, args.teacher_steps, args.eval = 20, 1, 200, 200
        args.sft_steps = min(args.sft_steps, 20)
        args.work = args.work.with_name(args.work.name + "_quick")
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    claim_work(args.work, {k: getattr(args, k) for k in WORK_SETTINGS})
    tok = build_tokenizer()
    data, val, teacher_data, held, val_pairs = make_task(
        args.work, args.digits, args.eval, args.val, args.lsd_first, args.task, args.teacher_corrupt
    )
    answer_len = len(held[0][1])
    seq_len = 1 + len(held[0][0]) + answer_len + 1  # <bos> + prompt + answer + <eos>
    common = [f"data.train=[{data}]", f"data.eval=[{val}]", f"data.seq_len={seq_len}", "train.logging_steps=50"]
    common += ["train.warmup_steps=20", f"on_policy.max_new_tokens={answer_len + 1}", "on_policy.temperature=1.0"]

    teacher = args.work / "teacher" / "student"
    if args.retrain_teacher or not (teacher / "config.json").exists():
        t_hidden, t_layers = (int(x) for x in args.teacher.split("x"))
        init = build_model(tok, args.work / "teacher_init", seed=1234, hidden=t_hidden, layers=t_layers, heads=4)
        secs = train(
            args.work / "teacher",
            [
                f"model.student={init}",
                "loss.alpha=0",
                *common,
                f"data.train=[{teacher_data}]",
                f"train.max_steps={args.teacher_steps}",
                "train.batch_size=64",
                "train.lr=1e-3",
            ],
        )
        print(f"teacher trained in {secs:.0f} s", flush=True)
    teacher_scores = accuracy(teacher, held)
    entropy, p_true = teacher_softness(teacher, held)
    print(
        f"teacher ({args.teacher}) held-out greedy {_scores(teacher_scores)}; answer positions: entropy"
        f" {entropy:.3f} nats, p(true token) {p_true:.3f}",
        flush=True,
    )

    hidden, layers = (int(x) for x in args.student.split("x"))

    def start_job(seed: int) -> tuple[Path, list[str], list]:
        """The run that trains `seed`'s start: --sft-steps of --start from the seed's random init."""
        init = build_model(tok, args.work / f"student_init_{seed}", seed=seed, hidden=hidden, layers=layers, heads=2)
        run = [f"train.seed={seed}", f"train.max_steps={args.sft_steps}", f"train.lr={args.sft_lr}"]
        run += [f"train.batch_size={args.batch_size}", f"model.teacher={teacher}"]
        return (
            args.work / f"{args.start}_start_s{seed}",
            [f"model.student={init}", *common, *ARMS[args.start], *run],
            held,
        )

    def job(arm: str, seed: int, lr: float, prompts: list) -> tuple[Path, list[str], list]:
        """The run of `arm` at `lr` from `seed`'s start (the same directory for the sweep and the final table)."""
        start = starts[seed]
        overrides = [f"model.student={start}", f"model.teacher={teacher}", *common, *ARMS[arm], f"train.seed={seed}"]
        overrides += [f"train.max_steps={args.steps}", f"train.batch_size={args.batch_size}", f"train.lr={lr}"]
        return args.work / f"{arm}_lr{lr:g}_s{seed}", overrides, prompts

    sweeping = len(args.lr) > 1
    # with a sweep, its seed is the first seed of the table: its runs at the chosen lr are scored on held-out too
    seeds = (
        list(dict.fromkeys([args.sweep_seed, *range(args.seeds)]))[: args.seeds] if sweeping else [*range(args.seeds)]
    )
    starts: dict[int, Path] = {}
    start_scores: dict[int, dict[str, float]] = {}
    if args.sft_steps:  # every arm of a seed starts from the same checkpoint
        for seed, (sc, _, _) in zip(
            seeds, run_all([start_job(s) for s in seeds], args.threads, args.jobs), strict=True
        ):
            starts[seed], start_scores[seed] = args.work / f"{args.start}_start_s{seed}" / "student", sc
            print(f"{args.start} start seed {seed} ({args.sft_steps} steps): held-out {_scores(sc)}", flush=True)
            print(f"  its temperature-1 samples: {_scores(accuracy(starts[seed], held, sample=True))}", flush=True)
    else:
        for seed in seeds:
            init = args.work / f"student_init_{seed}"
            starts[seed] = build_model(tok, init, seed=seed, hidden=hidden, layers=layers, heads=2)

    best = {arm: args.lr[0] for arm in args.arms}
    if sweeping:  # the same lr sweep for every arm, on one seed, scored on the validation prompts
        grid = [(arm, lr) for arm in args.arms for lr in args.lr]
        jobs = [job(arm, args.sweep_seed, lr, val_pairs) for arm, lr in grid]
        sweep: dict[str, dict[float, dict]] = {arm: {} for arm in args.arms}
        for (arm, lr), (sc, secs, log) in zip(grid, run_all(jobs, args.threads, args.jobs), strict=True):
            sweep[arm][lr] = sc
            print(f"sweep {arm} lr {lr:g}: val {_scores(sc)} in {secs:.1f} s; {_health(log)}", flush=True)
        # exact match decides; char accuracy breaks its ties (a student far below the teacher is often at 0 exact)
        best = {
            arm: max(args.lr, key=lambda lr, arm=arm: (sweep[arm][lr]["exact"], sweep[arm][lr]["char"]))
            for arm in args.arms
        }
        print(
            f"\nlr sweep (seed {args.sweep_seed}, {len(val_pairs)} validation prompts, exact match / char accuracy)\n"
        )
        print("| arm | " + " | ".join(f"lr {lr:g}" for lr in args.lr) + " | chosen |")
        print("|---|" + "---:|" * (len(args.lr) + 1))
        for arm in args.arms:
            cells = " | ".join(f"{sweep[arm][lr]['exact']:.3f} / {sweep[arm][lr]['char']:.3f}" for lr in args.lr)
            print(f"| {arm} | {cells} | {best[arm]:g} |")

    grid = [(arm, seed) for seed in seeds for arm in args.arms]
    jobs = [job(arm, seed, best[arm], held) for arm, seed in grid]
    results: dict[str, list[dict[str, float]]] = {arm: [] for arm in args.arms}
    seconds: dict[str, list[float]] = {arm: [] for arm in args.arms}
    for (arm, seed), (sc, secs, log) in zip(grid, run_all(jobs, args.threads, args.jobs), strict=True):
        results[arm].append(sc)
        seconds[arm].append(secs)
        print(f"{arm} seed {seed} lr {best[arm]:g}: {_scores(sc)} in {secs:.1f} s; {_health(log)}", flush=True)

    order = "answers reversed (lsd first)" if args.lsd_first else "answers as written"
    print(
        f"\nteacher {args.teacher}: {_scores(teacher_scores)} held-out ({len(held)} prompts, {args.task},"
        f" {args.digits} digits, {order})"
    )
    begin = f"from the {args.start} student of its seed ({args.sft_steps} steps)" if start_scores else "from init"
    print(f"student {args.student}, {args.steps} steps x batch {args.batch_size}, {begin}")
    header = " | ".join(f"seed {s}" for s in seeds)
    refs = [r for r in ("kd_fkl", "seq_kd") if r in results] or args.arms[:1]
    ref_head = " | ".join(f"- {r} per seed: mean [min, max] ±95% t" for r in refs)
    for metric, lower in LOWER_BETTER.items():
        print(f"\n{metric}{' (lower is better)' if lower else ''}, greedy answers, held-out\n")
        print(f"| arm | {header} | mean | spread (max - min) | lr | {ref_head} | seconds |")
        print("|---|" + "---:|" * (len(seeds) + 4 + len(refs)))
        if start_scores:
            vals = [start_scores[s][metric] for s in seeds]
            cells = " | ".join(f"{v:.3f}" for v in vals)
            print(
                f"| (start) | {cells} | {statistics.mean(vals):.3f} | {max(vals) - min(vals):.3f} |"
                + " |" * (2 + len(refs))
            )
        for arm, rows in results.items():
            vals = [sc[metric] for sc in rows]
            ref_cells = " | ".join(_paired_cell(paired(vals, [sc[metric] for sc in results[r]], lower)) for r in refs)
            cells = " | ".join(f"{v:.3f}" for v in vals)
            print(
                f"| {arm} | {cells} | {statistics.mean(vals):.3f} | {max(vals) - min(vals):.3f} | {best[arm]:g} |"
                f" {ref_cells} | {statistics.mean(seconds[arm]):.1f} |"
            )
    recovery = {arm: " / ".join(f"{sc['recovery']:.3f}" for sc in rows) for arm, rows in results.items()}
    print(
        "\nrecovery (right positions after the first wrong one), per seed: "
        + "; ".join(f"{a} {r}" for a, r in recovery.items())
    )
    print("\nbeats (every paired difference favours the arm, by more than the reference's seed spread):")
    for arm in args.arms:
        if arm in refs:
            continue
        verdict = []
        for metric, lower in LOWER_BETTER.items():
            wins = [
                paired([sc[metric] for sc in results[arm]], [sc[metric] for sc in results[r]], lower)["beats"]
                for r in refs
            ]
            verdict.append(f"{metric} {'+'.join(refs)}: {'yes' if all(wins) else 'no'}")
        print(f"  {arm}: " + "; ".join(verdict))
    return 0


if __name__ == "__main__":
    sys.exit(main())
