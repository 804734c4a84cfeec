"""potstill: knowledge distillation of language models (teacher -> smaller, faster student)."""

__version__ = "0.1.0"
