"""What `potstill.eval.report` reads, as plain dicts: one model's eval.json, and a demo's results (teacher, KD and CE
students with their evals and loss curves). Shared by the report tests and the demo's."""

from __future__ import annotations


def eval_result(bpb: dict[str, float], agree: float | None = None) -> dict:
    domains = {d: {"tokens": 100, "bytes": 300, "ppl": 2**b, "bpb": b} for d, b in bpb.items()}
    overall_bpb = sum(bpb.values()) / len(bpb)  # equal bytes per domain: the byte-weighted mean
    overall = {"tokens": 100 * len(bpb), "bytes": 300 * len(bpb), "ppl": 2**overall_bpb, "bpb": overall_bpb}
    if agree is not None:
        overall.update(top1_agreement=agree, kl_to_teacher=0.5)
    return {"overall": overall, "domains": domains}


def demo_results(kd_code: float = 1.2) -> dict:
    def model(params, ms, ev):
        return {"path": "x", "params": params, "latency_ms_per_token": ms, "eval": ev}

    return {
        "models": {
            "teacher": model(1000, 50.0, eval_result({"code": 1.0, "docs": 0.8})),
            "student_kd": model(150, 10.0, eval_result({"code": kd_code, "docs": 1.1}, agree=0.6)),
            "student_ce": model(150, 10.0, eval_result({"code": 1.4, "docs": 1.3}, agree=0.5)),
        },
        "curves": {
            "student_kd": [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}],
            "student_ce": [{"step": 1, "loss": 3.5}, {"step": 2, "loss": 2.5}],
        },
        "settings": {"mode": "quick"},
    }
