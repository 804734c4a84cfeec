"""A tiny image-to-text model (captioning / VQA) trainable on a CPU in minutes: a conv encoder, a transformer decoder.

The image [B, 3, S, S] becomes (S/8)^2 memory vectors (three stride-2 convs, learned positions); the decoder reads
`<bos> prompt answer` causally with cross-attention to them and returns next-token logits [B, T, V] (position t
predicts token t + 1: the causal-LM convention of `potstill.losses.kd_terms`). Teacher and student are the same
class at two widths / depths; both carry their tokenizer's vocabulary (`vocab`), which token-level KD requires to be
the same (`check_same_vocab`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from potstill.errors import UserError


@dataclass(frozen=True)
class CaptionerConfig:
    """Sizes of a TinyCaptioner.

    Attributes:
        vocab_size: V.
        width: d_model of encoder output and decoder.
        channels: the encoder's two hidden conv widths (the third conv outputs `width`).
        layers: decoder layers.
        heads: attention heads.
        image_size: S (a multiple of 8).
        max_len: longest token sequence.
    """

    vocab_size: int
    width: int = 64
    channels: tuple[int, int] = (16, 32)
    layers: int = 1
    heads: int = 2
    image_size: int = 64
    max_len: int = 32


class TinyCaptioner(nn.Module):
    """Conv encoder + transformer decoder: forward(pixels [B, 3, S, S], ids [B, T]) -> logits [B, T, V]."""

    def __init__(self, config: CaptionerConfig, vocab: dict[str, int]):
        super().__init__()
        if config.image_size % 8 or len(vocab) != config.vocab_size:
            raise UserError(
                f"captioner: image_size must be a multiple of 8 and the vocabulary must have vocab_size entries "
                f"(got {config.image_size}, {len(vocab)} vs {config.vocab_size})"
            )
        self.config, self.vocab = config, dict(vocab)
        c1, c2, d = *config.channels, config.width
        self.encoder = nn.Sequential(
            nn.Conv2d(3, c1, 3, 2, 1), nn.GELU(), nn.Conv2d(c1, c2, 3, 2, 1), nn.GELU(), nn.Conv2d(c2, d, 3, 2, 1),
        )  # fmt: skip
        self.image_pos = nn.Parameter(torch.zeros((config.image_size // 8) ** 2, d))
        self.embed = nn.Embedding(config.vocab_size, d)
        self.text_pos = nn.Parameter(torch.zeros(config.max_len, d))
        layer = nn.TransformerDecoderLayer(d, config.heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, config.layers)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, config.vocab_size)
        nn.init.normal_(self.image_pos, std=0.02)
        nn.init.normal_(self.text_pos, std=0.02)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] in [0, 1] -> memory [B, (S/8)^2, d]."""
        return self.encoder(pixels * 2 - 1).flatten(2).transpose(1, 2) + self.image_pos

    def forward(self, pixels: torch.Tensor, ids: torch.Tensor, memory: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits [B, T, V] of ids [B, T] given the images (or their `encode` memory)."""
        if ids.shape[1] > self.config.max_len:
            raise UserError(f"captioner: {ids.shape[1]} tokens is more than max_len={self.config.max_len}")
        memory = self.encode(pixels) if memory is None else memory
        x = self.embed(ids) + self.text_pos[: ids.shape[1]]
        causal = nn.Transformer.generate_square_subsequent_mask(ids.shape[1], device=ids.device)
        return self.head(self.norm(self.decoder(x, memory, tgt_mask=causal, tgt_is_causal=True)))

    @torch.inference_mode()
    def generate(self, pixels: torch.Tensor, prompts: list[list[int]], max_new: int = 16) -> list[list[int]]:
        """Greedy answers (ids without `<eos>`) to B prompts (`<bos> prompt` ids), one image each.

        Prompts of the same length are decoded together (no padding is needed: positions are absolute), one forward
        of the whole group per new token until every answer has its `<eos>` or `max_new` tokens.
        """
        eos, memory, out = self.vocab["<eos>"], self.encode(pixels), [[] for _ in prompts]
        for length in sorted({len(p) for p in prompts}):
            rows = [b for b, p in enumerate(prompts) if len(p) == length]
            ids = torch.tensor([prompts[b] for b in rows])
            done = torch.zeros(len(rows), dtype=torch.bool)
            for _ in range(min(max_new, self.config.max_len - length)):
                nxt = self(pixels[rows], ids, memory[rows])[:, -1].argmax(-1)
                done |= nxt == eos
                ids = torch.cat([ids, nxt[:, None]], 1)
                if done.all():
                    break
            for row, seq in zip(rows, ids[:, length:].tolist(), strict=True):
                out[row] = seq[: seq.index(eos)] if eos in seq else seq
        return out

    def to_dict(self) -> dict:
        """Config and vocabulary as JSON values (saved beside the weights)."""
        return {"config": asdict(self.config), "vocab": self.vocab}


def check_same_vocab(teacher: TinyCaptioner, student: TinyCaptioner) -> None:
    """Token-level KD compares distributions over the same ids: refuse a student with another tokenizer.

    Raises:
        UserError: the vocabularies differ (names the first differing token).
    """
    if teacher.vocab != student.vocab:
        diff = next(iter(sorted(set(teacher.vocab.items()) ^ set(student.vocab.items()))), None)
        raise UserError(
            f"captioning KD: the student's tokenizer is not the teacher's ({len(student.vocab)} vs "
            f"{len(teacher.vocab)} tokens, first difference {diff}); token-level KD needs the same tokenizer: build "
            "the student with the teacher's vocabulary (the cross-tokenizer path serves causal LMs only)"
        )
