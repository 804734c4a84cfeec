"""`potstill bench`: one table of size, peak memory and tokens/s for an HF directory, a GGUF and an ONNX file."""

from __future__ import annotations

import pytest

from potstill.eval.bench import bench_model, bench_prompt, bench_table, bench_targets, disk_bytes, model_kind
from potstill.export import export_model
from potstill.export.runtime import llamacpp_available


def test_targets_kinds_and_sizes(tiny_model_dir, tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"x" * 10)
    assert bench_targets([tiny_model_dir, gguf], ["float32", "bfloat16"]) == [
        (tiny_model_dir, "hf", "float32"), (tiny_model_dir, "hf", "bfloat16"), (gguf, "gguf", None)
    ]  # fmt: skip
    weights = sum(p.stat().st_size for p in tiny_model_dir.glob("*.safetensors"))
    assert disk_bytes(tiny_model_dir) == weights > 0 and disk_bytes(gguf) == 10
    assert bench_prompt(300)[:2] == [4, 41] and max(bench_prompt(300)) < 260


@pytest.mark.parametrize(("name", "needle"), [("nothing.gguf", "no such model"), ("m.txt", "expected an HF model")])
def test_bad_targets(tmp_path, name, needle, run_main, assert_one_line_error):
    (tmp_path / "m.txt").write_text("x")
    assert_one_line_error(run_main("bench", tmp_path / name), needle)


def test_bad_dtype(tiny_model_dir, run_main, assert_one_line_error):
    assert_one_line_error(run_main("bench", tiny_model_dir, "--dtype", "int3"), "--dtype", "float32")


@pytest.mark.slow
def test_bench_hf_and_gguf_rows(tiny_model_dir, tmp_path):
    """Each model timed in its own process (about 10 s each on 2 cores: torch imports), hence slow."""
    rows = [bench_model(tiny_model_dir, "hf", "float32", prompt_tokens=16, new_tokens=4, runs=1)]
    if llamacpp_available():
        gguf = tmp_path / "m.gguf"
        export_model(tiny_model_dir, "gguf", gguf, quant="q8_0")
        rows.append(bench_model(gguf, model_kind(gguf), None, prompt_tokens=16, new_tokens=4, runs=1))
    for row in rows:
        assert row["prompt_tok_s"] > 0 and row["gen_tok_s"] > 0 and row["peak_rss_mb"] > 50 and row["bytes"] > 0
    table = bench_table(rows).splitlines()
    assert len(table) == 2 + len(rows) and "HF float32" in table[2]
