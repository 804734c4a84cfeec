"""Corpora: read JSONL records (`sources`) and pack them into scored fixed-length sequences (`packing`)."""

from potstill.data.packing import IGNORE_INDEX, PackedDataset, collate, load_dataset, pack
from potstill.data.sources import Record, read_jsonl, read_many

__all__ = ["IGNORE_INDEX", "PackedDataset", "Record", "collate", "load_dataset", "pack", "read_jsonl", "read_many"]
