"""The on-policy arena with a real teacher: SmolLM2-135M-Instruct teaches a student pruned from it, on English ->
German UI strings from the system's gettext catalogs.

Task: chat prompts "Translate to German: <msgid>" (the teacher's chat template, its default system turn), answers
the catalog's msgstr. Pairs come from /usr/share/locale/de/LC_MESSAGES/*.mo (Python's gettext; the iso_* catalogs
of country and language names are left out), msgids of 2-5 words of plain letters, <= 38 characters, no format
strings or accelerators; shuffled with seed 0 into held-out prompts and training prompts.

1. The teacher (bfloat16) answers every prompt greedily (at most `--max-new-tokens`), once, cached in the work dir:
   the held-out answers are ROUGE-L's references, the training answers are seq-KD's data.
2. The student: `potstill.student.init.init_student` keeps `--layers` of the teacher's 30 layers (measured on the
   training conversations) and the vocabulary of the training conversations (+ bytes, BPE pieces, specials).
3. SFT: per seed, CE on the catalog's answers from the pruned student (`--sft-steps`). Every arm of the seed
   starts from this checkpoint, with the same steps, batch and lr:
   - `ce`: more CE on the catalog's answers (distill recipe, alpha 0);
   - `kd`: off-policy KD, fkl to the teacher on the catalog's answers (distill recipe, alpha 1);
   - `seq_kd`: CE on the teacher's greedy answers (sequence-level KD, Kim & Rush 2016; the trimmed student cannot
     use the on_policy recipe's seq_kd, which samples with the teacher's vocabulary);
   - `rkl_topk`: on-policy reverse KL over the teacher's top-K (+ rest bucket) on the student's samples (lmbda 1);
   - `rkl_sampled`: on-policy sampled reverse KL with the batch-mean baseline (lmbda 1);
   - `gkd`: GKD, lmbda 0.5, jsd beta 0.5 (on the data's answers or the student's samples);
   - `gkd_l1`: GKD at lmbda 1 (every batch on the student's samples), jsd beta 0.5;
   - `gkd_fkl`: GKD (lmbda 0.5) with the forward KL (mass-covering: its gradient on a token the student has nearly
     lost, such as `<eos>`, is q - p, where jsd's vanishes with q);
   - `gkd_tdata`: GKD (lmbda 0.5, jsd) whose off-policy batches are the teacher's greedy answers (seq-KD's data)
     instead of the catalog's: token-level KD where the teacher's own answers end.
   `--min-eos-rate` / `--min-distinct2` set the collapse stops of the on-policy arms (a stop is in the results).
4. Metrics on the held-out prompts: the per-token reverse KL KL(q_student || p_teacher), exact over the student's
   vocabulary at every position of the student's own samples (`--samples` per prompt, temperature 1, seeded; p is the
   teacher's full-vocabulary distribution, read at the student's ids), ROUGE-L F1 of the student's greedy answers
   against the teacher's greedy answers (rouge_score, whitespace tokens), chrF of the greedy answers against the
   catalog (sacrebleu). Health (`potstill.train.rollouts.health_figures`: mean length, <eos> rate, distinct bigrams,
   loop rate = share of answers with a trigram repeated >= 3 times) of the greedy answers and of the samples; the
   teacher's own health on the same held-out prompts, at the same `--max-new-tokens`, is the reference. Stop mass:
   along each of the student's samples, the probability that the teacher (the student) would have ended it somewhere,
   1 - prod_t (1 - P(<eos> | y<t)), averaged over the samples: a student that under-fits the teacher's `<eos>` has a
   student figure below the teacher's on its own paths.
   `--prompt` picks the request's wording (PROMPTS); `--eos-probe` measures the teacher's ends for one wording,
   `--eos-after-catalog` its P(<eos>) where the catalog's answers end, `--eos-pull` each divergence's pull on a lost
   `<eos>` (a toy, no model).

    python benchmarks/on_policy_real.py --work /tmp/potstill_real             # the table of benchmarks/README.md
    python benchmarks/on_policy_real.py --quick                               # a smoke run (a few steps)
"""

from __future__ import annotations

import argparse
import gettext
import glob
import json
import random
import re
import statistics
import sys
import time
from pathlib import Path

import torch

TEACHER = "/work/assets/cache/models/b179c9523d0e6a0f-SmolLM2-135M-Instruct.Q4_1"
CATALOGS = "/usr/share/locale/de/LC_MESSAGES/*.mo"
ONP = ["train.recipe=on_policy", "loss.alpha=1", "on_policy.lmbda=1"]
ARMS = {
    "ce": ["train.recipe=distill", "loss.alpha=0"],
    "kd": ["train.recipe=distill", "loss.alpha=1", "loss.name=fkl"],
    "seq_kd": ["train.recipe=distill", "loss.alpha=0"],  # on the teacher's answers
    "rkl_topk": [*ONP, "on_policy.objective=rkl_topk"],
    "rkl_sampled": [*ONP, "on_policy.objective=rkl_sampled", "on_policy.baseline=batch"],
    "gkd": [*ONP[:2], "on_policy.lmbda=0.5", "on_policy.objective=gkd", "loss.name=jsd", "loss.beta=0.5"],
    "gkd_fkl": [*ONP[:2], "on_policy.lmbda=0.5", "on_policy.objective=gkd", "loss.name=fkl"],
    "gkd_l1": [*ONP, "on_policy.objective=gkd", "loss.name=jsd", "loss.beta=0.5"],
    "gkd_tdata": [*ONP[:2], "on_policy.lmbda=0.5", "on_policy.objective=gkd", "loss.name=jsd", "loss.beta=0.5"],
}
TEACHER_DATA = ("seq_kd", "gkd_tdata")  # arms whose data are the teacher's greedy answers, not the catalog's


def catalog_pairs() -> list[tuple[str, str]]:
    """(English msgid, German msgstr) pairs of short plain UI strings, deduplicated by msgid, in a fixed order."""
    pairs: dict[str, str] = {}
    for path in sorted(glob.glob(CATALOGS)):
        if Path(path).name.startswith("iso_"):
            continue
        try:
            with open(path, "rb") as f:
                catalog = gettext.GNUTranslations(f)._catalog  # noqa: SLF001 - the only way to list a .mo's entries
        except (UnicodeDecodeError, OSError):  # a catalog in a legacy charset: left out
            continue
        for en, de in catalog.items():
            if (
                not isinstance(en, str)
                or not isinstance(de, str)
                or not re.fullmatch(r"[A-Za-z][A-Za-z ,.'-]{2,37}", en)
            ):
                continue
            if not 2 <= len(en.split()) <= 5 or re.search(r"[%_&\n]", de) or en.lower() == de.lower():
                continue
            pairs.setdefault(en, de)
    return sorted(pairs.items())


# `--prompt`: (system turn or None for the template's default, user turn); "task" is the prompt of the first runs
PROMPTS = {
    "task": (None, "Translate to German: {en}"),
    "only": (None, "Translate to German. Reply with the German translation only.\n{en}"),
    "system": (
        "You translate English user-interface strings into German. Reply with the German translation only.",
        "{en}",
    ),
    "system_task": (
        "You translate English user-interface strings into German. Reply with the German translation only.",
        "Translate to German: {en}",
    ),
}


def chat(en: str, de: str | None = None, prompt: str = "task") -> list[dict[str, str]]:
    """The chat turns of one pair in the `prompt` of PROMPTS (the request, and the answer when given)."""
    system, user = PROMPTS[prompt]
    turns = [{"role": "system", "content": system}] if system else []
    turns += [{"role": "user", "content": user.format(en=en)}]
    return turns + ([{"role": "assistant", "content": de}] if de is not None else [])


def load(model_dir, dtype=torch.float32):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval(), tok


@torch.no_grad()
def complete(
    model, tok, prompts: list[str], max_new_tokens: int, samples: int = 0, batch: int = 32, prompt: str = "task"
):
    """Answers of `model` to the English strings in the `prompt` of PROMPTS: greedy (samples 0) or `samples` draws
    each at temperature 1.

    Returns (prompt ids, completion ids) per answer: completion ids run up to and including the first `<eos>`.
    """
    eos = tok.convert_tokens_to_ids(tok.eos_token)
    texts = [
        tok.apply_chat_template(chat(en, prompt=prompt), tokenize=False, add_generation_prompt=True) for en in prompts
    ]
    texts = [t for t in texts for _ in range(max(samples, 1))]
    out = []
    torch.manual_seed(1234)
    for i in range(0, len(texts), batch):
        enc = tok(texts[i : i + batch], return_tensors="pt", padding=True, add_special_tokens=False)
        ids = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=samples > 0,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            eos_token_id=eos,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else eos,
        )
        for row, mask, gen in zip(
            enc["input_ids"], enc["attention_mask"], ids[:, enc["input_ids"].shape[1] :], strict=False
        ):
            gen = gen.tolist()
            gen = gen[: gen.index(eos) + 1] if eos in gen else gen
            out.append((row[mask.bool()].tolist(), gen))
    return out


def eos_pull(vocab: int = 1000) -> None:
    """Print how hard each divergence pulls a student's nearly lost `<eos>` logit back towards the teacher's
    probability: d D / d z_eos for a teacher with P(<eos>) = p and a student with q, the rest uniform."""
    from potstill.losses.divergences import fkl, jsd, rkl

    for p_eos, q_eos in ((0.05, 1e-2), (0.05, 1e-3), (0.05, 1e-4), (0.2, 1e-3)):
        p, q = (torch.full((vocab,), (1 - x) / (vocab - 1)).index_fill(0, torch.tensor([0]), x) for x in (p_eos, q_eos))
        cells = []
        for name, div in (("fkl", fkl), ("jsd", jsd), ("rkl", rkl)):
            z = q.log().requires_grad_(True)
            div(z[None], p.log()[None]).sum().backward()
            cells.append(f"{name} {z.grad[0].item():+.4f}")
        print(f"p_eos {p_eos}, q_eos {q_eos}: d/dz_eos " + ", ".join(cells), flush=True)


@torch.no_grad()
def eos_after(model, tok, pairs: list[tuple[str, str]], prompt: str) -> list[float]:
    """P(<eos> | prompt + the catalog's answer) under `model`, per pair: does it agree to stop where the data does?"""
    eos = tok.convert_tokens_to_ids(tok.eos_token)
    out = []
    for en, de in pairs:
        text = tok.apply_chat_template(chat(en, prompt=prompt), tokenize=False, add_generation_prompt=True) + de
        ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        out.append(model(input_ids=ids).logits[0, -1].float().softmax(-1)[eos].item())
    return out


def answer_text(tok, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=True).strip()


def health(completions: list[list[int]], eos: int) -> dict[str, float]:
    """`health_figures` (len, eos_rate, distinct2, loop_rate) of completions (each cut after its first `<eos>`)."""
    from potstill.losses import IGNORE_INDEX
    from potstill.train.rollouts import health_counts, health_figures

    labels = torch.full((len(completions), max(map(len, completions), default=0) + 1), IGNORE_INDEX)
    for row, ids in enumerate(completions):
        labels[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    batch = {
        "labels": labels,
        "completion_len": torch.tensor([len(c) for c in completions]),
        "stopped": torch.tensor([bool(c) and c[-1] == eos for c in completions]),
    }
    return health_figures(health_counts(batch))


def teacher_health(teacher, tok, held, max_new: int, samples: int, prompt: str) -> dict[str, dict[str, float]]:
    """The teacher's own health on the held-out prompts: greedy, and `samples` draws each (temperature 1)."""
    eos = tok.convert_tokens_to_ids(tok.eos_token)
    prompts = [en for en, _ in held]
    return {
        "greedy": health([c for _, c in complete(teacher, tok, prompts, max_new, prompt=prompt)], eos),
        "sampled": health([c for _, c in complete(teacher, tok, prompts, max_new, samples, prompt=prompt)], eos),
    }


@torch.no_grad()
def evaluate(
    student_dir: Path,
    teacher,
    held: list[tuple[str, str]],
    teacher_answers: list[str],
    max_new: int,
    samples: int,
    prompt: str,
):
    """{rkl, rouge_l, chrf} of one student on the held-out pairs (see the module docstring)."""
    import sacrebleu
    from rouge_score import rouge_scorer

    from potstill.models.vocab import load_id_map

    model, tok = load(student_dir)
    id_map = load_id_map(student_dir)
    eos = tok.convert_tokens_to_ids(tok.eos_token)
    greedy_ids = [c for _, c in complete(model, tok, [en for en, _ in held], max_new, prompt=prompt)]
    greedy = [answer_text(tok, c) for c in greedy_ids]
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_Whitespace())
    rouge = statistics.mean(
        scorer.score(t, g)["rougeL"].fmeasure for t, g in zip(teacher_answers, greedy, strict=False)
    )
    chrf = sacrebleu.corpus_chrf(greedy, [[de for _, de in held]]).score
    kl_sum, n, stops = 0.0, 0, []
    drawn = complete(model, tok, [en for en, _ in held], max_new, samples=samples, prompt=prompt)
    for prompt_ids, completion in drawn:
        if not completion:
            continue
        ids = torch.tensor([prompt_ids + completion])
        logq = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float().log_softmax(-1)
        t_ids = ids if id_map is None else id_map[ids]
        logp = teacher(input_ids=t_ids).logits[0, len(prompt_ids) - 1 : -1].float().log_softmax(-1)
        logp = logp if id_map is None else logp[:, id_map]
        kl_sum += (logq.exp() * (logq - logp)).sum().item()
        n += len(completion)
        # P(ends somewhere on this path) = 1 - prod_t (1 - P(<eos> | y<t)), for the teacher and for the student
        stops.append([1 - torch.log1p(-x[:, eos].exp()).sum().exp().item() for x in (logp, logq)])
    return {
        "rkl": kl_sum / n,
        "stop_teacher": statistics.mean(s[0] for s in stops),
        "stop_student": statistics.mean(s[1] for s in stops),
        "rouge_l": rouge,
        "chrf": chrf,
        "greedy": greedy[:5],
        "greedy_health": health(greedy_ids, eos),
        "sampled_health": health([c for _, c in drawn], eos),
    }


class _Whitespace:
    """rouge_score's tokenizer interface: whitespace tokens, case kept (its default drops non-ASCII letters)."""

    def tokenize(self, text: str) -> list[str]:
        return text.split()


def train(out: Path, overrides: list[str]) -> float:
    """One `run_distill` into `out` (overwritten); returns its wall seconds."""
    from potstill.config import load_config
    from potstill.train.recipes import run_distill

    cfg = load_config(None, [f"train.output_dir={out}", "train.overwrite=true", *overrides], run=True)
    start = time.perf_counter()
    run_distill(cfg)
    return time.perf_counter() - start


def write_chats(path: Path, pairs, prompt: str) -> Path:
    with path.open("w") as f:
        for en, de in pairs:
            f.write(json.dumps({"messages": chat(en, de, prompt)}, ensure_ascii=False) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", type=int, default=256, help="training prompts")
    p.add_argument("--held", type=int, default=64, help="held-out prompts")
    p.add_argument("--layers", type=int, default=6, help="student decoder layers (of 30)")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--teacher-tokens", type=int, default=24, help="max tokens of the teacher's cached greedy answers")
    p.add_argument("--seq-len", type=int, default=96, help="data.seq_len (prompt + max_new_tokens must fit)")
    p.add_argument("--sft-steps", type=int, default=150)
    p.add_argument("--sft-lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=50, help="optimizer steps of every arm")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--samples", type=int, default=2, help="student samples per held-out prompt (reverse KL)")
    p.add_argument("--top-k", type=int, default=8, help="rkl_topk's K")
    p.add_argument("--min-eos-rate", type=float, default=0.0, help="on-policy arms: on_policy.min_eos_rate (0: off)")
    p.add_argument("--min-distinct2", type=float, default=0.0, help="on-policy arms: on_policy.min_distinct2 (0: off)")
    p.add_argument(
        "--min-eos-ratio", type=float, default=0.0, help="on-policy arms: on_policy.min_eos_ratio (teacher-relative)"
    )
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1], help="seeds to train (none: only the table)")
    p.add_argument("--arms", nargs="+", default=["ce", "kd", "seq_kd", "rkl_topk"], choices=list(ARMS))
    p.add_argument("--work", type=Path, default=Path("/tmp/potstill_real"))
    p.add_argument("--quick", action="store_true", help="smoke run: 16 prompts, 3 steps, 1 seed")
    p.add_argument("--prompt", default="task", choices=list(PROMPTS), help="the request's wording (PROMPTS)")
    p.add_argument(
        "--eos-probe", type=int, nargs="+", help="only print the teacher's <eos> rate, mean length, loop rate and"
        " distinct-2 (greedy, and sampled at temperature 1) at these max_new_tokens on the held-out + training"
        " prompts, then exit",
    )  # fmt: skip
    p.add_argument(
        "--eos-pull", action="store_true", help="only print d divergence / d z_eos for fkl, jsd and rkl on a toy"
        " 1,000-way distribution (no model), then exit",
    )  # fmt: skip
    p.add_argument(
        "--eos-after-catalog", nargs="?", const="", metavar="SUFFIX", help="only print the teacher's P(<eos>) right"
        " after the catalog's answer (where the data stops; + SUFFIX, e.g. '.') on the held-out + training pairs, then"
        " exit",
    )  # fmt: skip
    args = p.parse_args(argv)
    if args.quick:
        args.train, args.held, args.sft_steps, args.steps, args.seeds, args.max_new_tokens = 16, 8, 3, 3, [0], 8
        args.work = args.work.with_name(args.work.name + "_quick")
    torch.set_num_threads(1)
    if args.eos_pull:
        eos_pull()
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    pairs = catalog_pairs()
    random.Random(0).shuffle(pairs)
    held, train_pairs = pairs[: args.held], pairs[args.held : args.held + args.train]
    print(f"{len(pairs)} catalog pairs; {len(train_pairs)} training, {len(held)} held-out", flush=True)

    teacher, ttok = load(TEACHER, torch.bfloat16)
    if args.eos_after_catalog is not None:
        ends = eos_after(
            teacher, ttok, [(en, de + args.eos_after_catalog) for en, de in held + train_pairs], args.prompt
        )
        print(
            f"teacher P(<eos>) right after the catalog's answer + {args.eos_after_catalog!r}, prompt {args.prompt!r},"
            f" {len(ends)} pairs: mean"
            f" {statistics.mean(ends):.3f}, median {statistics.median(ends):.3f}, > 0.5 on"
            f" {statistics.mean(e > 0.5 for e in ends):.2f}",
            flush=True,
        )
        return 0
    if args.eos_probe:  # one decode at the largest cap: a shorter cap sees the same prefixes (same seed and batches)
        eos = ttok.convert_tokens_to_ids(ttok.eos_token)
        for samples in (0, 1):
            ends = complete(
                teacher, ttok, [en for en, _ in held + train_pairs], max(args.eos_probe), samples, prompt=args.prompt
            )
            cells = [
                "{cap}: eos {eos_rate:.2f}, len {len:.1f}, loop {loop_rate:.2f}, distinct-2 {distinct2:.3f}".format(
                    cap=cap, **health([c[:cap] for _, c in ends], eos)
                )
                for cap in args.eos_probe
            ]
            print(
                f"teacher {'sampled' if samples else 'greedy'}, prompt {args.prompt!r}, {len(ends)} prompts: "
                + "; ".join(cells),
                flush=True,
            )
        return 0
    cache = args.work / "teacher_answers.json"
    if not cache.exists():
        start = time.perf_counter()
        answers = [
            answer_text(ttok, c)
            for _, c in complete(
                teacher, ttok, [en for en, _ in held + train_pairs], args.teacher_tokens, prompt=args.prompt
            )
        ]
        cache.write_text(json.dumps(answers, ensure_ascii=False))
        print(f"teacher answered {len(answers)} prompts in {time.perf_counter() - start:.0f} s", flush=True)
    answers = json.loads(cache.read_text())
    held_answers, train_answers = answers[: len(held)], answers[len(held) :]
    catalog = write_chats(args.work / "catalog.jsonl", train_pairs, args.prompt)
    teacher_data = write_chats(
        args.work / "teacher.jsonl",
        [(en, a) for (en, _), a in zip(train_pairs, train_answers, strict=False)],
        args.prompt,
    )
    chrf_teacher = __import__("sacrebleu").corpus_chrf(held_answers, [[de for _, de in held]]).score
    print(f"teacher greedy chrF vs catalog {chrf_teacher:.1f}; e.g. {held[0][0]!r} -> {held_answers[0]!r}", flush=True)
    reference = args.work / f"teacher_health_{args.max_new_tokens}.json"
    if not reference.exists():
        reference.write_text(
            json.dumps(teacher_health(teacher, ttok, held, args.max_new_tokens, args.samples, args.prompt))
        )
    print(f"teacher health at {args.max_new_tokens} new tokens: {reference.read_text()}", flush=True)

    pruned = args.work / f"pruned_{args.layers}"
    if not (pruned / "config.json").exists():
        from potstill.student.init import init_student

        corpus = [ttok.apply_chat_template(chat(en, de, args.prompt), tokenize=False) for en, de in train_pairs]
        corpus += [
            ttok.apply_chat_template(chat(en, a, args.prompt), tokenize=False)
            for (en, _), a in zip(train_pairs, train_answers, strict=False)
        ]
        init_student(TEACHER, args.layers, pruned, corpus, calib_tokens=1024, calib_dtype="bfloat16")
    common = [
        f"model.teacher={TEACHER}",
        "model.teacher_dtype=bfloat16",
        f"data.seq_len={args.seq_len}",
        "train.logging_steps=10",
    ]
    common += [
        "train.warmup_steps=5",
        f"train.batch_size={args.batch_size}",
        f"on_policy.max_new_tokens={args.max_new_tokens}",
    ]
    common += [f"on_policy.top_k={args.top_k}"]

    for seed in args.seeds:
        sft = args.work / f"sft_s{seed}"
        if not (sft / "student" / "config.json").exists():
            run = [f"model.student={pruned}", f"data.train=[{catalog}]", *common, *ARMS["ce"], f"train.seed={seed}"]
            train(sft, [*run, f"train.max_steps={args.sft_steps}", f"train.lr={args.sft_lr}"])
        for arm in ["sft", *args.arms]:
            result = args.work / f"result_{arm}_s{seed}.json"
            if result.exists():
                continue
            out, secs = sft, 0.0
            if arm != "sft":  # every arm starts from the SFT student of its seed
                out = args.work / f"{arm}_s{seed}"
                data = teacher_data if arm in TEACHER_DATA else catalog
                run = [f"model.student={sft / 'student'}", f"data.train=[{data}]", *common, *ARMS[arm]]
                run += [f"train.seed={seed}", f"train.max_steps={args.steps}", f"train.lr={args.lr}"]
                if "train.recipe=on_policy" in ARMS[arm]:  # the collapse stops (docs/on_policy.md, Health)
                    run += [
                        f"on_policy.min_eos_rate={args.min_eos_rate}",
                        f"on_policy.min_distinct2={args.min_distinct2}",
                        f"on_policy.min_eos_ratio={args.min_eos_ratio}",
                    ]
                secs = train(out, run)
            row = evaluate(out / "student", teacher, held, held_answers, args.max_new_tokens, args.samples, args.prompt)
            summary = json.loads((out / "summary.json").read_text()) if arm != "sft" else {}
            row |= {"stop_reason": summary["stop_reason"]} if "stop_reason" in summary else {}
            result.write_text(json.dumps({**row, "seconds": secs}, ensure_ascii=False))
            print(f"{arm} seed {seed}: {row} in {secs:.0f} s", flush=True)

    table, seeds_of = {}, {}
    for arm in ["sft", *ARMS]:
        files = sorted(args.work.glob(f"result_{arm}_s*.json"))
        if files:
            table[arm] = [json.loads(f.read_text()) for f in files]
            seeds_of[arm] = [int(f.stem.rsplit("_s", 1)[1]) for f in files]
    print(f"\nteacher SmolLM2-135M-Instruct: greedy chrF vs catalog {chrf_teacher:.1f} ({len(held)} held-out prompts)")
    print(
        f"student: {args.layers} layers, SFT {args.sft_steps} steps; arms {args.steps} steps x batch {args.batch_size}"
    )
    print(f"seeds {sorted({int(f.stem.rsplit('_s', 1)[1]) for f in args.work.glob('result_*.json')})}")
    print("\n| arm | reverse KL (nats/token) per seed | mean | ROUGE-L vs teacher | chrF vs catalog | seconds |")
    print("|---|---|---:|---|---|---:|")
    for arm, rows in table.items():
        rkl = [r["rkl"] for r in rows]
        cells = " / ".join(f"{x:.3f}" for x in rkl)
        rouge = " / ".join(f"{r['rouge_l']:.3f}" for r in rows)
        chrf = " / ".join(f"{r['chrf']:.1f}" for r in rows)
        secs = statistics.mean(r["seconds"] for r in rows)
        print(f"| {arm} | {cells} | {statistics.mean(rkl):.3f} | {rouge} | {chrf} | {secs:.0f} |")
    print("\n| arm | reverse KL spread (max - min) | paired difference to kd: mean [min, max] | to seq_kd |")
    print("|---|---:|---|---|")
    for arm, rows in table.items():
        rkl = dict(zip(seeds_of[arm], (r["rkl"] for r in rows), strict=True))
        cells = []
        for base in ("kd", "seq_kd"):
            ref = dict(zip(seeds_of.get(base, []), (r["rkl"] for r in table.get(base, [])), strict=True))
            diff = [rkl[s] - ref[s] for s in rkl if s in ref]
            cells.append(f"{statistics.mean(diff):+.3f} [{min(diff):+.3f}, {max(diff):+.3f}]" if diff else "")
        print(f"| {arm} | {max(rkl.values()) - min(rkl.values()):.3f} | {cells[0]} | {cells[1]} |")
    print(
        "\n| arm | greedy: eos rate / loop rate / distinct-2 per seed | samples: eos rate / len / distinct-2 |"
        " stop mass on the samples: teacher / student |"
    )
    print("|---|---|---|---|")
    teacher_ref = json.loads(reference.read_text())
    rows = [("teacher", [{"greedy_health": teacher_ref["greedy"], "sampled_health": teacher_ref["sampled"]}])]
    for arm, runs in [*rows, *table.items()]:
        if "greedy_health" not in runs[0]:
            continue
        g = "; ".join("{eos_rate:.2f} / {loop_rate:.2f} / {distinct2:.3f}".format(**r["greedy_health"]) for r in runs)
        h = "; ".join("{eos_rate:.2f} / {len:.1f} / {distinct2:.3f}".format(**r["sampled_health"]) for r in runs)
        stop = "; ".join(f"{r['stop_teacher']:.2f} / {r['stop_student']:.2f}" for r in runs if "stop_teacher" in r)
        print(f"| {arm} | {g} | {h} | {stop} |")
    for arm, rows in table.items():
        for row in rows:
            if "stop_reason" in row:
                print(f"{arm}: stopped early: {row['stop_reason']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
