"""Several teachers at once (`model.teachers`): which teacher scores which rows of a batch, with what weight.

A run with teachers k = 1..K (weights w_k >= 0, domains D_k, all domains when null) distills a packed row of
domain d from the teachers whose D_k holds d, each with its share of the weights there:

    share_k(d) = w_k / sum_{j: d in D_j} w_j
    kd = (1 / N) sum_{scored t} sum_k share_k(domain(t)) D(p_k(t) || q(t))        (summed per-teacher terms)

so every scored position carries a KD weight of 1 in total, as with one teacher, and a domain routed to one
teacher is distilled from that teacher alone. Each term is the one-teacher term of its teacher's path (same
tokenizer: the fused loss over the student's ids; another tokenizer: `losses.align.cross_tokenizer_terms`), so
teachers of different tokenizers mix freely. For the forward KL the sum equals KL against the mixed distribution
sum_k share_k p_k up to a constant (same gradient); for other divergences they differ (docs/teachers.md).

`TeacherSet.routes(domains)` cuts a batch into `Route`s: the rows one teacher scores at one share; the CE term of
each row is taken from exactly one of its routes (`Route.ce`), so CE is not counted twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from potstill.errors import UserError


@dataclass(frozen=True)
class Route:
    """The rows of a batch one teacher scores at one share.

    Attributes:
        teacher: index into `TeacherSet.members`.
        rows: batch rows (ascending).
        share: the teacher's normalized weight in these rows' domains.
        ce: these rows' CE term is taken from this route (their first teacher's).
    """

    teacher: int
    rows: list[int]
    share: float
    ce: bool


@dataclass
class TeacherSet:
    """The teachers of a run, their weights and domains (`model.teachers`).

    Attributes:
        members: one teacher object per entry (`OnlineTeacher` or `CrossTokenizerTeacher`).
        names: each one's path (for messages and logs).
        weights: w_k >= 0.
        domains: D_k, or None for every domain.
    """

    members: list
    names: list[str]
    weights: list[float]
    domains: list[list[str] | None]
    _shares: dict[str, dict[int, float]] = field(default_factory=dict, repr=False)

    def shares(self, domain: str) -> dict[int, float]:
        """teacher index -> share_k(domain) for the teachers with a positive weight there."""
        if domain not in self._shares:
            here = {
                k: w
                for k, (w, ds) in enumerate(zip(self.weights, self.domains, strict=True))
                if ds is None or domain in ds
            }
            total = sum(here.values())
            self._shares[domain] = {k: w / total for k, w in here.items() if w > 0} if total > 0 else {}
        return self._shares[domain]

    def check_domains(self, domains: list[str]) -> None:
        """Refuse a routing table naming a domain absent from the training data, or leaving one without a teacher.

        Raises:
            UserError: one line naming the teacher entry or the domain.
        """
        known = set(domains)
        for k, ds in enumerate(self.domains):
            absent = next((d for d in ds or () if d not in known), None)
            if absent is not None:
                raise UserError(
                    f"config: model.teachers.{k}.domains: {absent!r} is not a domain of the training data (domains:"
                    f" {', '.join(sorted(known))})"
                )
        orphan = next((d for d in domains if not self.shares(d)), None)
        if orphan is not None:
            raise UserError(
                f"config: model.teachers: no teacher with a positive weight distills domain {orphan!r}; add it to a"
                " teacher's domains, or give one teacher domains: null"
            )

    def routes(self, row_domains: list[str]) -> list[Route]:
        """The routes of a batch whose row i has domain `row_domains[i]` (each row: one route per teacher there)."""
        groups: dict[tuple[int, float, bool], list[int]] = {}
        for i, domain in enumerate(row_domains):
            shares = self.shares(domain)
            if not shares:
                raise ValueError(f"no teacher distills domain {domain!r}")
            first = min(shares)
            for k, share in shares.items():
                groups.setdefault((k, share, k == first), []).append(i)
        return [Route(k, rows, share, ce) for (k, share, ce), rows in sorted(groups.items(), key=lambda g: g[0])]
