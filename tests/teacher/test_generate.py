"""potstill generate: templates, label parsing/filtering, resume, cache, local backend, bad input."""

from __future__ import annotations

import json
import os
import re
import signal

import pytest

from fake_openai import FakeServer
from potstill.config import GenerateConfig, validate_config
from potstill.data.sources import read_jsonl
from potstill.errors import Stopped, UserError
from potstill.teacher.generate import (
    check_fields,
    load_template,
    parse_label,
    parse_template,
    read_rows,
    run_generate,
    same_label,
)

ROWS = [
    {"input": "What is 2 + 3?", "label": "5"},
    {"input": "What is 4 * 4?", "label": "16"},
    {"input": "What is 9 - 7?", "label": "2"},
    {"input": "What is 1 + 1?", "label": "2"},
    {"input": "What is 6 / 2?"},
]


def arithmetic_teacher(prompt: str) -> str:
    """Answers the last question of a few-shot prompt; wrong on 4*4, no final answer on 9-7."""
    question = re.findall(r"Q: What is (.+)\?", prompt)[-1]
    if "9 - 7" in question:
        return " I am not sure."
    value = 17 if "4 * 4" in question else int(eval(question))  # noqa: S307 - test-only arithmetic
    return f" We compute {question} = {value}. The answer is {value}."


def config(tmp_path, url: str, **kw) -> GenerateConfig:
    raw = {
        "mode": "rationale",
        "inputs": [str(tmp_path / "rows.jsonl")],
        "output": str(tmp_path / "out.jsonl"),
        "teacher": {"backend": "endpoint", "model": "fake", "base_url": url, "api_key_env": None, "backoff": 0.01},
    }
    for key, value in kw.items():
        section, _, field = key.rpartition("__")
        (raw.setdefault(section, {}) if section else raw)[field] = value
    return validate_config(raw, GenerateConfig)


@pytest.fixture
def rows_file(write_jsonl, tmp_path, monkeypatch):
    monkeypatch.setenv("POTSTILL_CACHE", str(tmp_path / "cache"))
    return write_jsonl("rows.jsonl", ROWS)


def records(path) -> list[dict]:
    """Output records without their time stamps."""
    out = [json.loads(line) for line in path.read_text().splitlines()]
    for r in out:
        r["provenance"].pop("time")
    return out


def test_template_fields_lines_and_literal_braces():
    t = parse_template("Q: {question}\n{{literal}} {answer}\nagain {question}", "t.txt")
    assert t.fields == {"question": 1, "answer": 2}
    assert t.render({"question": "why", "answer": 42}, "rows:1") == "Q: why\n{literal} 42\nagain why"


@pytest.mark.parametrize(
    ("text", "needle"), [("a\n{x.y}", "t.txt:2: bad placeholder {x.y}"), ("a {b", "t.txt:1: lone '{'"), ("{}", "bad")]
)
def test_template_syntax_errors(text, needle):
    with pytest.raises(UserError, match=re.escape(needle)):
        parse_template(text, "t.txt")


def test_unknown_placeholder_and_missing_field(rows_file):
    rows = read_rows([str(rows_file)])
    with pytest.raises(
        UserError, match=r"t.txt:2: unknown placeholder \{questoin\}; the input rows have: input, label"
    ):
        check_fields(parse_template("x\n{questoin}", "t.txt"), rows)
    with pytest.raises(UserError, match=r'rows.jsonl:5: missing field "label" that t.txt uses'):
        check_fields(parse_template("{input} {label}", "t.txt"), rows)


def test_builtin_templates_parse():
    assert set(load_template(None, "rationale").fields) == {"input"}
    assert set(load_template(None, "explain").fields) == {"input", "label"}
    assert set(load_template(None, "complete").fields) == {"prompt"}


def test_parse_label_takes_the_last_answer():
    pattern = GenerateConfig.model_fields["label_regex"].default
    text = "First the answer is 3? No.\nRedo: 2 + 2 = 4.\nThe answer is 4."
    assert parse_label(text, pattern) == ("First the answer is 3? No.\nRedo: 2 + 2 = 4.", "4")
    assert parse_label("no conclusion here", pattern) is None
    # two answers on one line (seen from SmolLM2): the later one, not "8. The answer is 22"
    assert parse_label("17 + 5 = 8. The answer is 8. The answer is 22.", pattern) == (
        "17 + 5 = 8. The answer is 8.",
        "22",
    )
    assert same_label("4.0", "4") and same_label(" Paris. ", "paris") and not same_label("5", "4")


def test_rationale_mode_filters_and_counts(rows_file, tmp_path):
    with FakeServer(arithmetic_teacher) as server:
        out = run_generate(config(tmp_path, server.base_url))
    kept = records(out)
    assert [(r["input"], r["label"]) for r in kept] == [
        ("What is 2 + 3?", "5"),
        ("What is 1 + 1?", "2"),
        ("What is 6 / 2?", "3"),
    ]
    assert kept[0]["rationale"] == "We compute 2 + 3 = 5." and kept[0]["source"].endswith("rows.jsonl:1")
    prov = kept[0]["provenance"]
    assert prov["teacher"] == f"fake@{server.base_url}" and prov["template"].startswith("builtin:rationale.txt#")
    assert prov["params"]["temperature"] == 0.0 and prov["mode"] == "rationale"
    dropped = records(out.with_name("out.jsonl.dropped.jsonl"))
    assert {(r["source"].rsplit(":", 1)[1], r["reason"]) for r in dropped} == {
        ("2", "label_mismatch"),
        ("3", "no_label"),
    }
    summary = json.loads(out.with_name("out.jsonl.summary.json").read_text())
    assert summary["written"] == 3 and summary["dropped"] == {"label_mismatch": 1, "no_label": 1}
    assert summary["teacher"]["requests"] == 5


def test_rerun_hits_the_cache_and_resumes_nothing(rows_file, tmp_path):
    with FakeServer(arithmetic_teacher) as server:
        run_generate(config(tmp_path, server.base_url))
        first = records(tmp_path / "out.jsonl")
        out = run_generate(config(tmp_path, server.base_url, overwrite=True))
        assert server.hits == len(ROWS)  # the second run was served from the disk cache
    summary = json.loads(out.with_name("out.jsonl.summary.json").read_text())
    assert summary["teacher"]["cache_hits"] == len(ROWS) and summary["teacher"]["requests"] == 0
    assert records(out) == first


def test_resume_after_a_kill_gives_the_same_records(rows_file, tmp_path):
    with FakeServer(arithmetic_teacher) as server:
        whole = records(run_generate(config(tmp_path, server.base_url, output=str(tmp_path / "whole.jsonl"))))
    # The endpoint dies after three answers; what was written stays, plus a torn line from a kill mid-write.
    with FakeServer(arithmetic_teacher, script=["ok"] * 3 + ["500"] * 50) as server:
        cfg = config(tmp_path, server.base_url, teacher__max_retries=1, teacher__cache=False, teacher__concurrency=1)
        with pytest.raises(UserError, match="HTTP 500 after 2 attempts"):
            run_generate(cfg)
    out = tmp_path / "out.jsonl"
    assert len(records(out)) == 1
    with open(out, "a") as fh:
        fh.write('{"input": "torn')
    with FakeServer(arithmetic_teacher) as server:
        run_generate(config(tmp_path, server.base_url, teacher__cache=False))
        assert server.hits == 2  # only rows 4 and 5 were asked again
    strip = lambda recs: [r | {"provenance": {**r["provenance"], "teacher": None}} for r in recs]  # noqa: E731
    assert strip(records(out)) == strip(whole)  # the servers' ports differ, nothing else


def test_complete_mode_with_a_local_model(tiny_model_dir, write_jsonl, tmp_path):
    rows = write_jsonl("prompts.jsonl", [{"prompt": "def add(a, b):", "domain": "code"}, {"prompt": "The quick"}])
    cfg = validate_config(
        {
            "inputs": [str(rows)],
            "output": str(tmp_path / "seqkd.jsonl"),
            "teacher": {"model": str(tiny_model_dir), "batch_size": 2},
            "sampling": {"max_tokens": 5, "n": 2},
        },
        GenerateConfig,
    )
    out = run_generate(cfg)
    recs = read_jsonl(out)  # directly usable as prompt/completion training data
    assert [r.prompt for r in recs] == ["def add(a, b):"] * 2 + ["The quick"] * 2
    assert recs[0].domain == "code" and recs[0].completion == recs[1].completion  # greedy: n identical samples
    assert all(r.completion for r in recs)


@pytest.mark.parametrize("prompt", ["def add(a, b):", "The quick"])
def test_stop_strings_end_generation_early_with_the_same_text(tiny_model, tiny_tokenizer, prompt):
    """A stop string taken from the full greedy answer: the text up to it, with fewer tokens generated."""
    from potstill.teacher.generate import hf_generate

    params = {"temperature": 0.0, "max_tokens": 24}
    full, _, n_full, full_cut = hf_generate(tiny_model, tiny_tokenizer, [prompt], params)
    stop = re.search("[a-z]{2}", full[0][0]).group(0)  # ASCII: whole tokens, unlike the random model's odd bytes
    cut, _, n_cut, cut_cut = hf_generate(tiny_model, tiny_tokenizer, [prompt], params | {"stop": [stop]})
    assert cut[0][0] == full[0][0][: full[0][0].index(stop)]
    assert n_cut < n_full
    assert full_cut == [[n_full == 24]]  # cut where max_tokens ended it (not an <eos>)
    assert cut_cut == [[False]]  # the stop string ended it


def test_an_end_token_ends_a_text_uncut_and_generate_marks_the_cut_ones(tiny_model_dir, write_jsonl, tmp_path):
    """`hf_generate` flags the texts `max_tokens` ended; `potstill generate` writes `"cut": true` on those records
    only (they score no end token in training), and counts them in the summary."""
    from potstill.models.load import load_model
    from potstill.teacher.generate import hf_generate

    model, tok = load_model(tiny_model_dir)
    params = {"temperature": 0.0, "max_tokens": 6, "n": 2}
    prompts = ["def add(a, b):", "The quick"]
    texts, _, _, cuts = hf_generate(model, tok, prompts, params)
    assert cuts == [[True, True], [True, True]]  # (the random model's greedy answers never pick <eos> here)
    first = tok(texts[1][0], add_special_tokens=False)["input_ids"][2]  # make "The quick"'s 3rd new token an end
    model.generation_config.eos_token_id = [tok.eos_token_id, first]
    texts2, _, _, cuts2 = hf_generate(model, tok, prompts, params)
    assert cuts2 == [[True, True], [False, False]] and texts2[0] == texts[0]
    assert texts[1][0].startswith(texts2[1][0]) and len(texts2[1][0]) < len(texts[1][0])

    model.save_pretrained(tmp_path / "ends")
    tok.save_pretrained(tmp_path / "ends")
    rows = write_jsonl("p.jsonl", [{"prompt": p} for p in prompts])
    raw = {"inputs": [str(rows)], "output": str(tmp_path / "o.jsonl"), "mode": "complete"}
    raw |= {"teacher": {"model": str(tmp_path / "ends")}, "sampling": {"max_tokens": 6, "n": 2}}
    out = run_generate(validate_config(raw, GenerateConfig))
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r.get("cut", False) for r in records] == [True, True, False, False]
    assert json.loads(out.with_name("o.jsonl.summary.json").read_text())["cut"] == 2


def test_chat_on_a_model_without_chat_template(tiny_model_dir, rows_file, tmp_path):
    cfg = validate_config(
        {
            "inputs": [str(rows_file)],
            "template": None,
            "mode": "rationale",
            "teacher": {"model": str(tiny_model_dir), "chat": True},
        },
        GenerateConfig,
    )
    with pytest.raises(UserError, match="no chat template"):
        run_generate(cfg)


def test_cli_bad_template_is_one_line_and_writes_nothing(rows_file, tmp_path, run_cli, assert_one_line_error):
    template = tmp_path / "t.txt"
    template.write_text("Q: {input}\nA: {answr}\n")
    proc = run_cli(
        "generate", f"inputs={rows_file}", f"template={template}", f"output={tmp_path / 'o.jsonl'}", "teacher.model=x"
    )
    assert_one_line_error(proc, "t.txt:2: unknown placeholder {answr}")
    assert not (tmp_path / "o.jsonl").exists()


def test_cli_missing_api_key(rows_file, tmp_path, run_cli, assert_one_line_error):
    proc = run_cli(
        "generate",
        f"inputs={rows_file}",
        "mode=rationale",
        "teacher.backend=endpoint",
        "teacher.model=m",
        "teacher.base_url=http://127.0.0.1:9/v1",
        "teacher.api_key_env=POTSTILL_NO_SUCH_KEY",
        cwd=tmp_path,
    )
    assert_one_line_error(proc, "POTSTILL_NO_SUCH_KEY is not set")


def test_local_backend_runs_in_the_configured_dtype(tiny_model_dir, write_jsonl, tmp_path, monkeypatch):
    from potstill.teacher import generate as generate_module

    seen = []
    real = generate_module.hf_generate
    monkeypatch.setattr(generate_module, "hf_generate", lambda model, *a: seen.append(model.dtype) or real(model, *a))
    rows = write_jsonl("prompts.jsonl", [{"prompt": "def add(a, b):"}])
    cfg = {"inputs": [str(rows)], "output": str(tmp_path / "o.jsonl"), "sampling": {"max_tokens": 3},
           "teacher": {"model": str(tiny_model_dir), "dtype": "bfloat16"}}  # fmt: skip
    out = run_generate(validate_config(cfg, GenerateConfig))
    import torch

    assert seen == [torch.bfloat16]
    assert json.loads(out.read_text().splitlines()[0])["provenance"]["params"]["dtype"] == "bfloat16"


def test_no_repeat_ngram_bans_repeats_of_the_new_tokens_only():
    """Prompt [5, 6, 7] then new tokens [1, 2, 3, 1]: with n = 2 token 2 is banned (1 2 is an n-gram of the answer),
    not 6 (5 6 is the prompt's, which an answer may quote); with n = 3 nothing is (no new 3-gram starts 3 1)."""
    import torch

    from potstill.teacher.generate import NoRepeatNewNgram

    for n, banned in ((2, {2}), (3, set()), (1, {1, 2, 3})):
        processor = NoRepeatNewNgram(n)
        processor(torch.tensor([[5, 6, 7]]), torch.zeros(1, 10))  # the first call sees the prompt only
        scores = processor(torch.tensor([[5, 6, 7, 1, 2, 3, 1]]), torch.zeros(1, 10))
        assert {i for i in range(10) if scores[0, i] == float("-inf")} == banned


def test_no_repeat_ngram_in_generation(tiny_model, tiny_tokenizer):
    """The random tiny model loops at greedy; with no_repeat_ngram_size 2 no token bigram of an answer repeats, and
    the answer is plain greedy's up to plain greedy's first repeated bigram."""
    from potstill.teacher.generate import generation_kwargs

    def answer(prompt, **extra):
        ids = tiny_tokenizer(prompt, return_tensors="pt")
        out = tiny_model.generate(**ids, **generation_kwargs({"temperature": 0.0, "max_tokens": 40} | extra,
                                                             tiny_tokenizer))  # fmt: skip
        return out[0, ids["input_ids"].shape[1] :].tolist()

    looped = 0
    for prompt in ("The quick", "def add(a, b):"):
        plain, fixed = answer(prompt), answer(prompt, no_repeat_ngram_size=2)
        pairs = list(zip(fixed, fixed[1:], strict=False))
        assert len(set(pairs)) == len(pairs)
        seen = [
            (plain[i - 1], plain[i]) in set(zip(plain[: i - 1], plain[1:i], strict=True)) for i in range(1, len(plain))
        ]
        first = seen.index(True) + 1 if True in seen else len(plain)
        looped += first < len(plain)
        assert fixed[:first] == plain[:first]
    assert looped, "the test needs a model that loops at greedy"


def test_no_repeat_ngram_is_refused_for_an_endpoint(rows_file):
    cfg = validate_config(
        {
            "inputs": [str(rows_file)],
            "mode": "rationale",
            "teacher": {"backend": "endpoint", "model": "m", "base_url": "http://127.0.0.1:9/v1"},
            "sampling": {"no_repeat_ngram_size": 3},
        },
        GenerateConfig,
    )
    with pytest.raises(UserError, match="sampling.no_repeat_ngram_size: local backend only"):
        run_generate(cfg)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_after_the_row_then_the_rerun_resumes(rows_file, tmp_path, signum):
    """Signalled while row 2 is asked for: the rows answered are written whole (the endpoint client asks one row
    ahead), the run raises Stopped (exit 128 + signum) naming the last row written and the rerun, writes no
    summary; the rerun asks only the rows left and ends with the records of an uninterrupted run, none twice."""
    with FakeServer(arithmetic_teacher) as server:
        whole = records(run_generate(config(tmp_path, server.base_url, output=str(tmp_path / "whole.jsonl"))))

    def signal_on_row_2(prompt: str) -> str:
        if "4 * 4" in prompt.rsplit("Q:", 1)[-1]:
            assert signal.getsignal(signum) is not signal.SIG_DFL, "no handler: the signal would kill pytest"
            os.kill(os.getpid(), signum)
        return arithmetic_teacher(prompt)

    before = signal.getsignal(signum)
    cfg = config(tmp_path, server.base_url, teacher__cache=False, teacher__concurrency=1)
    with FakeServer(signal_on_row_2) as server, pytest.raises(Stopped) as stopped:
        run_generate(cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={"base_url": server.base_url})}))
    assert signal.getsignal(signum) is before and stopped.value.status == 128 + signum
    message = str(stopped.value)
    found = re.search(rf"stopped by {signal.Signals(signum).name} after input row .*rows.jsonl:(\d) \(\1 of 5", message)
    assert found and "rerun the same command" in message, message
    written = int(found[1])
    out = tmp_path / "out.jsonl"
    assert not out.with_name("out.jsonl.summary.json").exists()
    files = [path for path in (out, tmp_path / "out.jsonl.dropped.jsonl") if path.exists()]
    sources = [r["source"] for path in files for r in records(path)]
    assert sorted(int(s.rsplit(":", 1)[1]) for s in sources) == list(range(1, written + 1))
    with FakeServer(arithmetic_teacher) as server:
        run_generate(config(tmp_path, server.base_url, teacher__cache=False))
        assert server.hits == 5 - written  # the rows left only
    strip = lambda recs: [r | {"provenance": {**r["provenance"], "teacher": None}} for r in recs]  # noqa: E731
    assert strip(records(out)) == strip(whole)
