"""`cache build` stopped by SIGTERM / SIGINT: the shard being written is finished, the build raises Stopped (one
line, exit 128 + signal), and the rerun writes the rest: the same shards as a build that was never stopped."""

from __future__ import annotations

import os
import signal

import pytest

import potstill.teacher.cache.writer as writer
from potstill.errors import Stopped
from potstill.teacher.cache import MANIFEST, build_cache, shard_name

SEQ_LEN = 32


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_after_the_shard_then_the_rerun_resumes(tiny_model_dir, write_jsonl, tiny_corpus, tmp_path,
                                                              monkeypatch, signum):  # fmt: skip
    data = write_jsonl("train.jsonl", [{"text": t} for t in tiny_corpus * 3])
    opts = {"seq_len": SEQ_LEN, "batch_size": 4, "shard_tokens": 4 * SEQ_LEN, "progress": False}
    reference = build_cache(tiny_model_dir, [data], tmp_path / "once", **opts)
    n_shards = len(list(reference.glob("shard-*.bin")))
    assert n_shards > 3
    real, written = writer._write_shard, []

    def signal_during_shard_1(plan, scorer, j, batch_size, bar):
        if j == 1:
            assert signal.getsignal(signum) is not signal.SIG_DFL, "no handler: the signal would kill pytest"
            os.kill(os.getpid(), signum)  # arrives while shard 1 is being computed
        real(plan, scorer, j, batch_size, bar)
        written.append(j)

    monkeypatch.setattr(writer, "_write_shard", signal_during_shard_1)
    out = tmp_path / "stopped"
    before = signal.getsignal(signum)
    with pytest.raises(Stopped) as stopped:
        build_cache(tiny_model_dir, [data], out, **opts)
    assert signal.getsignal(signum) is before and stopped.value.status == 128 + signum
    message = str(stopped.value)
    assert f"stopped by {signal.Signals(signum).name} after {shard_name(1)}" in message, message
    assert "rerun the same command" in message and written == [0, 1] and not (out / MANIFEST).exists()

    build_cache(tiny_model_dir, [data], out, **opts)
    assert written == list(range(n_shards))  # shards 0 and 1 are not redone
    for j in range(n_shards):
        assert (out / shard_name(j)).read_bytes() == (reference / shard_name(j)).read_bytes()
    assert (out / MANIFEST).is_file()
