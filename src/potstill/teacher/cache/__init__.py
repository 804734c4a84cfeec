"""The offline teacher cache: run the teacher once over packed data, store sparse targets on disk, read them back.

Layout of a cache directory (see docs/cache.md for the measured sizes):

- ``build.json``: the settings and fingerprints of the build, written first (a rerun with other settings is refused).
- ``shard-00000.bin``, ...: each holds a contiguous range of packed sequences; written to a temporary name, then
  renamed, so a shard that exists is complete. A rerun skips existing shards (resume).
- ``manifest.json``: written last (= the cache is complete): build.json + token counts + sha256 and size per shard.

A shard is ``MAGIC | uint64 n | uint64 offsets[n + 1] | n zstd frames``: one frame per sequence, so a reader
decodes only the sequences a batch asks for. A sequence stores the targets of its *scored* positions only:
position t (whose logits predict token t + 1) is stored when ``labels[t + 1] != -100``, as a bit mask over the
L positions; the reader fills the other positions with harmless placeholders (uniform over ids 0..k-1), which
`shifted_targets` never selects.

Per stored position, by `targets` and `encoding`:

- topk / "lossless": int32 ids [k] and float32 log-probs [k] (most probable first), float32 tail; bit-exact.
- topk / "compact": the top-1 id (exact) and its float32 log-prob; the other k - 1 ids sorted ascending and
  delta-coded (byte planes); their log-probs as uint8 steps below the top-1 with a float16 step per position
  (step = range / 255); float16 tail. Top-1 is never lost; the reader re-sorts by probability.
- sampled (Anshumann et al. 2025): `samples` draws from the teacher distribution at the temperature; the unique
  ids (delta-coded) and their counts (uint8), exact whatever `encoding`. The reader returns logprobs =
  log(count / samples), tail 0, padded to width `samples` with unused ids of log-mass -1e4 (probability 0).
Modules: `format.py` (names, fingerprints), `codec.py` (records <-> bytes), `writer.py` (`build_cache`),
`reader.py` (`TeacherCache`, verify, info).
"""

from potstill.teacher.cache.codec import Codec
from potstill.teacher.cache.format import (
    BUILD,
    ENCODINGS,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    TARGETS,
    dataset_fingerprint,
    shard_name,
    teacher_fingerprint,
    tokenizer_fingerprint,
)
from potstill.teacher.cache.reader import TeacherCache, info_text, verify_report
from potstill.teacher.cache.writer import build_cache, finalize, write_shards

__all__ = [
    "BUILD",
    "ENCODINGS",
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "TARGETS",
    "Codec",
    "TeacherCache",
    "build_cache",
    "dataset_fingerprint",
    "finalize",
    "info_text",
    "shard_name",
    "teacher_fingerprint",
    "tokenizer_fingerprint",
    "verify_report",
    "write_shards",
]
