"""benchmarks/ddk_table.py: the shared runs.json (several processes, one OUT) and the data-once check."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
ddk_table = pytest.importorskip("ddk_table")


def test_update_runs_keeps_what_another_process_wrote(tmp_path):
    runs_file = tmp_path / "runs.json"
    ddk_table.update_runs(runs_file, "kd seed 1", {"run": "a", "seconds": 1.0, "eval": None})
    # another process adds its own run after this one read the file
    other = json.loads(runs_file.read_text()) | {"ce seed 2": {"run": "b", "seconds": 2.0}}
    runs_file.write_text(json.dumps(other))
    runs = ddk_table.update_runs(runs_file, "kd seed 1", {"eval": {"overall": {"bpb": 1.5}}})
    assert runs == json.loads(runs_file.read_text())
    assert runs["ce seed 2"] == {"run": "b", "seconds": 2.0}
    assert runs["kd seed 1"] == {"run": "a", "seconds": 1.0, "eval": {"overall": {"bpb": 1.5}}}


def test_pick_best_uses_only_scored_runs():
    def run(bpb):
        return {"run": "r", "seconds": 1.0, "eval": None if bpb is None else {"overall": {"bpb": bpb}}}

    runs = {"kd_hidden seed 1": run(2.0), "kd_ted seed 1": run(2.2), "minillm seed 1": run(1.9)}
    runs["kd_hidden seed 2"] = run(None)  # trained, not scored yet: left out of the mean
    assert ddk_table.pick_best(runs) == {"best": "minillm", "combined_with": "kd_hidden"}


def test_data_built_with_other_options_is_refused(tmp_path):
    (tmp_path / "table_data.json").write_text(json.dumps({"train_bytes": 800_000, "eval_tokens": 2048}))
    ddk_table.build_data(tmp_path, 800_000, 2048)  # same options: reused, nothing rebuilt
    assert not (tmp_path / "train.jsonl").exists()
    with pytest.raises(SystemExit, match="train_bytes"):
        ddk_table.build_data(tmp_path, 150_000, 2048)


def test_first_of_each_domain():
    assert ddk_table.first_of_each(["a", "a", "b", "a", "b", "c"], 2) == [0, 1, 2, 4, 5]
