"""DDK vs uniform KD vs CE-only at the same token budget, on 4 local domains of different difficulty.

Domains: `code`, `docstrings`, `docs` from `potstill.data.corpus.build_corpus` (the Python standard library) and
`licenses` (the texts under /usr/share/common-licenses, skipped with a note when absent). Each arm trains the
same student init for the same steps x batch x seq_len, through `potstill distill` (`run_distill`):

- `ce`: loss.alpha=0, uniform domain mix;
- `kd_uniform`: fkl, alpha 0.5, uniform domain mix;
- `kd_ddk`: the same loss, `data.mixing.mode=ddk`; DDK's held-out split (`data.eval`) is the last records of each
  domain's *training* text (OUT/data/ddk_eval.jsonl), so the final evaluation set never picks the weights, and
  every run trains on the rest (OUT/data/fit.jsonl) only, so none has seen what DDK measures.

Then every student and the teacher are scored on the held-out split (`evaluate`): per-domain bpb, the
student/teacher bpb ratio per domain, the worst domain's ratio; DDK's share of training time spent in its
updates; and `potstill report` on each DDK run (weight trajectory plot). Results: OUT/results.json, OUT/table.md.

`--seeds S...` runs each KD arm once per data-order seed (`train.seed`; runs in OUT/<arm>/seed<s>), `ce` with the
first only, so a DDK effect can be set against the spread one seed makes. Runs already in OUT/results.json are
reused (with their times) unless their arm is named in `--rerun`. `--init-steps N` first trains the student N
uniform KD steps (OUT/init, seed 0) and starts every arm from that student, as the DDK paper starts from a
pretrained student rather than a freshly pruned one; `--init-domains D...` limits those steps to some domains
(`data.mixing.mode: fixed`), so the arms start from a student that lags on the others. Seed 0 is then refused
for the arms: a uniform arm with the init's seed draws the very sequences of the init, in the same order.

Models: with `--teacher DIR --student DIR` any HF pair sharing a tokenizer (or a trimmed student with its id
map). Without them (the default, what fits a shared 2-core CPU): a byte-level BPE (vocab 512) trained on the
corpus, a teacher Llama (hidden 128, 4 layers) trained CE-only on the training split first, and a random
student Llama (hidden 48, 2 layers).

    python benchmarks/ddk_vs_uniform.py --out runs/ddk_bench --steps 300

With Gemma 3 270M and a 6-layer student made on the benchmark's own training text (800 kB per domain; the
results in benchmarks/README.md):

    python benchmarks/ddk_vs_uniform.py --out runs/ddk_gemma --data-only --train-bytes 800000
    potstill student init --teacher "$(potstill teacher prepare)" --layers 6 --out runs/ddk_gemma/student \
        --corpus runs/ddk_gemma/data/fit.jsonl --calib-dtype bfloat16
    python benchmarks/ddk_vs_uniform.py --out runs/ddk_gemma --teacher "$(potstill teacher prepare)" \
        --student runs/ddk_gemma/student --lr 3e-4 --bf16 --steps 200 --init-steps 200 --seeds 1 2 --gap logppl \
        --train-bytes 800000
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import torch

from potstill.config import load_config
from potstill.data import load_dataset
from potstill.data.corpus import build_corpus
from potstill.eval.metrics import evaluate
from potstill.eval.report import report_mixing
from potstill.fileio import write_text_atomic
from potstill.models.load import load_model
from potstill.train.recipes import run_distill

LICENSES = Path("/usr/share/common-licenses")
ARMS = ("ce", "kd_uniform", "kd_ddk")
INIT_SEED = 0  # the --init-steps run's data order; arms must use other seeds, or they replay its draws exactly


def add_licenses(data: Path, heldout_frac: float = 0.15, max_bytes: int = 200_000) -> int:
    """Append license paragraphs as domain `licenses` to train.jsonl / heldout.jsonl; split by a hash per file."""
    if not LICENSES.is_dir():
        print(f"note: {LICENSES} not found: running with the 3 stdlib domains only")
        return 0
    rows = {"train": [], "heldout": []}
    for path in sorted(p for p in LICENSES.iterdir() if p.is_file() and not p.is_symlink()):
        split = (
            "heldout" if int(hashlib.sha256(path.name.encode()).hexdigest(), 16) % 100 < 100 * heldout_frac else "train"
        )
        text = path.read_text(errors="replace")
        rows[split] += [{"text": text[i : i + 4000], "domain": "licenses"} for i in range(0, len(text), 4000)]
    for split, cap in (("train", max_bytes), ("heldout", max_bytes // 10)):
        kept, total = [], 0
        for row in rows[split]:
            if total >= cap:
                break
            kept.append(row)
            total += len(row["text"].encode())
        with (data / f"{split}.jsonl").open("a") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in kept)
    return len(rows["train"])


def split_ddk_eval(data: Path, eval_tokens: int) -> list[str]:
    """train.jsonl -> fit.jsonl (what every run trains on) + ddk_eval.jsonl (each domain's last records, >= 6 bytes
    per DDK eval token: DDK's held-out split, given as `data.eval`, so no run, the --init-steps one included,
    ever trains on the text DDK measures the student on). Returns the domains, sorted."""
    rows = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
    need: dict[str, int] = {r["domain"]: 6 * eval_tokens for r in rows}
    held = set()
    for i in reversed(range(len(rows))):
        if need[rows[i]["domain"]] > 0:
            need[rows[i]["domain"]] -= len(rows[i]["text"].encode())
            held.add(i)
    for name, keep in (("fit", lambda i: i not in held), ("ddk_eval", lambda i: i in held)):
        write_text_atomic(data / f"{name}.jsonl", "".join(json.dumps(r) + "\n" for i, r in enumerate(rows) if keep(i)))
    return sorted(need)


def tiny_pair(
    data: Path, root: Path, teacher_steps: int, seq_len: int, teacher_shape: tuple[int, int] = (128, 4)
) -> tuple[Path, Path]:
    """A BPE tokenizer on the corpus, a teacher (hidden, layers = `teacher_shape`) trained CE-only on it, and a
    random smaller student."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = [json.loads(line)["text"] for line in (data / "train.jsonl").read_text().splitlines()]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<pad>", "<bos>", "<eos>", "<unk>"]
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )
    dirs = {}
    for name, hidden, layers in (("teacher_init", *teacher_shape), ("student", 48, 2)):
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=seq_len,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
        dirs[name] = root / name
        LlamaForCausalLM(config).save_pretrained(dirs[name])
        tokenizer.save_pretrained(dirs[name])
    run = root / "teacher_run"
    if not (run / "summary.json").is_file():
        run_distill(load_config(None, [
            f"model.student={dirs['teacher_init']}", "loss.alpha=0", f"data.train=[{data / 'fit.jsonl'}]",
            f"data.seq_len={seq_len}", f"train.output_dir={run}", f"train.max_steps={teacher_steps}",
            "train.batch_size=16", "train.lr=0.003", "train.warmup_steps=20", "train.logging_steps=50",
            "train.overwrite=true",
        ]))  # fmt: skip
    return run / "student", dirs["student"]


def run_arm(name: str, seed: int, args, data: Path, teacher: Path, student: Path) -> dict:
    """One `potstill distill` run (OUT/<name>/seed<seed>); returns its run dir and wall time."""
    out = args.out / name / f"seed{seed}"
    loss = ["loss.alpha=0"] if name == "ce" else ["loss.name=fkl", "loss.alpha=0.5"]
    mixing = ["data.mixing.mode=uniform"]
    if name == "kd_ddk":
        mixing = ["data.mixing.mode=ddk", f"data.eval=[{data / 'ddk_eval.jsonl'}]",
                  f"data.mixing.interval={args.interval}", f"data.mixing.eval_tokens={args.eval_tokens}",
                  f"data.mixing.gap={args.gap}", f"data.mixing.warmup={args.warmup}",
                  f"data.mixing.smoothing={args.smoothing}"]  # fmt: skip
    began = time.perf_counter()
    train(out, student, teacher, data, args, args.steps, seed, [*loss, *mixing])
    return {"run": str(out), "seconds": time.perf_counter() - began}


def train(out: Path, student: Path, teacher: Path, data: Path, args, steps: int, seed: int, extra: list[str]) -> None:
    run_distill(load_config(None, [
        f"model.student={student}", f"model.teacher={teacher}", f"data.train=[{data / 'fit.jsonl'}]",
        f"data.seq_len={args.seq_len}", f"train.output_dir={out}", f"train.max_steps={steps}",
        f"train.batch_size={args.batch_size}", f"train.lr={args.lr}", "train.warmup_steps=10",
        "train.logging_steps=25", "train.overwrite=true", f"train.seed={seed}", *extra,
        *(["model.teacher_dtype=bfloat16", "train.mixed_precision=bf16"] if args.bf16 else []),
    ]))  # fmt: skip


def pretrain(args, data: Path, domains: list[str], teacher: Path, student: Path) -> Path:
    """`--init-steps` of uniform KD on `--init-domains` (all by default): the common start of every arm."""
    out = args.out / "init"
    if not (out / "summary.json").is_file():
        keep = args.init_domains or domains
        weights = ", ".join(f"{d}: {1 if d in keep else 0}" for d in domains)
        mixing = ["data.mixing.mode=fixed", f"data.mixing.weights={{{weights}}}"]
        extra = ["loss.name=fkl", "loss.alpha=0.5", *mixing]
        train(out, student, teacher, data, args, args.init_steps, INIT_SEED, extra)
    return out / "student"


def score(model_dir: Path, data: Path, seq_len: int) -> dict:
    model, tokenizer = load_model(str(model_dir))
    ds = load_dataset([data / "heldout.jsonl"], tokenizer, seq_len, add_bos=True)
    return evaluate(model, ds, batch_size=8, progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/ddk_bench"))
    parser.add_argument("--teacher", type=Path, help="teacher HF dir (default: a tiny one trained here)")
    parser.add_argument("--student", type=Path, help="student HF dir (default: a tiny random one)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--teacher-steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--interval", type=int, default=50)
    parser.add_argument("--eval-tokens", type=int, default=2048)
    parser.add_argument("--gap", default="ppl", choices=["ppl", "logppl", "bpb", "kl"])
    parser.add_argument("--warmup", type=int, default=0, help="DDK: steps on a uniform mix before Eq. 1")
    parser.add_argument("--smoothing", type=float, default=0.5, help="DDK: Eq. 2's alpha")
    parser.add_argument(
        "--rerun", nargs="+", choices=ARMS, default=[],
        help="arms to train again; other runs (arm, seed) already in OUT/results.json are reused, with their times",
    )  # fmt: skip
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[1], help="data-order seeds; each KD arm runs once per seed"
    )
    parser.add_argument(
        "--init-steps", type=int, default=0, help="uniform KD steps before the arms (their common start)"
    )
    parser.add_argument("--init-domains", nargs="+", help="domains the --init-steps draw from (default: all)")
    parser.add_argument("--train-bytes", type=int, default=150_000, help="training text per stdlib domain")
    parser.add_argument("--bf16", action="store_true", help="teacher in bfloat16, student autocast (as the demo)")
    parser.add_argument("--data-only", action="store_true", help="build OUT/data and stop (to make a student on it)")
    args = parser.parse_args()
    if args.init_steps and INIT_SEED in args.seeds:
        parser.error(f"--seeds: {INIT_SEED} is the --init-steps run's seed; an arm with it would replay those draws")
    torch.set_num_threads(2)
    data = args.out / "data"
    build_corpus(data, seed=0, train_bytes=args.train_bytes, heldout_bytes=args.train_bytes // 10)
    add_licenses(data, max_bytes=args.train_bytes)
    domains = split_ddk_eval(data, args.eval_tokens)
    unknown = sorted(set(args.init_domains or []) - set(domains))
    if unknown:
        parser.error(f"--init-domains: {unknown[0]!r} is not a domain of the data (domains: {', '.join(domains)})")
    if args.data_only:
        return
    if args.teacher is None:
        teacher, student = tiny_pair(data, args.out / "models", args.teacher_steps, args.seq_len)
    else:
        teacher, student = args.teacher, args.student
    if args.init_steps:
        student = pretrain(args, data, domains, teacher, student)
    previous = args.out / "results.json"
    reused = json.loads(previous.read_text())["arms"] if previous.is_file() else {}
    runs = [(name, seed) for name in ARMS for seed in (args.seeds[:1] if name == "ce" else args.seeds)]
    arms = {
        f"{name} seed {seed}": run_arm(name, seed, args, data, teacher, student)
        if name in args.rerun or f"{name} seed {seed}" not in reused
        else reused[f"{name} seed {seed}"]
        for name, seed in runs
    }
    evals = {"teacher": score(teacher, data, args.seq_len)}
    evals.update({name: score(Path(arm["run"]) / "student", data, args.seq_len) for name, arm in arms.items()})
    mixing = {}
    for name in (name for name in arms if name.startswith("kd_ddk")):
        mixing[name] = [json.loads(x) for x in (Path(arms[name]["run"]) / "mixing.jsonl").read_text().splitlines()]
        report_mixing(arms[name]["run"])
    results = summarize(evals, arms, mixing, vars(args))
    write_text_atomic(args.out / "results.json", json.dumps(results, indent=2, default=str) + "\n")
    write_text_atomic(args.out / "table.md", render(results))
    print(render(results))


def summarize(evals: dict, arms: dict, mixing: dict[str, list[dict]], settings: dict) -> dict:
    """Per-run overall / per-domain bpb, student/teacher bpb ratios, worst ratio; each DDK run's update overhead."""
    teacher = evals["teacher"]
    domains = list(teacher["domains"])
    out = {"settings": settings, "domains": domains, "teacher": teacher, "arms": {}, "ddk": {}}
    for name, ev in evals.items():
        if name == "teacher":
            continue
        ratios = {d: ev["domains"][d]["bpb"] / teacher["domains"][d]["bpb"] for d in domains}
        worst = max(ratios, key=ratios.get)
        out["arms"][name] = {
            "bpb": ev["overall"]["bpb"], "bpb_by_domain": {d: ev["domains"][d]["bpb"] for d in domains},
            "ratio_by_domain": ratios, "worst_domain": worst, "worst_ratio": ratios[worst], **arms[name],
        }  # fmt: skip
    for name, log in mixing.items():
        update_s = sum(e["seconds"] for e in log)
        out["ddk"][name] = {
            "updates": len(log), "update_seconds": update_s, "share_of_run": update_s / arms[name]["seconds"],
            "weights": [{"step": e["step"], **e["weights"]} for e in log if e["rule"] != "final"],
        }  # fmt: skip
    return out


def render(r: dict) -> str:
    domains = r["domains"]
    head = "| run | overall bpb | " + " | ".join(f"{d} bpb (ratio)" for d in domains) + " | worst ratio | time |"
    lines = [head, "|---" * (len(domains) + 4) + "|"]
    t = r["teacher"]
    lines.append(
        f"| teacher | {t['overall']['bpb']:.3f} | "
        + " | ".join(f"{t['domains'][d]['bpb']:.3f}" for d in domains)
        + " | | |"
    )
    for name, a in r["arms"].items():
        cells = " | ".join(f"{a['bpb_by_domain'][d]:.3f} ({a['ratio_by_domain'][d]:.3f})" for d in domains)
        worst = f"{a['worst_ratio']:.3f} ({a['worst_domain']})"
        lines.append(f"| {name} | {a['bpb']:.3f} | {cells} | {worst} | {a['seconds']:.0f}s |")
    for name, d in r["ddk"].items():
        share = f"{d['update_seconds']:.1f}s = {100 * d['share_of_run']:.1f}% of its run"
        cost = f"{name}: {d['updates']} measurements, {share}."
        lines += ["", cost, "", "| step | " + " | ".join(domains) + " |", "|---" * (len(domains) + 1) + "|"]
        lines += [f"| {w['step']} | " + " | ".join(f"{w[x]:.3f}" for x in domains) + " |" for w in d["weights"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
