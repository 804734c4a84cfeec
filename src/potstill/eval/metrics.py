"""Evaluate a causal LM on packed data: perplexity, bits per byte, and agreement / KL with a teacher, per domain.

Every metric is a ratio of sums over the scored tokens (labels != -100), accumulated per domain in
float64 and pooled for `overall`, so a domain weighs by its token (or byte) count, never a mean of means:

- `ppl` = exp(sum NLL / tokens): per the model's own tokens;
- `bpb` = sum NLL / (ln 2 * bytes): bits per UTF-8 byte of the scored text, comparable across tokenizers;
- `top1_agreement` = fraction of scored tokens where argmax q_student == argmax p_teacher;
- `kl_to_teacher` = sum KL(p_teacher || q_student) / tokens, at T = 1 (`potstill.losses.divergences.fkl`).

A teacher of another tokenizer (`teacher.cross.CrossTokenizerTeacher`) has no distribution over the model's ids at
every position: both are compared on the positions that align one to one (`losses.align.one_to_one`: a student token
and a teacher token writing the same bytes after the same bytes), over the shared vocabulary plus one rest bucket
per side (term (b) of cross-tokenizer KD at T = 1). `top1_agreement` there counts positions whose two most probable
tokens write the same bytes; both figures are per aligned position, and `aligned_share` is the share of the scored
tokens they cover.

`evaluate_cli` is `potstill eval`: load the model (and teacher), pack the JSONL data, write OUT/eval.json
with `write_eval_json` (also the way a training run writes its eval.json).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from potstill.data.packing import collate, pack
from potstill.data.sources import read_many
from potstill.errors import UserError
from potstill.fileio import check_writable, write_json_atomic
from potstill.losses import IGNORE_INDEX, Divergence
from potstill.losses.align import CrossTargets, one_to_one, teacher_views
from potstill.losses.divergences import fkl
from potstill.losses.fused import TeacherHead
from potstill.losses.sparse import sparse_divergence
from potstill.models.heads import head_of
from potstill.models.load import load_model, quiet_hf_progress
from potstill.models.vocab import load_id_map
from potstill.teacher.cross import CrossTokenizerTeacher, shares_ids
from potstill.teacher.online import OnlineTeacher, check_tokenizers

EVAL_FILE = "eval.json"
_ROWS = 512  # token rows scored at once: bounds the [rows, V] temporaries (0.5 GiB each for a 262k vocabulary)
# Head rows per block when only the NLL is needed (no teacher): [512, 8192] float32 blocks (16 MiB) come from the
# allocator's reused memory, where one [512, 262k] block (0.5 GiB, and log_softmax's copy) is page-faulted anew for
# every group of rows: 1.6x less CPU for Gemma 3's head (benchmarks/README.md, "The demo's eval").
_VOCAB_BLOCK = 8192


@dataclass
class _Sums:
    """Token-weighted sums of one domain (or all of them)."""

    tokens: int = 0
    bytes: int = 0
    nll: float = 0.0
    agree: float = 0.0
    kl: float = 0.0
    compared: int = 0  # positions compared with the teacher (all scored tokens with one tokenizer)

    def add(self, other: _Sums) -> None:
        self.compared += other.compared
        self.tokens += other.tokens
        self.bytes += other.bytes
        self.nll += other.nll
        self.agree += other.agree
        self.kl += other.kl

    def metrics(self, with_teacher: bool, cross: bool = False) -> dict:
        """The eval.json entry: tokens, bytes, ppl, bpb (+ top1_agreement, kl_to_teacher; + aligned_share with a
        teacher of another tokenizer); None where undefined."""
        out = {
            "tokens": self.tokens,
            "bytes": self.bytes,
            "ppl": math.exp(self.nll / self.tokens) if self.tokens else None,
            "bpb": self.nll / (math.log(2) * self.bytes) if self.bytes else None,
        }
        if with_teacher:
            out["top1_agreement"] = self.agree / self.compared if self.compared else None
            out["kl_to_teacher"] = self.kl / self.compared if self.compared else None
        if cross:
            out["aligned_share"] = self.compared / self.tokens if self.tokens else None
        return out


def evaluate(
    model: torch.nn.Module,
    dataset: Dataset,
    teacher: OnlineTeacher | CrossTokenizerTeacher | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> dict:
    """Score a model on packed sequences, per domain and overall.

    Args:
        model: a causal LM returning `.logits` [B, T, V]; put in eval mode for the call (its mode is restored).
        dataset: items shaped like `PackedDataset`'s (input_ids, attention_mask, labels, n_bytes, domain).
        teacher: adds top1_agreement and kl_to_teacher: over the model's vocabulary (`OnlineTeacher`), or on the
            positions aligned one to one with a teacher of another tokenizer (`CrossTokenizerTeacher`, module doc).
        batch_size: sequences per forward pass.
        progress: show a tqdm bar over batches.

    Returns:
        {"overall": {...}, "domains": {name: {...}}}, keys as in `_Sums.metrics` (DESIGN.md §3 eval.json).
    """
    return evaluate_models({"model": model}, dataset, teacher, batch_size, progress)["model"]


def evaluate_models(
    models: Mapping[str, torch.nn.Module],
    dataset: Dataset,
    teacher: OnlineTeacher | CrossTokenizerTeacher | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, dict]:
    """`evaluate` for several models of one tokenizer (`dataset`'s) against one teacher: the teacher runs once per
    batch for all of them (an online teacher's final hidden states are shared; a teacher of another tokenizer still
    aligns per model), so scoring k students costs one teacher pass, not k.

    Returns:
        {name: what `evaluate` returns for that model}.
    """
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    domains: dict[str, dict[str, _Sums]] = {name: {} for name in models}
    was_training = {name: model.training for name, model in models.items()}
    for model in models.values():
        model.eval()
    try:
        with torch.inference_mode():
            for batch in tqdm(loader, desc="eval", unit="batch", disable=not progress):
                teacher_rows = _teacher_rows(teacher, batch, next(iter(models.values())))
                for name, model in models.items():
                    for domain, sums in zip(
                        batch["domain"], _batch_sums(model, batch, teacher, teacher_rows), strict=True
                    ):
                        domains[name].setdefault(domain, _Sums()).add(sums)
    finally:
        for name, model in models.items():
            model.train(was_training[name])
    with_teacher, cross = teacher is not None, isinstance(teacher, CrossTokenizerTeacher)
    results = {}
    for name, by_domain in domains.items():
        overall = _Sums()
        for sums in by_domain.values():
            overall.add(sums)
        results[name] = {
            "overall": overall.metrics(with_teacher, cross),
            "domains": {d: s.metrics(with_teacher, cross) for d, s in by_domain.items()},
        }
    return results


def _teacher_rows(teacher, batch: dict, model: torch.nn.Module) -> Outputs | None:
    """The online teacher's outputs on this batch (one forward, shared by every model), or None (no teacher, or one
    of another tokenizer: it aligns with each model in `_batch_sums`)."""
    if teacher is None or isinstance(teacher, CrossTokenizerTeacher):
        return None
    device = next(model.parameters()).device
    return _teacher_outputs(teacher, batch["input_ids"].to(device), batch["attention_mask"].to(device))


def _batch_sums(model: torch.nn.Module, batch: dict, teacher, teacher_rows: Outputs | None) -> list[_Sums]:
    """Per-sequence sums of one batch (B entries); `teacher_rows` from `_teacher_rows`."""
    device = next(model.parameters()).device
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    # Position t predicts token t + 1: shift the labels, not the logits (slicing the logits would copy [B, T, V]).
    targets = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX).to(device)
    student = _outputs(model, ids, mask)
    cross = isinstance(teacher, CrossTokenizerTeacher)
    stats = _token_stats(student, targets.view(-1), teacher_rows, nll_only=teacher is None)
    per_seq = stats.view(*targets.shape, 3).sum(1)  # [B, 3]
    tokens = (targets != IGNORE_INDEX).sum(1)
    compared = tokens.clone()
    if cross:
        inputs = {"input_ids": ids, "attention_mask": mask, "labels": batch["labels"].to(device)}
        compared, per_seq[:, 1:] = _aligned_stats(student, teacher.targets_for(inputs), ids.shape)
    return [
        _Sums(tokens=n, bytes=int(b), nll=nll, agree=agree, kl=kl, compared=c)
        for n, b, (nll, agree, kl), c in zip(
            tokens.tolist(), batch["n_bytes"].tolist(), per_seq.tolist(), compared.tolist(), strict=True
        )
    ]


def _aligned_stats(student: Outputs, targets: CrossTargets, shape: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """Per sequence of a [B, L] batch: (aligned positions [B], [B, 2] sums of top-1 agreement and KL(p || q) over
    the shared vocabulary + rest) on the 1:1 positions of a teacher of another tokenizer (module doc)."""
    al = targets.align
    s_tok, t_tok = one_to_one(al)
    rows = al.s_rows[s_tok]
    seq = rows // shape[1]
    # the teacher id -> the student id writing the same bytes (-1: none), to compare the two argmaxes
    paired = torch.full((targets.teacher.weight.shape[0],), -1, dtype=torch.long, device=rows.device)
    paired[targets.teacher_shared] = targets.student_shared
    sums = torch.zeros(shape[0], 2, dtype=torch.float64, device=rows.device)
    for idx in torch.arange(len(rows), device=rows.device).split(_ROWS):
        logits = _logits(student, rows[idx])
        t_logits = targets.teacher.rows(al.t_rows[t_tok[idx]]).logits()
        kl = sparse_divergence(logits, teacher_views(t_logits, targets, 1.0), Divergence("fkl"), tail="bucket")
        agree = paired[t_logits.argmax(-1)] == logits.argmax(-1)
        sums.index_add_(0, seq[idx], torch.stack([agree.double(), kl.double()], dim=-1))
    return torch.bincount(seq, minlength=shape[0]), sums


Outputs = TeacherHead | torch.Tensor
"""A model's outputs on one batch, by flat position: its final hidden states [B*T, H] with its head (`TeacherHead`),
whose logits are computed per group of rows, or its [B*T, V] logits."""


def _outputs(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> Outputs:
    """The model's final hidden states and head when its head allows, else its logits.

    A 262k-vocabulary head makes [B, T, V] logits (and the softcap's copies of them) the bulk of an eval
    pass; from [B, T, H] hidden states only [rows, V] exist at a time. Models whose head `head_of` cannot
    reproduce fall back to their full logits. The hidden states come from the decoder alone (`base_model`, as
    the online teacher's): the whole model with `logits_to_keep=1` would also run its head on the last position,
    and for a frozen model (requires_grad False, e.g. a teacher) `torch.matmul` does that by copying the [V, H]
    head once per sequence (8 x 335 MB for Gemma 3 at batch 8: 13x the forward's CPU time, measured).
    """
    head = head_of(model)
    if head is None:
        logits = model(input_ids=ids, attention_mask=mask).logits
        return logits.reshape(-1, logits.shape[-1])
    weight, softcap = head
    hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state  # after the final norm
    return TeacherHead(hidden=hidden.reshape(-1, weight.shape[1]), weight=weight, softcap=softcap)


def _teacher_outputs(teacher: OnlineTeacher, ids: torch.Tensor, mask: torch.Tensor) -> Outputs:
    """Like `_outputs`, for the teacher over the student's vocabulary."""
    head = teacher.head_inputs(ids, mask)
    if head is None:
        logits = teacher.logits(ids, mask)
        return logits.reshape(-1, logits.shape[-1])
    return replace(head, hidden=head.hidden.reshape(-1, head.hidden.shape[-1]))


def _logits(out: Outputs, idx: torch.Tensor) -> torch.Tensor:
    """[n] flat positions -> their [n, V] float32 logits."""
    return out.rows(idx).logits() if isinstance(out, TeacherHead) else out[idx].float()


def _nll(out: Outputs, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log softmax(logits)[target] of [n] flat positions -> [n] float32, the head's logits in blocks of
    `_VOCAB_BLOCK` ids (log-sum-exp merged across blocks), never all [n, V] at once."""
    if not isinstance(out, TeacherHead):
        return F.cross_entropy(out[idx].float(), targets, reduction="none")
    head = out.rows(idx)
    lse = picked = None
    for start in range(0, head.weight.shape[0], _VOCAB_BLOCK):
        stop = start + _VOCAB_BLOCK
        bias = None if head.bias is None else head.bias[start:stop]
        logits = replace(head, weight=head.weight[start:stop], bias=bias).logits()  # [n, block]
        block_lse = torch.logsumexp(logits, -1)
        if lse is None:
            lse, picked = block_lse, torch.zeros_like(block_lse)
        else:
            lse = torch.logaddexp(lse, block_lse)
        inside = ((targets >= start) & (targets < stop)).nonzero().squeeze(1)
        picked[inside] = logits[inside, targets[inside] - start]
    return lse - picked


def _token_stats(student: Outputs, targets: torch.Tensor, teacher: Outputs | None, nll_only: bool) -> torch.Tensor:
    """NLL, top-1 agreement and KL(p_teacher || q) of each scored token, in groups of `_ROWS` rows.

    Args:
        student: the model's outputs (`_outputs`).
        targets: [N] next-token ids, -100 where not scored.
        teacher: the teacher's outputs over the same vocabulary, or None.
        nll_only: only the NLL is needed (no teacher at all): computed in vocabulary blocks (`_nll`).

    Returns:
        [N, 3] float64 (nll, agree, kl); zero rows where not scored, zero agree/kl columns without a teacher.

    Raises:
        UserError: the teacher's logits do not cover the model's vocabulary.
    """
    out = torch.zeros(len(targets), 3, dtype=torch.float64, device=targets.device)
    rows = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    for idx in rows.split(_ROWS):
        if nll_only:
            out[idx, 0] = _nll(student, idx, targets[idx]).double()
            continue
        logits = _logits(student, idx)
        out[idx, 0] = F.cross_entropy(logits, targets[idx], reduction="none").double()
        if teacher is not None:
            t_logits = _logits(teacher, idx)
            if t_logits.shape != logits.shape:
                raise UserError(
                    f"teacher logits have {t_logits.shape[-1]} entries per token, the model's {logits.shape[-1]}: "
                    "the two vocabularies differ"
                )
            out[idx, 1] = (logits.argmax(-1) == t_logits.argmax(-1)).double()
            out[idx, 2] = fkl(logits, t_logits).double()
    return out


def evaluate_cli(
    model: str | Path,
    data: list[str | Path],
    out: str | Path,
    teacher: str | Path | None = None,
    seq_len: int = 256,
    batch_size: int = 8,
    overwrite: bool = False,
) -> Path:
    """`potstill eval`: evaluate a model directory on JSONL data and write OUT/eval.json atomically.

    The arguments are the fields of `potstill.config.EvalConfig` (`evaluate_cli(**cfg.model_dump())`).
    Sequences start with `<bos>` when the model's tokenizer has one. A teacher that shares the model's tokenizer
    (or is the teacher a trimmed student was made from, `potstill_vocab.json`) is compared at every position; one of
    another tokenizer on the positions aligned one to one (module doc).

    Returns:
        The path of eval.json: {"model", "teacher", "overall", "domains"}.

    Raises:
        UserError: eval.json exists without `overwrite`, OUT is a file, bad data, unloadable model,
            or a teacher whose tokenizer does not match (nothing is written then).
    """
    target = Path(out) / EVAL_FILE
    if Path(out).exists() and not Path(out).is_dir():
        raise UserError(f"{out}: exists and is not a directory")
    if target.exists() and not overwrite:
        raise UserError(f"{target}: already exists; pass --overwrite (overwrite: true) to replace it")
    check_writable(target)
    records = read_many(data)
    with quiet_hf_progress():
        student, tokenizer = load_model(model)
        online = None
        if teacher is not None:
            teacher_model, teacher_tok = load_model(teacher)
            id_map = load_id_map(model)
            if shares_ids(tokenizer, teacher_tok, id_map):
                check_tokenizers(tokenizer, teacher_tok, id_map)
                online = OnlineTeacher(teacher_model, id_map)
            else:  # another tokenizer: compared on the positions that align one to one
                online = CrossTokenizerTeacher(teacher_model, tokenizer, teacher_tok)
    dataset = pack(records, tokenizer, seq_len, add_bos=tokenizer.bos_token_id is not None)
    if isinstance(online, CrossTokenizerTeacher):
        online.tokens.check_context(dataset.input_ids, dataset.attention_mask, "--data")
    result = evaluate(student, dataset, online, batch_size=batch_size)
    return write_eval_json(Path(out), str(model), None if teacher is None else str(teacher), result)


def write_eval_json(out: Path, model: str, teacher: str | None, result: dict) -> Path:
    """Write OUT/eval.json ({"model", "teacher", "overall", "domains"}) via a temp file and a rename.

    Args:
        out: the run or eval directory (created if missing).
        model: how to name the evaluated model (its directory).
        teacher: the teacher's directory, or None.
        result: what `evaluate` returned.

    Returns:
        The path of eval.json; a crash leaves either the old file or the new one, never a partial one.
    """
    out.mkdir(parents=True, exist_ok=True)
    path = out / EVAL_FILE
    report = {"model": model, "teacher": teacher, "overall": result["overall"], "domains": result["domains"]}
    return write_json_atomic(path, report)
