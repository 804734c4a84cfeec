"""`potstill check TEACHER STUDENT`: a pre-flight table of a teacher/student pair and a verdict, before any training.

What it compares: the vocabularies id by id (the bytes each id writes, not only the sizes), head rows beyond the
tokenizer (padding rows no text ever uses), the special tokens and chat templates (`models.specials.check_specials`,
the check a same-tokenizer run makes), logit soft-capping, context lengths, whether each head is a plain linear
layer. With `--data`, on a sample of packed sequences of the student: bytes per token on each side, the share of the
student's scored tokens whose group is one token on each side (the positions the shared-vocabulary distribution term
sees), the share in scored groups (the group-likelihood term), the share of tokens whose id is in the shared
vocabulary, and the teacher's probability mass on shared ids (what the distribution term can transfer).

The verdict names the training that applies: same-tokenizer KD (every path: online, cache, fused, DDK, hidden
states), cross-tokenizer KD (`loss.cross_tokenizer: auto` picks it), or none, and why.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from potstill.data.crossbatch import CrossTokenizer
from potstill.data.tokenbytes import token_byte_table
from potstill.errors import UserError
from potstill.losses.align import CrossTargets
from potstill.models.heads import head_of, softcap_of
from potstill.models.load import load_model
from potstill.models.specials import check_specials, eos_ids
from potstill.teacher.cross import CrossTokenizerTeacher, same_tokenizer

SAMPLE_BATCH = 4  # sequences per teacher forward on the data sample


@dataclass
class PairCheck:
    """The result of `check_pair`.

    Attributes:
        rows: (what, teacher, student, note) table rows.
        data: figures on the data sample (empty without data).
        mode: "same" (same-tokenizer KD), "cross" (cross-tokenizer KD) or "none".
        verdict: one paragraph: which training is possible and why.
    """

    rows: list[tuple[str, str, str, str]] = field(default_factory=list)
    data: dict[str, float] = field(default_factory=dict)
    mode: str = "none"
    verdict: str = ""


def _vocab_rows(teacher_tok, student_tok, t_model, s_model) -> tuple[list, int, bool]:
    """Rows about the vocabularies; (rows, ids equal by bytes at the same id, heads padded consistently)."""
    t_table, s_table = token_byte_table(teacher_tok), token_byte_table(student_tok)
    n = min(len(t_table), len(s_table))
    same_bytes = sum(t_table[i] == s_table[i] for i in range(n))
    t_rows = t_model.get_output_embeddings().weight.shape[0]
    s_rows = s_model.get_output_embeddings().weight.shape[0]
    pad_t, pad_s = t_rows - len(teacher_tok), s_rows - len(student_tok)
    rows = [
        ("tokenizer ids", f"{len(teacher_tok):,}", f"{len(student_tok):,}", ""),
        (
            "head rows (beyond tokenizer)",
            f"{t_rows:,} ({pad_t:+,})",
            f"{s_rows:,} ({pad_s:+,})",
            "padding rows: never a token",
        ),
        ("ids writing the same bytes", "", "", f"{same_bytes:,} of {max(len(t_table), len(s_table)):,} ids"),
    ]
    return rows, same_bytes, pad_t >= 0 and pad_s >= 0


def check_pair(
    teacher: str | Path,
    student: str | Path,
    data: list[str | Path] | None = None,
    samples: int = 16,
    seq_len: int = 256,
) -> PairCheck:
    """Compare a teacher and a student (module doc).

    Args:
        teacher, student: HF directories or .gguf files.
        data: JSONL files to sample from (None: no data figures).
        samples: packed student sequences of the sample.
        seq_len: student tokens per sequence.

    Raises:
        UserError: unloadable models or data.
    """
    t_model, t_tok = load_model(teacher)
    s_model, s_tok = load_model(student)
    rows, same_bytes, heads_ok = _vocab_rows(t_tok, s_tok, t_model, s_model)
    out = PairCheck(rows=rows)
    same = same_tokenizer(s_tok, t_tok)
    cross = CrossTokenizer(s_tok, t_tok) if t_tok.is_fast and s_tok.is_fast else None
    if cross is not None:
        k = cross.student_shared.numel()
        share = f"{k / len(t_tok):.1%} of the teacher's, {k / len(s_tok):.1%} of the student's ids"
        out.rows.append(("shared vocabulary (same bytes)", "", "", f"{k:,} tokens ({share})"))
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        mine, theirs = getattr(s_tok, name), getattr(t_tok, name)
        out.rows.append((name, repr(theirs), repr(mine), "same" if mine == theirs else "differs"))
    t_tpl, s_tpl = getattr(t_tok, "chat_template", None), getattr(s_tok, "chat_template", None)
    tpl_note = "same" if t_tpl == s_tpl else "differs" if t_tpl and s_tpl else "one side has none"
    out.rows.append(("chat template", _has(t_tpl), _has(s_tpl), tpl_note))
    specials_problem = None
    if same:
        try:
            check_specials(s_tok, t_tok, student_eos_ids=eos_ids(s_model), teacher_eos_ids=eos_ids(t_model))
        except UserError as err:
            specials_problem = str(err)
    t_cap, s_cap = softcap_of(t_model), softcap_of(s_model)
    out.rows.append(("final logit soft-capping", str(t_cap), str(s_cap), "applied to each side's own logits"))
    t_ctx = getattr(t_model.config, "max_position_embeddings", None)
    s_ctx = getattr(s_model.config, "max_position_embeddings", None)
    out.rows.append(("context length", str(t_ctx), str(s_ctx), ""))
    t_head, s_head = head_of(t_model) is not None, head_of(s_model) is not None
    out.rows.append(("plain linear head", _yes(t_head), _yes(s_head), "needed for chunked (fused) losses"))
    out.rows.append(("fast tokenizer (byte offsets)", _yes(t_tok.is_fast), _yes(s_tok.is_fast), ""))
    if data and cross is not None and t_head:
        out.data = _data_figures(t_model, s_tok, t_tok, data, samples, seq_len)
    out.mode, out.verdict = _verdict(same, specials_problem, heads_ok, cross, t_head, s_head, out.data, same_bytes)
    return out


def _has(template: str | None) -> str:
    return f"{len(template):,} chars" if template else "none"


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


@torch.no_grad()
def _data_figures(t_model, s_tok, t_tok, data, samples: int, seq_len: int) -> dict[str, float]:
    """Alignment and shared-vocabulary figures on `samples` packed sequences of the data (module doc)."""
    from potstill.data import load_dataset

    ds = load_dataset(list(data), s_tok, seq_len)
    n = min(samples, len(ds))
    teacher = CrossTokenizerTeacher(t_model, s_tok, t_tok)
    shared_s = torch.zeros(len(s_tok) + 1, dtype=torch.bool)
    shared_s[teacher.tokens.student_shared] = True
    sums = dict.fromkeys(("scored", "one", "covered", "s_shared", "t_tokens", "t_shared", "mass", "bytes"), 0.0)
    for start in range(0, n, SAMPLE_BATCH):
        batch = {
            k: getattr(ds, k)[start : min(n, start + SAMPLE_BATCH)] for k in ("input_ids", "attention_mask", "labels")
        }
        targets = teacher.targets_for(batch)
        al = targets.align
        scored, one = al.scored_groups()
        ok = al.s_ok
        sums["scored"] += float(ok.sum())
        sums["one"] += float(one[al.s_group[ok]].sum())
        sums["covered"] += float(scored[al.s_group[ok]].sum())
        sums["s_shared"] += float(shared_s[al.s_ids[ok].clamp_max(len(s_tok))].sum())
        sums["bytes"] += float(ds.n_bytes[start : min(n, start + SAMPLE_BATCH)].sum())
        t_ok = al.t_ok
        sums["t_tokens"] += float(t_ok.sum())
        t_shared = torch.zeros(targets.teacher.weight.shape[0], dtype=torch.bool)
        t_shared[targets.teacher_shared] = True
        sums["t_shared"] += float(t_shared[al.t_ids[t_ok]].sum())
        sums["mass"] += _shared_mass(targets, al.t_rows[t_ok])
    scored = max(sums["scored"], 1.0)
    return {
        "sequences": float(n),
        "student_bytes_per_token": sums["bytes"] / scored,
        "teacher_bytes_per_token": sums["bytes"] / max(sums["t_tokens"], 1.0),
        "one_to_one": sums["one"] / scored,
        "group_coverage": sums["covered"] / scored,
        "student_tokens_shared": sums["s_shared"] / scored,
        "teacher_tokens_shared": sums["t_shared"] / max(sums["t_tokens"], 1.0),
        "teacher_mass_on_shared": sums["mass"] / max(sums["t_tokens"], 1.0),
    }


def _shared_mass(targets: CrossTargets, rows: torch.Tensor, chunk: int = 64) -> float:
    """Sum over teacher positions `rows` of the teacher's probability mass on the shared ids (chunked)."""
    total = 0.0
    for part in rows.split(chunk):
        probs = torch.softmax(targets.teacher.rows(part).logits(), dim=-1)
        total += float(probs[:, targets.teacher_shared].sum())
    return total


def _verdict(same, specials_problem, heads_ok, cross, t_head, s_head, data, same_bytes) -> tuple[str, str]:
    if same and heads_ok:
        if specials_problem:
            return "same", f"same-tokenizer KD, once this is fixed: {specials_problem}"
        return "same", (
            "same-tokenizer KD: both tokenizers give every string the same ids; every path applies (online teacher,"
            " cache, fused loss, DDK, hidden states)"
        )
    why = [f"the vocabularies differ ({same_bytes:,} ids write the same bytes at the same id)"]
    if not same:
        missing = []
        if cross is None:
            missing.append("a fast tokenizer on both sides (tokenizer.json: byte offsets)")
        if not (t_head and s_head):
            missing.append("plain linear heads (the losses apply them in chunks)")
        if missing:
            return "none", f"no KD possible: {why[0]}, and cross-tokenizer KD needs {' and '.join(missing)}"
    figures = ""
    if data:
        figures = (
            f"; on the sample {data['one_to_one']:.1%} of the student's scored tokens align one to one (distribution"
            f" term over the shared vocabulary, where the teacher puts {data['teacher_mass_on_shared']:.1%} of its"
            f" mass) and {data['group_coverage']:.1%} lie in aligned groups (group-likelihood term)"
        )
    return "cross", (
        f"cross-tokenizer KD (loss.cross_tokenizer: auto picks it): {why[0]}; the teacher reads the same text through"
        f" its own tokenizer{figures}. The teacher cache is a cross-tokenizer one (`cache build --student`), eval's KL"
        " covers the positions aligned one to one; DDK and hidden states do not apply"
    )


def format_check(result: PairCheck) -> str:
    """The table, the data figures and the verdict as text (what `potstill check` prints)."""
    header = ("", "teacher", "student", "")
    widths = [max(len(r[i]) for r in [header, *result.rows]) for i in range(4)]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in [header, *result.rows]
    ]
    if result.data:
        lines.append("")
        lines.append(f"on {int(result.data['sequences'])} packed sequences of the data:")
        for key, value in result.data.items():
            if key != "sequences":
                lines.append(
                    f"  {key.replace('_', ' ')}: {value:.3f}"
                    if "per_token" in key
                    else f"  {key.replace('_', ' ')}: {value:.1%}"
                )
    lines += ["", f"verdict: {result.verdict}"]
    return "\n".join(lines)
