"""Several teachers and `potstill teacher select` on a tiny CE-trained ladder (issue 16, measures (b) and (c)).

Data: the demo's corpus (`code`, `docstrings`, `docs` from the Python standard library) and a non-code domain
(`licenses`), built and split as in `ddk_vs_uniform.py` (OUT/data: fit.jsonl to train on, ddk_eval.jsonl = the
last records of each domain's training text, what `teacher select` measures on, heldout.jsonl = the final
evaluation, never seen by any run or by select).

Models (one byte-level BPE of 512 ids, shared by all): a ladder of teachers trained CE-only on fit.jsonl for
the same steps (`t32x1`, `t64x2`, `t128x4`: hidden x layers), two specialists of the `t128x4` shape
trained on two domains each (`code`: code + docstrings, `prose`: docs + licenses), and one random student
(hidden 48, 2 layers) that every arm starts from.

Phases (each reuses what an earlier run left in OUT):
- `teachers`: data, tokenizer, the student and the ladder;
- `specialists`: the two specialists;
- `full`: (c) the student distilled from each ladder teacher and CE-only, `--steps` steps, `--seeds` data orders,
  held-out bpb per domain; the full runs' ranking;
- `select`: (c) `potstill teacher select` over the ladder with short probes (`--probe-seed`: their data order);
- `compare`: (c) select's rankings against the full runs';
- `cross`: a teacher of another tokenizer (1024-id BPE, 64x2): full runs from it, and select over it and t64x2;
- `multi`: (b) two specialists routed per domain, and the two summed (weights 0.5 / 0.5), against each specialist
  alone; and two generalists of the ladder summed (`ladder_summed`: t64x2 + t128x4) against the better one alone
  (its `full` run); same budget and seeds.

    python benchmarks/teacher_ladder.py --out runs/ladder --phase teachers specialists full select compare multi
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from ddk_vs_uniform import add_licenses, split_ddk_eval, tiny_pair  # noqa: E402

from potstill.config import load_config  # noqa: E402
from potstill.data import load_dataset  # noqa: E402
from potstill.data.corpus import build_corpus  # noqa: E402
from potstill.eval.metrics import evaluate  # noqa: E402
from potstill.fileio import write_text_atomic  # noqa: E402
from potstill.models.load import load_model  # noqa: E402
from potstill.train.recipes import run_distill  # noqa: E402

LADDER = {"t32x1": (32, 1), "t64x2": (64, 2), "t128x4": (128, 4)}
SPECIALISTS = {"code": ("code", "docstrings"), "prose": ("docs", "licenses")}
DOMAINS = ("code", "docstrings", "docs", "licenses")
SELECT_DIR = lambda seed: "select" if seed == 1 else f"select_seed{seed}"  # noqa: E731
CE_TEACHER = ["loss.alpha=0", "train.batch_size=16", "train.lr=0.003"]


def new_model(path: Path, tokenizer_dir: Path, hidden: int, layers: int, seq_len: int) -> Path:
    """A random Llama of this shape with the shared tokenizer (seed 0)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (path / "config.json").is_file():
        return path
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=seq_len,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def distill(out: Path, student: Path, overrides: list[str], args, steps: int, seed: int = 1) -> dict:
    """One `potstill distill` run (skipped when OUT/summary.json exists); returns its student dir and wall time."""
    began = time.perf_counter()
    if not (out / "summary.json").is_file():
        run_distill(load_config(None, [
            f"model.student={student}", f"data.train=[{args.out / 'data' / 'fit.jsonl'}]",
            f"data.seq_len={args.seq_len}", f"train.output_dir={out}", f"train.max_steps={steps}",
            f"train.batch_size={args.batch_size}", f"train.lr={args.lr}", "train.warmup_steps=10",
            "train.logging_steps=50", "train.overwrite=true", f"train.seed={seed}", *overrides,
        ]))  # fmt: skip
    return {"student": str(out / "student"), "seconds": time.perf_counter() - began}


def phase_teachers(args) -> dict:
    """Data, tokenizer, the student and the ladder (CE-only, `--teacher-steps` each)."""
    data = args.out / "data"
    if not (data / "fit.jsonl").is_file():
        build_corpus(data, seed=0, train_bytes=args.train_bytes, heldout_bytes=args.train_bytes // 10)
        add_licenses(data, max_bytes=args.train_bytes)
        split_ddk_eval(data, args.eval_tokens)
    models = args.out / "models"
    t128, student = tiny_pair(data, models, args.teacher_steps, args.seq_len)  # tokenizer, t128x4, the student
    teachers = {"t128x4": str(t128)}
    for name, (hidden, layers) in LADDER.items():
        if name != "t128x4":
            init = new_model(models / f"{name}_init", student, hidden, layers, args.seq_len)
            teachers[name] = distill(models / name, init, CE_TEACHER, args, args.teacher_steps, seed=0)["student"]
    return {
        "student": str(student),
        "teachers": teachers,
        "evals": {n: score(Path(p), args) for n, p in teachers.items()},
    }


def phase_specialists(args) -> dict:
    """Two teachers of the t128x4 shape trained CE-only on two domains each, `--teacher-steps` steps."""
    models = args.out / "models"
    teachers = {}
    for name, keep in SPECIALISTS.items():
        if args.only and name not in args.only:
            continue
        weights = ", ".join(f"{d}: {1 if d in keep else 0}" for d in DOMAINS)
        mixing = ["data.mixing.mode=fixed", f"data.mixing.weights={{{weights}}}"]
        init = new_model(models / "t128x4_init_spec", models / "student", 128, 4, args.seq_len)
        run = distill(models / f"specialist_{name}", init, CE_TEACHER + mixing, args, args.teacher_steps, seed=0)
        teachers[name] = run["student"]
    return {
        "teachers": teachers,
        "evals": {n: score(Path(p), args) for n, p in teachers.items()},
        "steps": args.teacher_steps,
    }


KD = ["loss.name=fkl", "loss.alpha=0.5"]


def arms_of(args) -> dict[str, list[str]]:
    """The full runs of (c): CE-only and KD from each ladder teacher (`--teachers` limits them)."""
    models = args.out / "models"
    paths = {n: models / ("teacher_run" if n == "t128x4" else n) / "student" for n in LADDER}
    arms = {"ce": ["loss.alpha=0"]}
    arms |= {n: [*KD, f"model.teacher={p}"] for n, p in paths.items() if n in (args.teachers or LADDER)}
    return arms


def run_arms(args, group: str, arms: dict[str, list[str]], steps: int) -> dict:
    """Each arm once per seed (OUT/<group>/<arm>/seed<s>), scored on heldout.jsonl; mean and spread per arm."""
    student = args.out / "models" / "student"
    out = {}
    for name, overrides in arms.items():
        runs = [
            distill(args.out / group / name / f"seed{s}", student, overrides, args, steps, seed=s) for s in args.seeds
        ]
        scores = [score(Path(r["student"]), args) for r in runs]
        out[name] = {
            "bpb": sum(x["bpb"] for x in scores) / len(scores),
            "spread": max(x["bpb"] for x in scores) - min(x["bpb"] for x in scores),
            "by_domain": {d: sum(x[d] for x in scores) / len(scores) for d in DOMAINS},
            "seeds": scores,
            "seconds": [r["seconds"] for r in runs],
        }
        print(name, json.dumps(out[name]), flush=True)
    return out


def phase_full(args) -> dict:
    """(c) the full runs: the student from CE only and from each ladder teacher; their ranking by held-out bpb."""
    arms = run_arms(args, "full", arms_of(args), args.steps)
    ranking = sorted((n for n in arms if n != "ce"), key=lambda n: arms[n]["bpb"])
    return {"arms": arms, "ranking": ranking, "steps": args.steps, "seeds": args.seeds}


def phase_select(args) -> dict:
    """(c) `potstill teacher select` over the ladder: probes of `--probe-steps` on fit.jsonl, measured on
    ddk_eval.jsonl (never the final held-out text)."""
    from potstill.plan.select import select_teachers

    data = args.out / "data"
    teachers = {n: o[-1].split("=", 1)[1] for n, o in arms_of(args).items() if n != "ce"}
    began = time.perf_counter()
    result = select_teachers(
        [Path(p) for p in teachers.values()], args.out / "models" / "student", [data / "fit.jsonl"],
        args.out / SELECT_DIR(args.probe_seed), eval_files=[data / "ddk_eval.jsonl"], probe_steps=args.probe_steps,
        seq_len=args.seq_len, batch_size=args.batch_size,
        overrides=[*KD, f"train.lr={args.lr}", "train.warmup_steps=10", "train.logging_steps=50",
                   f"train.seed={args.probe_seed}"],
    )  # fmt: skip
    names = dict(zip(result["candidates"], teachers, strict=True))  # select's names -> ladder names
    return {
        "ranking": [names[n] for n in result["ranking"]],
        "by_gain": sorted(
            teachers, key=lambda n: -next(c["gain"] for k, c in result["candidates"].items() if names[k] == n)
        ),
        "cost_ms_per_kb": {names[k]: c["ms_per_kb"] for k, c in result["candidates"].items()},
        "select_seconds": time.perf_counter() - began,
        "recommendation": result["recommendation"],
    }


def phase_compare(args) -> dict:
    """(c) select's rankings (each probe seed, and their mean gain) against the full runs': by gain over CE, and by
    gain per unit of select's cost (ms/kB of the teacher's forward)."""
    full = json.loads((args.out / "results.json").read_text())["full"]
    ladder = {"t128x4": "teacher_run"} | {n: n for n in LADDER if n != "t128x4"}
    sels = [json.loads(p.read_text()) for p in sorted(args.out.glob("select*/select.json"))]

    def of(sel: dict, name: str) -> dict:
        return next(c for k, c in sel["candidates"].items() if k.split("/")[0] == ladder[name])

    cost = {n: of(sels[0], n)["ms_per_kb"] for n in ladder}
    probe = {n: [of(sel, n)["gain"] for sel in sels] for n in ladder}
    mean = {n: sum(g) / len(g) for n, g in probe.items()}
    gains = {n: full["arms"]["ce"]["bpb"] - full["arms"][n]["bpb"] for n in ladder}

    def rank(g: dict, per_cost: bool) -> list[str]:
        return sorted(g, key=lambda n: (g[n] <= 0, -(g[n] / cost[n] if per_cost and g[n] > 0 else g[n])))

    return {
        "full_gains": gains, "probe_gains": probe, "probe_mean_gain": mean, "cost_ms_per_kb": cost,
        "full_by_gain": rank(gains, False), "full_by_gain_per_cost": rank(gains, True),
        "select_by_gain": [rank({n: g[i] for n, g in probe.items()}, False) for i in range(len(sels))],
        "select_by_gain_per_cost": [rank({n: g[i] for n, g in probe.items()}, True) for i in range(len(sels))],
        "mean_by_gain": rank(mean, False), "mean_by_gain_per_cost": rank(mean, True),
    }  # fmt: skip


def phase_multi(args) -> dict:
    """(b) two specialists routed per domain, and summed (0.5 / 0.5), against each alone: same budget and seeds."""
    models = args.out / "models"
    code, prose = (models / f"specialist_{n}" / "student" for n in SPECIALISTS)
    routed = f"model.teachers=[{{path: {code}, domains: [{', '.join(SPECIALISTS['code'])}]}},"
    routed += f" {{path: {prose}, domains: [{', '.join(SPECIALISTS['prose'])}]}}]"
    arms = {
        "code_only": [*KD, f"model.teacher={code}"],
        "prose_only": [*KD, f"model.teacher={prose}"],
        "routed": [*KD, routed],
        "summed": [*KD, f"model.teachers=[{{path: {code}}}, {{path: {prose}}}]"],
        # two generalists of the ladder summed, against the better of them alone (full runs: t64x2)
        "ladder_summed": [
            *KD,
            f"model.teachers=[{{path: {models / 't64x2' / 'student'}}}, "
            f"{{path: {models / 'teacher_run' / 'student'}}}]",
        ],
    }
    arms = run_arms(args, "multi", {n: a for n, a in arms.items() if n in (args.arms or arms)}, args.steps)
    return {"arms": arms, "steps": args.steps, "seeds": args.seeds}


def phase_cross(args) -> dict:
    """A teacher of another tokenizer (byte-level BPE of 1024 ids, 64x2, CE-only like the ladder): `teacher select`
    over it and t64x2 (its KL on 1:1 positions), and full runs from it to set select's ranking against."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from potstill.plan.select import select_teachers

    data, root = args.out / "data", args.out / "models"
    tok_dir = root / "bpe1024"
    if not (tok_dir / "tokenizer.json").is_file():
        texts = [json.loads(line)["text"] for line in (data / "fit.jsonl").read_text().splitlines()]
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=["<pad>", "<bos>", "<eos>", "<unk>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
        tok.train_from_iterator(texts, trainer)
        PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                unk_token="<unk>").save_pretrained(tok_dir)  # fmt: skip
    init = new_model(root / "x64x2_init", tok_dir, 64, 2, 4 * args.seq_len)  # its rows of the same text differ
    teacher = Path(distill(root / "x64x2", init, CE_TEACHER, args, args.teacher_steps, seed=0)["student"])
    full = run_arms(args, "full", {"x64x2": [*KD, f"model.teacher={teacher}"]}, args.steps)
    result = select_teachers(
        [root / "t64x2" / "student", teacher], root / "student", [data / "fit.jsonl"], args.out / "select_cross",
        eval_files=[data / "ddk_eval.jsonl"], probe_steps=args.probe_steps, seq_len=args.seq_len,
        batch_size=args.batch_size,
        overrides=[*KD, f"train.lr={args.lr}", "train.warmup_steps=10", "train.logging_steps=50", "train.seed=1"],
    )  # fmt: skip
    return {"full": full, "teacher": score(teacher, args), "select": {n: {k: c[k] for k in (
        "tokenizer", "bpb", "kl_start", "kl_positions", "ms_per_kb", "gain")} for n, c in result["candidates"].items()},
        "ranking": result["ranking"], "recommendation": result["recommendation"]}  # fmt: skip


def score(model_dir: Path, args) -> dict:
    """Held-out (heldout.jsonl) bpb per domain and overall."""
    model, tokenizer = load_model(str(model_dir))
    ds = load_dataset([args.out / "data" / "heldout.jsonl"], tokenizer, args.seq_len, add_bos=True)
    ev = evaluate(model, ds, batch_size=8, progress=False)
    return {"bpb": ev["overall"]["bpb"], **{d: ev["domains"][d]["bpb"] for d in ev["domains"]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/teacher_ladder"))
    parser.add_argument(
        "--phase",
        nargs="+",
        default=["teachers"],
        choices=["teachers", "specialists", "full", "select", "multi", "compare", "cross"],
    )
    parser.add_argument("--teacher-steps", type=int, default=300)
    parser.add_argument("--steps", type=int, default=150, help="student steps of a full run")
    parser.add_argument("--probe-steps", type=int, default=30, help="student steps of a select probe")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--probe-seed", type=int, default=1, help="select: the probes' data-order seed")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval-tokens", type=int, default=2048)
    parser.add_argument("--train-bytes", type=int, default=150_000)
    parser.add_argument("--teachers", nargs="+", help="full / select: these ladder teachers only")
    parser.add_argument("--arms", nargs="+", help="multi: these arms only")
    parser.add_argument("--only", nargs="+", choices=list(SPECIALISTS), help="specialists: these only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results_path = args.out / "results.json"
    for phase in args.phase:
        began = time.perf_counter()
        got = globals()[f"phase_{phase}"](args) | {"phase_seconds": time.perf_counter() - began}
        results = json.loads(results_path.read_text()) if results_path.is_file() else {}  # other phases may run
        results[SELECT_DIR(args.probe_seed) if phase == "select" else phase] = got
        write_text_atomic(results_path, json.dumps(results, indent=2) + "\n")
        print(json.dumps({phase: got}, indent=1), flush=True)


if __name__ == "__main__":
    main()
