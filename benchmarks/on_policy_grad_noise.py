"""How noisy is one batch's gradient of the sampled reverse KL (`rkl_sampled`), against the exact per-token reverse
KL on the same student samples? Why the policy-gradient arms of `on_policy_arena.py` need a smaller lr.

For a fixed student and teacher (e.g. the arena's supervised start and its teacher), R rounds; each draws B
training prompts (seeded), lets the student complete them (`potstill.train.rollouts.rollout`, temperature 1), and
takes three gradients over the student's parameters on those samples, each divided by the scored token count:

- `sampled`: the `rkl_sampled` surrogate (`potstill.losses.policy.sampled_reverse_kl`, no baseline);
- `sampled+batch`: the same with `baseline="batch"` (the micro-batch's mean advantage subtracted);
- `full`: the reverse KL over the whole vocabulary, `sum_t KL(q(.|y<t) || p(.|y<t))` at the same sampled prefixes
  (`potstill.losses.divergences.rkl`: what `objective: gkd` with `loss.name: rkl` trains on).

Given its prefix, `E_{y_t ~ q}[(log q - log p)(y_t) grad log q(y_t)] = grad KL_t(q || p)`, so `sampled` and `full`
have the same expectation: the mean of `sampled` over the R rounds must approach the mean of `full` (a check of
the whole path: rollout, teacher scoring, surrogate). Printed per estimator: cos(its mean, the mean of `full`), the
mean over rounds of cos(one round's gradient, the mean of `full`), and the relative noise
mean_r ||g_r - mean g|| / ||mean g||. A batch whose gradient points 10 degrees off the expected one can take a
big step; one at 80 degrees needs a small lr (Adam normalizes the scale, not the direction).

    python benchmarks/on_policy_grad_noise.py --student RUN/ce_start_s0/student --teacher RUN/teacher/student \
        --data RUN/train.jsonl --seq-len 11 --max-new-tokens 4
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F


def flat_grad(loss: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    """[P] the gradient of `loss` over `params`, concatenated."""
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, retain_graph=True)])


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from potstill.config import OnPolicyConfig
    from potstill.data import collate
    from potstill.losses import scored_mask
    from potstill.losses.divergences import rkl
    from potstill.losses.policy import sampled_reverse_kl
    from potstill.train.on_policy import PromptDataset
    from potstill.train.rollouts import rollout

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--student", required=True, help="HF dir of the student")
    p.add_argument("--teacher", required=True, help="HF dir of the teacher (same vocabulary)")
    p.add_argument("--data", required=True, help="prompt/completion JSONL")
    p.add_argument("--seq-len", type=int, required=True, help="data.seq_len of the run")
    p.add_argument("--max-new-tokens", type=int, required=True)
    p.add_argument("--batch", type=int, default=32, help="prompts per round (the arena's batch)")
    p.add_argument("--rounds", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    tok = AutoTokenizer.from_pretrained(args.student)
    student = AutoModelForCausalLM.from_pretrained(args.student, dtype=torch.float32).train()
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher, dtype=torch.float32).eval()
    data = PromptDataset([args.data], tok, args.seq_len, args.max_new_tokens)
    cfg = OnPolicyConfig(max_new_tokens=args.max_new_tokens, temperature=1.0)
    params = [q for q in student.parameters() if q.requires_grad]
    grads: dict[str, list[torch.Tensor]] = {"sampled": [], "sampled+batch": [], "full": []}
    rkl_values = []
    for r in range(args.rounds):
        pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed * 100_003 + r))
        batch = collate([data[int(i)] for i in pick[: args.batch]])
        batch = rollout(student, batch, cfg, data.pad_id, tok.eos_token_id, seed=args.seed * 100_003 + r)
        mask = scored_mask(batch["labels"])  # [B, L - 1]: position t predicts token t + 1
        targets = batch["labels"][:, 1:][mask]
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][mask]
        with torch.no_grad():
            t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            t_logits = t_logits[:, :-1][mask]
        log_q = F.log_softmax(logits, -1).gather(1, targets[:, None])[:, 0]
        log_p = F.log_softmax(t_logits, -1).gather(1, targets[:, None])[:, 0]
        n = len(targets)
        for name, baseline in (("sampled", 0.0), ("sampled+batch", "batch")):
            grads[name].append(flat_grad(sampled_reverse_kl(log_q, log_p, baseline)[0].sum() / n, params))
        full = rkl(logits, t_logits).sum() / n
        grads["full"].append(flat_grad(full, params))
        rkl_values.append(float(full.detach()))
    reference = torch.stack(grads["full"]).mean(0)
    print(
        f"{args.rounds} rounds x {args.batch} prompts; full-vocabulary reverse KL on the samples:"
        f" {sum(rkl_values) / len(rkl_values):.3f} nats/token"
    )
    noise_full = float((torch.stack(grads["full"]) - reference).norm(dim=1).mean() / reference.norm())
    print(
        "| estimator | cos(mean, mean full) | (if unbiased, about) | mean cos(one batch, mean full) | relative noise |"
    )
    print("|---|---:|---:|---:|---:|")
    for name, gs in grads.items():
        stack = torch.stack(gs)
        mean = stack.mean(0)
        cos_mean = float(F.cosine_similarity(mean, reference, dim=0))
        cos_one = float(F.cosine_similarity(stack, reference[None], dim=1).mean())
        noise = float((stack - mean).norm(dim=1).mean() / mean.norm())
        expected = (
            ((1 + noise**2 / args.rounds) * (1 + noise_full**2 / args.rounds)) ** -0.5 if gs is not grads["full"] else 1
        )
        print(f"| {name} | {cos_mean:.3f} | {expected:.3f} | {cos_one:.3f} | {noise:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
