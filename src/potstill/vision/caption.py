"""`potstill vision caption`: a captioning / VQA teacher trained here, distilled through a transfer set.

Synthetic scenes (`potstill.data.scenes`) come with exact captions and answers. The recipe, into OUT:

1. teacher: a `TinyCaptioner` trained (CE) on `teacher_scenes` labeled scenes (seed 0), saved as OUT/teacher-*.pt
   and reused by a rerun with the same settings (or taken from `teacher_file`);
2. transfer set: `transfer` more scenes (seed 20,000) whose answers are never read: the teacher answers their prompts
   greedily (its pseudo-labels) and its logits on those answers are the soft targets (Hinton's transfer set);
3. students, all of one size, steps, batch, learning rate and seeds (a seed sets the initial weights and the batch
   order), on the first `labeled` labeled scenes:
   - `ce`: CE on the labeled scenes only (the twin);
   - `pseudo`: CE on the labeled scenes + the transfer set's pseudo-labels (hard labels: more data, no soft targets);
   - `kd`: the same examples, alpha T^2 D(teacher || student) + (1 - alpha) CE on every answer token
     (`losses.kd_terms`): token-level KD on the gold answers and, on the transfer set, on the teacher's own greedy
     answers (sequence-level KD + token KD);
   - `kd_labeled` (not run by default): KD on the labeled scenes only;
4. held-out scenes of another seed (10,000): greedy answers, caption exact match / chrF, VQA accuracy; report.json,
   report.md (mean ± half range over seeds, each arm minus its twin per seed) and grid.png.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Literal, get_args

import torch
from pydantic import ConfigDict, Field, model_validator

from potstill.config.base import CommaList, LossName, Section, Seeds, flag
from potstill.data.scenes import Example, encode_example, make_scenes, pad_batch, scene_tokenizer
from potstill.errors import UserError
from potstill.eval.captioning import score_answers
from potstill.losses import Divergence
from potstill.models.captioner import CaptionerConfig, TinyCaptioner, check_same_vocab
from potstill.train.captioner import fit_captioner, teacher_logits
from potstill.vision import report as rep

Arm = Literal["ce", "pseudo", "kd", "kd_labeled"]
ARMS = get_args(Arm)
Width = Annotated[int, Field(ge=8, multiple_of=4)]
"""A captioner's width (its conv channels are width / 4 and width / 2)."""
TRANSFER_SEED, TEST_SEED = 20_000, 10_000


class CaptionRecipe(Section):
    """Settings of one run (defaults: the measured recipe of docs/vision.md); a YAML file of these fields is what
    `potstill vision caption --config` reads.

    Attributes:
        teacher_scenes / labeled / transfer / test: scene counts (labeled <= teacher_scenes: the students' labeled
            scenes are the first of the teacher's).
        teacher_width / teacher_layers / teacher_steps: the teacher's size and CE budget.
        teacher_file: a saved teacher state dict to use instead of training one.
        student_width / student_layers: the students' size.
        steps / batch_size / lr: every student's budget (AdamW, linear decay).
        alpha / loss / temperature: the KD arms' objective.
        arms: which arms to train (of ARMS).
        seeds: one student per arm and seed.
    """

    model_config = ConfigDict(frozen=True)

    teacher_scenes: int = Field(2000, ge=1)
    labeled: int = Field(2000, ge=1, json_schema_extra=flag("--labeled"))
    transfer: int = Field(4000, ge=0, json_schema_extra=flag("--transfer"))
    test: int = Field(300, ge=1)
    teacher_width: Width = 96
    teacher_layers: int = Field(2, ge=1)
    teacher_steps: int = Field(1000, ge=1)
    teacher_file: str | None = Field(None, json_schema_extra=flag("--teacher-file"))
    student_width: Width = 32
    student_layers: int = Field(1, ge=1)
    steps: int = Field(600, ge=1, json_schema_extra=flag("--steps"))
    batch_size: int = Field(64, ge=1)
    lr: float = Field(2e-3, gt=0)
    alpha: float = Field(0.9, ge=0, le=1)
    loss: LossName = "fkl"
    temperature: float = Field(2.0, gt=0)
    arms: Annotated[tuple[Arm, ...], CommaList] = Field(("ce", "pseudo", "kd"), min_length=1,
                                                        json_schema_extra=flag("--arms"))  # fmt: skip
    # 2 seeds x 3 arms fit 20 minutes at load 13 on 2 cores; 3 seeds took ~25
    seeds: Seeds = Field((0, 1), json_schema_extra=flag("--seeds"))

    @model_validator(mode="after")
    def _runnable(self) -> CaptionRecipe:
        if self.labeled > self.teacher_scenes:
            raise ValueError(f"labeled ({self.labeled}) must be <= teacher_scenes ({self.teacher_scenes}): the "
                             "students' labeled scenes are the first of the teacher's")  # fmt: skip
        if self.transfer == 0 and {"pseudo", "kd"} & set(self.arms):
            raise ValueError("arms pseudo and kd need a transfer set (transfer > 0)")
        return self


def student_config(vocab_size: int, width: int, layers: int) -> CaptionerConfig:
    """A captioner of `width` (conv channels width / 4, width / 2; 2 heads, 4 from width 64)."""
    return CaptionerConfig(vocab_size, width, (width // 4, width // 2), layers, 4 if width >= 64 else 2)


def tensors(tokenizer, examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids [N, T], labels [N, T] (right-padded) and image index [N] of encoded examples."""
    encoded = [encode_example(tokenizer, e) for e in examples]
    ids = pad_batch([i for i, _ in encoded], tokenizer.get_vocab()["<pad>"])
    return ids, pad_batch([lab for _, lab in encoded], -100), torch.tensor([e.scene for e in examples])


def answers(model: TinyCaptioner, tokenizer, pixels: torch.Tensor, examples: list[Example], batch: int = 512):
    """Greedy answers (text) of `model` to examples whose images are `pixels[e.scene]`."""
    bos, out = tokenizer.get_vocab()["<bos>"], []
    for i in range(0, len(examples), batch):
        chunk = examples[i : i + batch]
        prompts = [[bos, *tokenizer.encode(e.prompt).ids] for e in chunk]
        out += [tokenizer.decode(g) for g in model.generate(pixels[[e.scene for e in chunk]], prompts)]
    return out


def teacher_model(out: Path, recipe: CaptionRecipe, tokenizer, pixels, examples) -> tuple[TinyCaptioner, float]:
    """The teacher (trained once, saved under OUT, reused when its settings match) and the seconds spent on it."""
    vocab = tokenizer.get_vocab()
    config = student_config(len(vocab), recipe.teacher_width, recipe.teacher_layers)
    torch.manual_seed(1234)
    teacher = TinyCaptioner(config, vocab)
    key = f"teacher-w{recipe.teacher_width}-l{recipe.teacher_layers}-s{recipe.teacher_steps}-n{recipe.teacher_scenes}"
    path = Path(recipe.teacher_file) if recipe.teacher_file else out / f"{key}.pt"
    if recipe.teacher_file and not path.is_file():
        raise UserError(f"--teacher-file: {path} is not a file")
    start = time.perf_counter()
    if path.is_file():
        try:
            teacher.load_state_dict(torch.load(path, weights_only=True))
        except (RuntimeError, OSError) as err:
            first = str(err).strip().splitlines()[0]
            raise UserError(f"{path}: not a teacher of width {recipe.teacher_width}, {recipe.teacher_layers} layers "
                            f"over this tokenizer ({first})") from None  # fmt: skip
        return teacher.eval(), time.perf_counter() - start
    ids, labels, image = tensors(tokenizer, examples)
    fit_captioner(teacher, pixels, image, ids, labels, None, Divergence(), 0.0, steps=recipe.teacher_steps,
                  batch_size=recipe.batch_size, lr=recipe.lr)  # fmt: skip
    torch.save(teacher.state_dict(), path)
    return teacher.eval(), time.perf_counter() - start


def run_caption(out: str | Path, recipe: CaptionRecipe | None = None, student_vocab: dict | None = None) -> dict:
    """Run the recipe into `out`; returns the report (also OUT/report.json, report.md, grid.png).

    `student_vocab` (tests, or a user's student) is checked against the teacher's tokenizer first.
    """
    recipe = recipe or CaptionRecipe()
    report = rep.started(recipe)
    tokenizer = scene_tokenizer()
    vocab = tokenizer.get_vocab()
    config = student_config(len(vocab), recipe.student_width, recipe.student_layers)
    if student_vocab is not None:
        other = replace(config, vocab_size=len(student_vocab))
        check_same_vocab(TinyCaptioner(config, vocab), TinyCaptioner(other, student_vocab))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pixels, examples = make_scenes(recipe.teacher_scenes, seed=0)
    teacher, report["teacher_s"] = teacher_model(out, recipe, tokenizer, pixels, examples)
    # the students' labeled set: the first `labeled` scenes (make_scenes draws scene by scene from one seeded rng)
    labeled = [e for e in examples if e.scene < recipe.labeled]
    sets = {"labeled": (pixels[: recipe.labeled], labeled)}
    start = time.perf_counter()
    if recipe.transfer:
        t_pixels, t_examples = make_scenes(recipe.transfer, seed=TRANSFER_SEED)
        said = answers(teacher, tokenizer, t_pixels, t_examples)  # the answers in t_examples are never trained on
        report["pseudo_label_exact"] = score_answers(said, [e.answer for e in t_examples], [e.task for e in t_examples])
        shift = recipe.labeled  # transfer scenes follow the labeled ones in one pixel tensor
        pseudo = [Example(e.scene + shift, e.task, e.prompt, a) for e, a in zip(t_examples, said, strict=True)]
        sets["with_transfer"] = (torch.cat([sets["labeled"][0], t_pixels]), labeled + pseudo)
    data = {}
    for name, (pix, exs) in sets.items():
        ids, labels, image = tensors(tokenizer, exs)
        data[name] = (pix, image, ids, labels, teacher_logits(teacher, pix, image, ids))
    report["transfer_s"] = time.perf_counter() - start
    test_pixels, test_examples = make_scenes(recipe.test, seed=TEST_SEED)
    refs, tasks = [e.answer for e in test_examples], [e.task for e in test_examples]
    teacher_said = answers(teacher, tokenizer, test_pixels, test_examples)
    report["teacher"] = score_answers(teacher_said, refs, tasks)
    report["params"] = {"teacher": sum(p.numel() for p in teacher.parameters())}
    per_scene = len(test_examples) // recipe.test  # a caption then the questions of each scene
    shown = [per_scene * j + j % per_scene for j in range(min(12, recipe.test))]  # the tasks in turn
    grid = {"shown": shown, "teacher": [teacher_said[i] for i in shown]}
    div = Divergence(recipe.loss, temperature=recipe.temperature)
    report["runs"] = []
    for seed in recipe.seeds:
        for arm in recipe.arms:
            pix, image, ids, labels, logits = data["labeled" if arm in ("ce", "kd_labeled") else "with_transfer"]
            torch.manual_seed(seed)
            student = TinyCaptioner(config, vocab)
            check_same_vocab(teacher, student)
            report["params"]["student"] = sum(p.numel() for p in student.parameters())
            alpha = recipe.alpha if arm.startswith("kd") else 0.0
            start = time.perf_counter()
            history = fit_captioner(student, pix, image, ids, labels, logits, div, alpha, steps=recipe.steps,
                                    batch_size=recipe.batch_size, lr=recipe.lr, seed=seed, progress=False)  # fmt: skip
            hyps = answers(student, tokenizer, test_pixels, test_examples)
            run = {"arm": arm, "seed": seed, "examples": len(ids), "train_s": time.perf_counter() - start}
            run |= {"last_loss": history[-1], "heldout": score_answers(hyps, refs, tasks)}
            report["runs"].append(run)
            print(f"{arm} seed {seed}: {run['heldout']}", flush=True)
            if seed == recipe.seeds[0]:
                grid[arm] = [hyps[i] for i in shown]
    report["grid"] = grid
    texts = []
    for j, i in enumerate(shown):
        e = test_examples[i]
        lines = [e.prompt.replace(" answer :", "").replace(" :", ""), f"ref: {e.answer}"]
        lines += [f"{who} {'=' if grid[who][j] == e.answer else 'x'} {grid[who][j]}" for who in grid if who != "shown"]
        texts.append("\n".join(lines))
    rep.draw_grid([test_pixels[test_examples[i].scene].permute(1, 2, 0) for i in shown], texts, out / "grid.png")
    return rep.finish(out, report, markdown)


METRICS = {
    "caption exact match": lambda r: r["heldout"]["caption"]["exact_match"],
    "caption chrF": lambda r: r["heldout"]["caption"]["chrf"],
    "VQA accuracy": lambda r: r["heldout"]["vqa"]["exact_match"],
}


def markdown(report: dict) -> str:
    """report.md: the teacher, each arm (mean ± half range over seeds), each arm minus its twin per seed."""
    r = report["recipe"]
    teacher = {"heldout": report["teacher"]}
    rows = [f"| teacher ({report['params']['teacher']:,} parameters) | "
            + " | ".join(f"{get(teacher):.3f}" for get in METRICS.values()) + " |"]  # fmt: skip
    rows += rep.arm_rows(report["runs"], ARMS, METRICS, "{:.3f}")
    lines = [
        "# Captioning / VQA KD through a transfer set",
        "",
        f"Students of {report['params'].get('student', 0):,} parameters, {r['steps']} steps x {r['batch_size']}, "
        f"lr {r['lr']}; {r['labeled']} labeled scenes, {r['transfer']} transfer scenes (teacher-answered), "
        f"{r['test']} held-out scenes; kd: alpha {r['alpha']}, {r['loss']}, T = {r['temperature']}.",
        "",
        rep.table(["model", *METRICS], rows),
        "",
    ]
    pairs = [(a, b) for a, b in (("kd", "ce"), ("kd", "pseudo"), ("pseudo", "ce"), ("kd_labeled", "ce"))
             if a in r["arms"] and b in r["arms"]]  # fmt: skip
    if pairs:
        margin_rows = []
        for a, b in pairs:
            for name, get in METRICS.items():
                m = rep.margins(report["runs"], a, b, get)
                cells = " ".join(f"{s}: {v:+.3f}" for s, v in sorted(m.items()))
                margin_rows.append(f"| {a} - {b} | {name} | {cells} | {sum(m.values()) / len(m):+.3f} |")
        lines += [rep.table(["pair", "metric", "per seed", "mean"], margin_rows), ""]
    if "pseudo_label_exact" in report:
        p = report["pseudo_label_exact"]
        lines.append(
            f"Teacher's pseudo-labels on the transfer set: caption exact {p['caption']['exact_match']:.3f}, VQA "
            f"{p['vqa']['exact_match']:.3f} (the truth is known for synthetic scenes; never trained on)."
        )
    return "\n".join(lines) + rep.footer(report)
