"""potstill's KD step under FSDP2 full shard (`torch.distributed.fsdp.fully_shard`) on 2 gloo ranks, for
`test_distributed.py`: accelerate runs FSDP only on GPUs, so on CPUs the test shards the student itself.

`python -m torch.distributed.run --nproc_per_node 2 fsdp_kd_worker.py STUDENT TEACHER OUT`: each rank takes its
micro-batch of `micro_batches()`, trains 3 AdamW steps through `train` (the dense KD step, as `DistillTrainer` runs
it under FSDP), and rank 0 saves the gathered full weights to OUT. The test runs `train` on one process with both
micro-batches and compares.
"""

from __future__ import annotations

import sys

import torch
from transformers import AutoModelForCausalLM

from potstill.config import LossConfig
from potstill.losses import combine, scored_mask
from potstill.teacher.online import OnlineTeacher
from potstill.train.step import kd_micro_step

LOSS = LossConfig(alpha=0.5, temperature=2.0)


def micro_batches(vocab: int) -> list[dict]:
    """Two micro-batches of 2 x 16 seeded tokens with ragged scored positions."""
    ids = torch.randint(4, vocab, (4, 16), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, 0], labels[1, :5], labels[3, :9] = -100, -100, -100
    return [{"input_ids": ids[i : i + 2], "attention_mask": torch.ones(2, 16, dtype=torch.long),
             "labels": labels[i : i + 2]} for i in (0, 2)]  # fmt: skip


def train(student, teacher_dir: str, mine: list[dict], world: int, vocab: int) -> None:
    """3 optimizer steps over `mine` (this rank's micro-batches), each normalized by the global count of scored
    positions and scaled by the world size, as `DistillTrainer.finish_loss` does (FSDP averages over ranks)."""
    teacher = OnlineTeacher(AutoModelForCausalLM.from_pretrained(teacher_dir))
    count = sum(scored_mask(b["labels"]).sum() for b in micro_batches(vocab))
    optimizer = torch.optim.AdamW(student.parameters(), lr=0.01)
    for _ in range(3):
        optimizer.zero_grad()
        for batch in mine:
            terms, _ = kd_micro_step(student, student, batch, teacher, LOSS, LOSS.alpha, count, dense=True)
            (combine(terms, LOSS.alpha, LOSS.temperature, 0.0) * world).backward()
        optimizer.step()


def main(student_dir: str, teacher_dir: str, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    vocab = student.config.vocab_size
    for layer in student.model.layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    fully_shard(student, mesh=mesh, reshard_after_forward=True)
    shard = next(student.parameters()).to_local()
    assert shard.shape[0] < vocab, "the embedding is not sharded"
    train(student, teacher_dir, [micro_batches(vocab)[rank]], world, vocab)
    full = {k: v.full_tensor() for k, v in student.state_dict().items()}  # collective: every rank
    if rank == 0:
        torch.save(full, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
