"""`potstill eval` end to end: eval.json as documented, and each bad input as one line on stderr, nothing written."""

import json

import pytest

METRICS = ["tokens", "bytes", "ppl", "bpb"]
TEACHER_METRICS = [*METRICS, "top1_agreement", "kl_to_teacher"]


@pytest.fixture
def data(write_jsonl):
    rows = [{"text": "The quick brown fox jumps.", "domain": "prose"}, {"text": "def f(x):\n    return x\n"}]
    rows += [{"prompt": "Q: café?", "completion": " A: crème brûlée.", "domain": "prose"}]
    return write_jsonl("data.jsonl", rows)


def test_eval_writes_documented_json(run_main, tmp_path, make_model_dir, data):
    model, teacher = make_model_dir("student", seed=0), make_model_dir("teacher", seed=1)
    out = tmp_path / "run"
    proc = run_main("eval", "--model", model, "--data", data, "--out", out, "--teacher", teacher, "--seq-len", 16)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "eval.json").read_text())
    assert list(result) == ["model", "teacher", "overall", "domains"]
    assert (result["model"], result["teacher"]) == (str(model), str(teacher))
    assert list(result["domains"]) == ["prose", "default"]
    for metrics in [result["overall"], *result["domains"].values()]:
        assert list(metrics) == TEACHER_METRICS and metrics["ppl"] > 1 and 0 <= metrics["top1_agreement"] <= 1
    assert result["overall"]["bytes"] == sum(
        len(s.encode()) for s in ["The quick brown fox jumps.", "def f(x):\n    return x\n", " A: crème brûlée."]
    )
    assert result["overall"]["tokens"] == sum(d["tokens"] for d in result["domains"].values())
    assert [p.name for p in out.iterdir()] == ["eval.json"]  # no temp file left behind


def test_student_with_an_id_map(run_main, tmp_path, make_model_dir, tiny_tokenizer, data):
    """An identity id map (a 'trimmed' student keeping every id) must give the same numbers as none."""
    student, teacher = make_model_dir("student", seed=0), make_model_dir("teacher", seed=1)
    results = []
    for name in ("plain", "mapped"):
        if name == "mapped":
            ids = list(range(len(tiny_tokenizer)))
            (student / "potstill_vocab.json").write_text(
                json.dumps({"teacher_vocab_size": len(ids), "teacher_ids": ids})
            )
        args = ["eval", "--model", student, "--data", data, "--out", tmp_path / name, "--teacher", teacher]
        assert run_main(*args).returncode == 0
        results.append(json.loads((tmp_path / name / "eval.json").read_text())["overall"])
    assert results[0] == pytest.approx(results[1], rel=1e-5)


def test_eval_without_teacher(run_main, tmp_path, tiny_model_dir, data):
    out = tmp_path / "run"
    proc = run_main("eval", "--model", tiny_model_dir, "--data", data, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"wrote {out / 'eval.json'}"
    result = json.loads((out / "eval.json").read_text())
    assert result["teacher"] is None and list(result["overall"]) == METRICS


@pytest.mark.parametrize(
    ("rows", "needle"),
    [
        ([{"text": "ok"}, "{oops"], "data.jsonl:2: not valid JSON"),
        ([{"txt": "typo"}], 'data.jsonl:1: missing field "text"'),
        ([], "data.jsonl: no records"),
    ],
    ids=["malformed", "missing-text", "empty"],
)
def test_bad_data(run_main, assert_one_line_error, tmp_path, tiny_model_dir, write_jsonl, rows, needle):
    path = write_jsonl("data.jsonl", rows)
    proc = run_main("eval", "--model", tiny_model_dir, "--data", path, "--out", tmp_path / "run")
    assert_one_line_error(proc, needle)
    assert not (tmp_path / "run" / "eval.json").exists()


def test_model_missing_or_not_a_model(run_main, assert_one_line_error, tmp_path, data):
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    for model, needle in [("nope", "does not exist"), ("empty", "not a model directory"), ("broken", "cannot load")]:
        proc = run_main("eval", "--model", tmp_path / model, "--data", data, "--out", tmp_path / "run")
        assert_one_line_error(proc, str(tmp_path / model), needle)
    assert not (tmp_path / "run").exists()


def test_teacher_of_another_vocabulary(run_main, tmp_path, make_model_dir, make_tokenizer, data):
    """Another vocabulary is no longer refused: KL / agreement on the positions aligned one to one."""
    student = make_model_dir("student")
    teacher = make_model_dir("teacher", tokenizer=make_tokenizer(vocab_size=280))
    proc = run_main("eval", "--model", student, "--data", data, "--out", tmp_path / "run", "--teacher", teacher)
    assert proc.returncode == 0, proc.stderr
    overall = json.loads((tmp_path / "run" / "eval.json").read_text())["overall"]
    assert 0 < overall["aligned_share"] <= 1 and overall["kl_to_teacher"] >= 0


def test_existing_output_needs_overwrite(run_main, assert_one_line_error, tmp_path, tiny_model_dir, data):
    out = tmp_path / "run"
    out.mkdir()
    (out / "eval.json").write_text("previous")
    args = ["eval", "--model", tiny_model_dir, "--data", data, "--out", out]
    assert_one_line_error(run_main(*args), "eval.json: already exists", "--overwrite")
    assert (out / "eval.json").read_text() == "previous"
    assert run_main(*args, "--overwrite").returncode == 0
    assert json.loads((out / "eval.json").read_text())["overall"]["tokens"] > 0


def test_out_is_a_file(run_main, assert_one_line_error, tmp_path, tiny_model_dir, data):
    (tmp_path / "file").write_text("x")
    proc = run_main("eval", "--model", tiny_model_dir, "--data", data, "--out", tmp_path / "file")
    assert_one_line_error(proc, "not a directory")
