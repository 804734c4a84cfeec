"""Write an HF causal LM as ONNX (`torch.onnx.export`, dynamo), float32 or int8 (onnxruntime dynamic quantization).

The graph is `input_ids [1, seq] int64 -> logits [1, seq, vocab] float32` without a KV cache: each generated token
re-reads the whole sequence (see docs/export.md; exporting transformers' cache objects through the dynamo exporter
was left for later). The sequence axis is dynamic, the batch axis is 1.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from potstill.errors import UserError

ONNX_QUANTS = ("f32", "int8")
OPSET = 18


class _Logits(torch.nn.Module):
    """input_ids [1, seq] -> logits [1, seq, vocab], no cache (the exported signature)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def write_onnx(model, out: Path, quant: str, example_ids: torch.Tensor) -> dict:
    """Export `model` to `out` (not atomic: the caller renames); int8 quantizes the float32 graph's weights.

    Args:
        model: float32 HF causal LM in eval mode.
        out: file to write; its directory also receives the temporary float32 graph for int8.
        quant: "f32" or "int8".
        example_ids: [1, seq] int64 ids to trace with.

    Returns:
        {"opset": OPSET, "kv_cache": False}.
    """
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise UserError('ONNX export needs onnx and onnxscript: pip install "potstill[export]"') from None
    target = out if quant == "f32" else out.with_name(out.name + ".f32")
    seq = torch.export.Dim("seq", min=2, max=model.config.max_position_embeddings)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                _Logits(model).eval(),
                (example_ids,),
                input_names=["input_ids"],
                output_names=["logits"],
                dynamic_shapes={"input_ids": {1: seq}},
                opset_version=OPSET,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
        program.save(str(target), external_data=False)
        if quant == "int8":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantize_dynamic(str(target), str(out), weight_type=QuantType.QInt8)
    finally:
        if target != out:
            target.unlink(missing_ok=True)
    return {"opset": OPSET, "kv_cache": False}
