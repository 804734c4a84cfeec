"""Captioning + VQA KD: a teacher trained here on synthetic scenes, distilled token-level into a smaller student.

Scenes drawn with Pillow (`potstill.data.scenes`: 1-4 coloured shapes on a 3 x 3 grid) come with an exact caption
("two red circles and one blue square") and questions with exact answers ("how many circles ?" -> "two"). One
`TinyCaptioner` (conv encoder + transformer decoder, word-level tokenizer shared by both models) answers both tasks
from a prompt. The teacher is trained on the training scenes (CE), then its logits on every training example are
computed once; two student arms of the same size, steps, batch, learning rate and seeds (the seed sets the initial
weights and the batch order):

- kd: alpha T^2 D(teacher || student) + (1 - alpha) CE on every answer token (`losses.kd_terms`, the zoo's loss);
- ce: CE on the exact answers only (alpha = 0), the twin.

Held-out scenes (another seed): greedy answers; caption exact match and chrF, VQA answer accuracy; a grid of
held-out images with the reference, teacher and both students' answers.

    python benchmarks/vision_caption.py --work /work/runs/vision/caption
"""

from __future__ import annotations

import argparse
import json
import os
import textwrap
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from potstill.data.scenes import encode_example, make_scenes, pad_batch, scene_tokenizer
from potstill.errors import UserError
from potstill.eval.captioning import score_answers
from potstill.fileio import write_json_atomic
from potstill.losses import Divergence
from potstill.models.captioner import CaptionerConfig, TinyCaptioner, check_same_vocab
from potstill.train.captioner import fit_captioner, teacher_logits


def tensors(tokenizer, examples):
    """ids [N, T], labels [N, T], image index [N] of encoded examples."""
    encoded = [encode_example(tokenizer, e) for e in examples]
    pad = tokenizer.get_vocab()["<pad>"]
    ids = pad_batch([i for i, _ in encoded], pad)
    return ids, pad_batch([lab for _, lab in encoded], -100), torch.tensor([e.scene for e in examples])


def answers(model: TinyCaptioner, tokenizer, pixels, examples, batch: int = 64) -> list[str]:
    """Greedy answers to held-out examples."""
    vocab = tokenizer.get_vocab()
    prompts = [[vocab["<bos>"], *tokenizer.encode(e.prompt).ids] for e in examples]
    out = []
    for i in range(0, len(examples), batch):
        chunk = examples[i : i + batch]
        got = model.generate(pixels[[e.scene for e in chunk]], prompts[i : i + batch])
        out += [tokenizer.decode(g) for g in got]
    return out


def train_teacher(args, tokenizer, pixels, ids, labels, image) -> TinyCaptioner:
    """The teacher, trained once (CE) and saved under --work; reused when its settings match."""
    vocab = tokenizer.get_vocab()
    config = CaptionerConfig(len(vocab), args.teacher_width, (args.teacher_width // 4, args.teacher_width // 2),
                             args.teacher_layers, 4)  # fmt: skip
    key = f"teacher-w{args.teacher_width}-l{args.teacher_layers}-s{args.teacher_steps}-n{args.train_scenes}.pt"
    torch.manual_seed(1234)
    teacher = TinyCaptioner(config, vocab)
    if (args.work / key).is_file():
        teacher.load_state_dict(torch.load(args.work / key, weights_only=True))
        return teacher.eval()
    start = time.perf_counter()
    fit_captioner(teacher, pixels, image, ids, labels, None, Divergence(), 0.0, steps=args.teacher_steps,
                  batch_size=args.batch_size, lr=args.lr)  # fmt: skip
    print(f"teacher trained in {time.perf_counter() - start:.0f} s")
    torch.save(teacher.state_dict(), args.work / key)
    return teacher.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/potstill-vision-caption"))
    parser.add_argument("--train-scenes", type=int, default=2000)
    parser.add_argument("--test-scenes", type=int, default=300)
    parser.add_argument("--teacher-width", type=int, default=96)
    parser.add_argument("--teacher-layers", type=int, default=2)
    parser.add_argument("--teacher-steps", type=int, default=1200)
    parser.add_argument("--student-width", type=int, default=32)
    parser.add_argument("--steps", type=int, default=600, help="student steps (both arms)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--alpha", type=float, default=0.9)
    parser.add_argument("--loss", default="fkl")
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    started, stamp, load_before = (
        time.perf_counter(),
        datetime.now(timezone.utc).isoformat(timespec="seconds"),
        os.getloadavg(),
    )
    tokenizer = scene_tokenizer()
    pixels, examples = make_scenes(args.train_scenes, seed=0)
    test_pixels, test_examples = make_scenes(args.test_scenes, seed=10_000)
    ids, labels, image = tensors(tokenizer, examples)
    teacher = train_teacher(args, tokenizer, pixels, ids, labels, image)
    logits = teacher_logits(teacher, pixels, image, ids)
    refs, tasks = [e.answer for e in test_examples], [e.task for e in test_examples]
    results = {"teacher": score_answers(answers(teacher, tokenizer, test_pixels, test_examples), refs, tasks)}
    results["params"] = {"teacher": sum(p.numel() for p in teacher.parameters())}
    print("teacher", json.dumps(results["teacher"]))
    per_scene = len(test_examples) // args.test_scenes  # a caption then the questions of each scene
    shown = [per_scene * j + j % per_scene for j in range(min(12, args.test_scenes))]  # the tasks in turn
    grid = {"teacher": [answers(teacher, tokenizer, test_pixels, [test_examples[i]])[0] for i in shown]}
    div = Divergence(args.loss, temperature=args.temperature)
    w = args.student_width
    config = CaptionerConfig(len(tokenizer.get_vocab()), w, (w // 4, w // 2), 1, 2)
    results["runs"] = []
    for seed in args.seeds:
        for arm, alpha in (("kd", args.alpha), ("ce", 0.0)):
            torch.manual_seed(seed)
            student = TinyCaptioner(config, tokenizer.get_vocab())
            check_same_vocab(teacher, student)
            results["params"]["student"] = sum(p.numel() for p in student.parameters())
            start = time.perf_counter()
            history = fit_captioner(student, pixels, image, ids, labels, logits, div, alpha, steps=args.steps,
                                    batch_size=args.batch_size, lr=args.lr, seed=seed)  # fmt: skip
            hyps = answers(student, tokenizer, test_pixels, test_examples)
            run = {"arm": arm, "seed": seed, "train_s": time.perf_counter() - start, "last_loss": history[-1]}
            run["heldout"] = score_answers(hyps, refs, tasks)
            results["runs"].append(run)
            if seed == args.seeds[0]:
                grid[arm] = [hyps[i] for i in shown]
            print(json.dumps(run))
    results |= {"date": stamp, "load_before": load_before, "load_after": os.getloadavg(), "args": vars(args)}
    results |= {"wall_s": time.perf_counter() - started, "grid": grid | {"shown": shown}}
    write_json_atomic(args.work / "results.json", json.loads(json.dumps(results, default=str)))
    print(table(results))
    draw_grid(test_pixels, test_examples, results["grid"], args.work / "grid.png")
    print(f"date {stamp}, wall {results['wall_s']:.0f} s, load {load_before} -> {results['load_after']}")


def table(results: dict) -> str:
    """Markdown: held-out caption exact match / chrF and VQA accuracy, teacher and each arm (mean ± half range)."""
    keys = (("caption", "exact_match"), ("caption", "chrf"), ("vqa", "exact_match"))
    lines = ["| model | caption exact match | caption chrF | VQA accuracy |", "|---|---:|---:|---:|"]
    t = results["teacher"]
    lines.append(
        f"| teacher ({results['params']['teacher']:,} params) | " + " | ".join(f"{t[a][b]:.3f}" for a, b in keys) + " |"
    )
    for arm in ("kd", "ce"):
        runs = [r["heldout"] for r in results["runs"] if r["arm"] == arm]
        cells = []
        for a, b in keys:
            v = [r[a][b] for r in runs]
            cells.append(f"{sum(v) / len(v):.3f} ± {(max(v) - min(v)) / 2:.3f}")
        lines.append(
            f"| {arm} ({results['params']['student']:,} params, {len(runs)} seeds) | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def draw_grid(pixels, examples, grid: dict, path: Path) -> None:
    """Held-out scenes with the prompt, the reference and the teacher's / KD / CE student's answers (seed 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols, n = 4, len(grid["shown"])
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4.4 * rows), squeeze=False)
    for ax, j in zip(axes.flat, range(n), strict=False):
        e = examples[grid["shown"][j]]
        ax.imshow(pixels[e.scene].permute(1, 2, 0).numpy())
        mark = lambda h, r=e.answer: "=" if h == r else "x"  # noqa: E731
        lines = [e.prompt.replace(" answer :", "").replace(" :", ""), f"ref: {e.answer}"]
        lines += [f"{who} {mark(grid[who][j])} {grid[who][j]}" for who in ("teacher", "kd", "ce")]
        wrapped = "\n".join(textwrap.fill(line, 40, subsequent_indent="    ") for line in lines)
        ax.text(0, -0.03, wrapped, transform=ax.transAxes, va="top", fontsize=8, family="monospace")
    for ax in axes.flat:
        ax.axis("off")
    fig.subplots_adjust(left=0.02, right=0.98, top=0.98, bottom=0.12, wspace=0.1, hspace=0.9)
    fig.savefig(path, dpi=72)
    plt.close(fig)


if __name__ == "__main__":
    try:
        main()
    except UserError as err:
        raise SystemExit(f"error: {err}") from None
