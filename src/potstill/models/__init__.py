"""The models layer: opening models (HF directories, GGUF files), the student's id map, and head checks.

Below `teacher/` and `student/`, above `data/`: `load.py` opens an HF directory or a GGUF file (converted once,
cached), `vocab.py` reads the id map a trimmed student carries (`potstill_vocab.json`), `heads.py` says whether
a model's logits are a plain linear head that the fused loss can reproduce chunk by chunk.
"""
