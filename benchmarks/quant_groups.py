"""Which weights a k-bit GGUF should keep at q8_0: the round trip simulated in PyTorch, one tensor group at a time.

Each 2-D weight is quantized and dequantized by the `gguf` library's numpy quantizers (what transformers computes
from a GGUF file), the model runs the check's probe text, and the relative logit error and top-1 agreement against
the float32 model are printed for: every weight at `--quant`, then each group kept at q8_0 (the embedding, each
projection, all attention, all MLP). No file is written, so a 262k-vocabulary model takes seconds per row instead of
the 30+ minutes its export spends parsing the vocabulary back. Figures: docs/export.md ("4-bit files").

Run: `python benchmarks/quant_groups.py MODEL_DIR --quant q4_0`
"""

from __future__ import annotations

import argparse

import torch

from potstill.export.check import probe_ids, relative_logit_error, source_logits

ATTENTION, MLP = ["q_proj", "k_proj", "v_proj", "o_proj"], ["gate_proj", "up_proj", "down_proj"]
GROUPS = {"embed_tokens": ["embed_tokens"], **{g: [g] for g in ATTENTION + MLP}, "attention": ATTENTION, "mlp": MLP}


def main() -> None:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--quant", default="q4_0", choices=["q4_0", "q4_1", "q5_0", "q5_1"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    ids = probe_ids(AutoTokenizer.from_pretrained(args.model))
    want = source_logits(model, ids)
    # a tied head shares the embedding's storage, so loading the embedding sets both
    weights = {k: v.clone() for k, v in model.state_dict().items() if v.ndim == 2 and k != "lm_head.weight"}
    cache: dict = {}

    def round_trip(name: str, qtype) -> torch.Tensor:
        if (name, qtype) not in cache:
            data = weights[name].numpy()
            cache[name, qtype] = torch.from_numpy(dequantize(quantize(data, qtype), qtype).reshape(data.shape))
        return cache[name, qtype]

    low, high = GGMLQuantizationType[args.quant.upper()], GGMLQuantizationType.Q8_0
    for label, kept in [("none", []), *GROUPS.items()]:
        state = {k: round_trip(k, high if any(g in k for g in kept) else low) for k in weights}
        model.load_state_dict(state, strict=False)
        got = source_logits(model, ids)
        agree = float((got.argmax(-1) == want.argmax(-1)).mean())
        print(f"{args.quant}, {label} at q8_0: relative logit error {relative_logit_error(got, want):.3f}, "
              f"top-1 agreement {agree:.3f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
