"""Training: `DistillTrainer` (online KD on transformers.Trainer) and `run_distill` behind `potstill distill`."""
