"""Domain mixing: which domain each training sequence is drawn from (`DomainSampler`) and DDK's re-weighting.

`DomainSampler` draws packed sequences by domain weights. Draw n picks a domain from the weights in force
at n (a categorical draw from a stream seeded by `(seed, segment)`), then that domain's next sequence in a
seeded permutation, reshuffled each time the domain is exhausted (cycling, as in DDK's Algorithm 1). The
weights form a history of segments `(first draw, weights)`: new weights apply from a given draw on, so draw n
is a pure function of (seed, history, n). `state_dict` holds the seed, the history and the cursor; a sampler
restored from it continues with exactly the draws the original would have made.

Under DDP every rank's sampler yields the same global stream and accelerate (which the Trainer uses) gives
each rank every world_size-th batch of it: disjoint streams from the same weights.

DDK (Liu et al. 2024, `reference/methods.md` §1), with a per-domain gap g[i] (by default the perplexity ratio
ppl_student[i] / ppl_teacher[i]; or its log, the bpb ratio, or KL(p_teacher || q_student) per token):
- Eq. 1 (start): r_0 = softmax(g);
- Eq. 2 (every K steps): psi[i] = r_t[i] exp(g[i]),  r_{t+1}[i] = a psi[i] / sum_j psi[j] + (1 - a) / N,
  with a = `smoothing` (0.5 in the paper); (1 - a) / N is a floor so no domain starves.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler, Subset

from potstill.data.packing import PackedDataset
from potstill.errors import UserError
from potstill.losses import scored_mask

_CHUNK = 1024  # uniforms generated at once per segment
_PERM_SALT = 7919  # keeps the permutation streams apart from the domain-choice streams


def ddk_initial(gaps: Mapping[str, float]) -> dict[str, float]:
    """DDK Eq. 1: r_0 = softmax over domains of the gap.

    Args:
        gaps: domain -> gap (e.g. ppl_student / ppl_teacher).

    Returns:
        domain -> sampling weight, summing to 1.
    """
    names = list(gaps)
    g = np.array([gaps[d] for d in names], dtype=np.float64)
    e = np.exp(g - g.max())  # shift for overflow safety; softmax is shift-invariant
    return dict(zip(names, (e / e.sum()).tolist(), strict=True))


def ddk_update(previous: Mapping[str, float], gaps: Mapping[str, float], smoothing: float = 0.5) -> dict[str, float]:
    """DDK Eq. 2: psi = r_t * exp(g); r_{t+1} = smoothing * psi / sum(psi) + (1 - smoothing) / N.

    Args:
        previous: domain -> r_t (the weights in force).
        gaps: domain -> the newly measured gap (same domains).
        smoothing: alpha in [0, 1]; 1 = no floor, 0 = uniform.

    Returns:
        domain -> r_{t+1}, summing to 1.
    """
    names = list(previous)
    r = np.array([previous[d] for d in names], dtype=np.float64)
    g = np.array([gaps[d] for d in names], dtype=np.float64)
    psi = r * np.exp(g - g.max())
    new = smoothing * psi / psi.sum() + (1.0 - smoothing) / len(names)
    return dict(zip(names, new.tolist(), strict=True))


def static_weights(mode: str, sizes: Mapping[str, int], fixed: Mapping[str, float] | None = None) -> dict[str, float]:
    """Weights of the non-adaptive modes (and DDK's before its first measurement: uniform).

    Args:
        mode: "uniform", "proportional" (to each domain's number of training sequences), "fixed" or "ddk".
        sizes: domain -> training sequences.
        fixed: domain -> weight for mode "fixed" (checked by `check_weights`).

    Returns:
        domain -> weight, summing to 1, in the order of `sizes`.
    """
    if mode == "proportional":
        raw = {d: float(n) for d, n in sizes.items()}
    elif mode == "fixed":
        raw = {d: float(fixed[d]) for d in sizes}
    else:
        raw = {d: 1.0 for d in sizes}
    total = sum(raw.values())
    return {d: w / total for d, w in raw.items()}


def check_weights(weights: Mapping[str, float], domains: Sequence[str], where: str) -> None:
    """Configured weights must name exactly the training domains, be >= 0 and not all zero.

    Raises:
        UserError: `where: ...` naming the offending domain or value.
    """
    unknown = [d for d in weights if d not in domains]
    if unknown:
        raise UserError(f"{where}: domain {unknown[0]!r} is not in the training data (domains: {', '.join(domains)})")
    missing = [d for d in domains if d not in weights]
    if missing:
        raise UserError(f"{where}: no weight for training domain {missing[0]!r} (give every domain one; 0 skips it)")
    bad = [d for d, w in weights.items() if not (w >= 0 and math.isfinite(w))]
    if bad:
        raise UserError(f"{where}: weight of {bad[0]!r} must be a finite number >= 0 (got {weights[bad[0]]})")
    if sum(weights.values()) <= 0:
        raise UserError(f"{where}: weights sum to zero; give at least one domain a positive weight")


class DomainSampler(Sampler[int]):
    """Seeded, resumable sampler of dataset indices by domain weights (see the module docstring).

    Args:
        domains: the domain of each dataset item ([len(dataset)] names).
        weights: domain -> weight (>= 0, positive sum); every domain of `domains` needs one.
        num_samples: draws in all (`len(sampler)`); iteration stops there.
        seed: seeds the domain choices and the per-domain permutations.
    """

    def __init__(self, domains: Sequence[str], weights: Mapping[str, float], num_samples: int, seed: int = 0):
        self.names = list(dict.fromkeys(domains))
        check_weights(weights, self.names, "sampler weights")
        of = {d: i for i, d in enumerate(self.names)}
        codes = np.array([of[d] for d in domains], dtype=np.int64)
        self.items = [np.flatnonzero(codes == i) for i in range(len(self.names))]  # dataset indices per domain
        self.num_samples = num_samples
        self.seed = seed
        self.history: list[tuple[int, np.ndarray]] = [(0, self._normalized(weights))]
        self.cursor = 0  # next draw __iter__ starts at (and, while iterating, the next draw it yields)
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def __len__(self) -> int:
        return self.num_samples

    @property
    def weights(self) -> dict[str, float]:
        """The latest weights (domain -> probability)."""
        return dict(zip(self.names, self.history[-1][1].tolist(), strict=True))

    def _normalized(self, weights: Mapping[str, float]) -> np.ndarray:
        w = np.array([float(weights[d]) for d in self.names], dtype=np.float64)
        return w / w.sum()

    def set_weights(self, weights: Mapping[str, float], start: int | None = None) -> None:
        """Use `weights` for draws `start` and later (default: from the cursor on).

        Raises:
            UserError: bad weights.
            ValueError: `start` before a draw already made (those cannot change any more).
        """
        check_weights(weights, self.names, "sampler weights")
        start = self.cursor if start is None else start
        if start < self.cursor or start < self.history[-1][0]:
            raise ValueError(f"new weights from draw {start}, but draw {max(self.cursor, self.history[-1][0])} is made")
        if start == self.history[-1][0]:
            self.history.pop()
        self.history.append((start, self._normalized(weights)))

    def seek(self, draw: int) -> None:
        """Continue from draw `draw` (e.g. the draws a resumed Trainer has consumed)."""
        self.cursor = draw

    def state_dict(self) -> dict:
        """JSON-able state: seed, per-domain sizes (to check the data), weight history, cursor."""
        return {
            "seed": self.seed,
            "domains": self.names,
            "sizes": [len(x) for x in self.items],
            "history": [[start, w.tolist()] for start, w in self.history],
            "cursor": self.cursor,
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restore `state_dict()`; the data must have the same domains and sizes.

        Raises:
            UserError: the saved state describes other data.
        """
        sizes = [len(x) for x in self.items]
        if list(state["domains"]) != self.names or list(state["sizes"]) != sizes:
            raise UserError(
                f"saved sampler state is for domains {state['domains']} with {state['sizes']} sequences, "
                f"the data has {self.names} with {sizes}; resume with the same data"
            )
        self.seed = int(state["seed"])
        self.history = [(int(start), np.asarray(w, dtype=np.float64)) for start, w in state["history"]]
        self.cursor = int(state["cursor"])

    def __iter__(self) -> Iterator[int]:
        counts = self._replay(self.cursor)
        while self.cursor < self.num_samples:
            j = max(i for i, (start, _) in enumerate(self.history) if start <= self.cursor)
            for code in self._segment(j, self.cursor - self.history[j][0]):
                if self.cursor >= self.num_samples or (
                    j + 1 < len(self.history) and self.cursor >= self.history[j + 1][0]
                ):
                    break  # the end, or newer weights take over from here
                self.cursor += 1
                yield self._item(code, counts[code])
                counts[code] += 1

    def _segment(self, j: int, skip: int) -> Iterator[int]:
        """Domain codes of segment j from its `skip`-th draw on (endless; chunked generation == one stream)."""
        rng = np.random.default_rng([self.seed, j])
        cum = np.cumsum(self.history[j][1])
        while skip >= _CHUNK:
            rng.random(_CHUNK)
            skip -= _CHUNK
        first = True
        while True:
            u = rng.random(_CHUNK)
            codes = np.minimum(np.searchsorted(cum, u * cum[-1], side="right"), len(cum) - 1)
            yield from codes[skip if first else 0 :].tolist()
            first = False

    def _replay(self, upto: int) -> np.ndarray:
        """[N] long: how many of draws 0..upto-1 each domain got (recomputed from the history)."""
        counts = np.zeros(len(self.names), dtype=np.int64)
        for j, (start, w) in enumerate(self.history):
            end = min(upto, self.history[j + 1][0] if j + 1 < len(self.history) else upto)
            if end > start:
                cum = np.cumsum(w)
                u = np.random.default_rng([self.seed, j]).random(end - start)
                codes = np.minimum(np.searchsorted(cum, u * cum[-1], side="right"), len(cum) - 1)
                counts += np.bincount(codes, minlength=len(self.names))
        return counts

    def _item(self, code: int, count: int) -> int:
        """Dataset index of the `count`-th draw of domain `code`: a fresh permutation per pass over the domain."""
        size = len(self.items[code])
        key = (code, count // size)
        if key not in self._perms:
            self._perms = {k: v for k, v in self._perms.items() if k[0] != code}  # one pass per domain kept
            self._perms[key] = np.random.default_rng([self.seed, _PERM_SALT, *key]).permutation(size)
        return int(self.items[code][self._perms[key][count % size]])


# ---- DDK's gaps and held-out data ----


def domain_gaps(student: dict[str, dict], teacher: dict[str, float] | None, gap: str) -> dict[str, float]:
    """Per-domain gap g[i]: ppl_S / ppl_T, ln(ppl_S / ppl_T), bpb_S / bpb_T, or KL(p_T || q_S) per token.

    `logppl` = CE_S - CE_T in nats per token: Eq. 1's softmax of it is proportional to the ppl ratio, which keeps
    the paper's behaviour where ratios are 1-2 and does not collapse onto one domain where they are 10 or more.

    Args:
        student: domain -> the student's evaluate() figures on that domain.
        teacher: domain -> the teacher's ppl (or bpb); unused for gap="kl".
        gap: "ppl", "logppl", "bpb" or "kl".
    """
    if gap == "kl":
        return {d: s["kl_to_teacher"] for d, s in student.items()}
    if gap == "logppl":
        return {d: math.log(s["ppl"] / teacher[d]) for d, s in student.items()}
    return {d: s[gap] / teacher[d] for d, s in student.items()}


def split_heldout(train_ds, eval_ds, eval_tokens: int, eval_files: list[str]):
    """Each training domain's held-out sequences (at most `eval_tokens` scored tokens, at least one sequence).

    Returns:
        (training data, domain -> Subset of held-out sequences).

    Raises:
        UserError: a domain missing from `data.eval`, or (no `data.eval`) a domain with too few sequences.
    """
    domains = train_ds.domain_names
    if eval_ds is not None:
        missing = [d for d in domains if d not in eval_ds.domains]
        if missing:
            raise UserError(
                f"{eval_files[0]}: data.eval has no held-out data for training domain {missing[0]!r}; "
                "DDK needs every training domain in data.eval (or leave data.eval empty to hold out training data)"
            )
        return train_ds, {d: _first_tokens(eval_ds, d, eval_tokens) for d in domains}
    heldout, keep = {}, []
    for d in domains:
        idx = [i for i, name in enumerate(train_ds.domains) if name == d]
        n = _sequences_for(train_ds, idx[::-1], eval_tokens)
        if n >= len(idx):
            raise UserError(
                f"data.train: domain {d!r} has {len(idx)} sequences, too few to hold out {n} for DDK's held-out "
                "split and still train on it; add data (or data.eval), or lower data.mixing.eval_tokens"
            )
        heldout[d] = Subset(train_ds, idx[len(idx) - n :])
        keep += idx[: len(idx) - n]
    return _subset(train_ds, sorted(keep)), heldout


def _scored(ds, i: int) -> int:
    return int(scored_mask(ds.labels[i : i + 1]).sum())


def _sequences_for(ds, idx: list[int], tokens: int) -> int:
    """How many of `idx` (in order) it takes to reach `tokens` scored tokens (all of them if never)."""
    total = 0
    for n, i in enumerate(idx, start=1):
        total += _scored(ds, i)
        if total >= tokens:
            return n
    return len(idx)


def _first_tokens(ds, domain: str, tokens: int) -> Subset:
    idx = [i for i, name in enumerate(ds.domains) if name == domain]
    return Subset(ds, idx[: _sequences_for(ds, idx, tokens)])


def _subset(ds, idx: list[int]):
    """A PackedDataset of the rows `idx` (keeps `domains` / `domain_names` for the sampler)."""
    rows = torch.tensor(idx, dtype=torch.long)
    return PackedDataset(
        ds.input_ids[rows], ds.attention_mask[rows], ds.labels[rows], ds.n_bytes[rows], [ds.domains[i] for i in idx]
    )
