"""A speech corpus with exact transcripts, synthesized offline from the standard library's docstrings.

Sentences (4 to 14 plain words: no digits, acronyms, CamelCase or code) come from stdlib docstrings
(`corpus.iter_documents`). Each is assigned to "train" or "heldout" by a hash of its text
(`corpus.split_score`), so no held-out sentence is ever heard in training, by any voice. Each clip draws
(seeded) a voice, from espeak-ng (three accents, four voice variants, random rate) or flite (its four
built-in voices), sox augmentations (tempo, pitch, 0.4 s of silence around) and white noise at 20-40 dB
SNR. Clips are 16 kHz mono wav; the JSONL records say `{"audio", "text", "domain": "synthetic"}`.
`real_recordings` lists Debian's pocketsphinx-testdata recordings with their transcripts (domain "real").
"""

from __future__ import annotations

import random
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from potstill.data.audio import AudioRecord, load_audio, write_audio_jsonl
from potstill.data.corpus import iter_documents, split_score
from potstill.errors import UserError

# espeak-ng accents and variants the teacher understands at all (Scottish, Caribbean and klatt: mostly not).
ESPEAK_VOICES = ("en-us", "en-gb", "en-gb-x-rp")
ESPEAK_VARIANTS = ("", "+m3", "+f3", "+m7")
FLITE_VOICES = ("kal", "awb", "rms", "slt")
POCKETSPHINX_DATA = Path("/usr/share/pocketsphinx/test/data")
_WORDS = re.compile(r"^[A-Z][a-z']*( [A-Za-z][a-z'\-]*,?)*[a-z][.?!]$")  # plain words, a full sentence
_BAD_WORDS = re.compile(r"\b(e\.g|i\.e|etc|def|self|args|kwargs|str|int|dict|len|None|True|False)\b")


def sentences(limit: int = 4000) -> Iterator[str]:
    """Plain-English sentences of 4..14 words from stdlib docstrings, deduplicated, in a fixed order."""
    seen: set[str] = set()
    for doc in iter_documents():
        if doc.domain != "docstrings":
            continue
        for paragraph in doc.text.split("\n\n"):
            for sentence in re.split(r"(?<=[.?!])\s+", " ".join(paragraph.split())):
                words = sentence.split()
                if not 4 <= len(words) <= 14 or not _WORDS.match(sentence) or _BAD_WORDS.search(sentence):
                    continue
                if sentence.lower() not in seen:
                    seen.add(sentence.lower())
                    yield sentence
                    if len(seen) >= limit:
                        return


def _voice(rng: random.Random) -> tuple[str, str]:
    """Half flite, half espeak-ng (its voices are harder for Whisper: the WER filter drops more of them)."""
    if rng.random() < 0.5:
        return "flite", rng.choice(FLITE_VOICES)
    return "espeak-ng", rng.choice(ESPEAK_VOICES) + rng.choice(ESPEAK_VARIANTS)


def _synthesize(engine: str, voice: str, text: str, raw: Path, rng: random.Random) -> None:
    if engine == "espeak-ng":
        cmd = ["espeak-ng", "-v", voice, "-s", str(rng.randint(125, 160)), "-g", "2", "-w", str(raw), text]
    else:
        cmd = ["flite", "-voice", voice, "-t", text, "-o", str(raw)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)


def _augment(raw: Path, out: Path, rng: random.Random) -> str:
    """sox: resample to 16 kHz mono, random tempo and pitch, 0.4 s of silence around; returns the effects."""
    tempo, cents = round(rng.uniform(0.9, 1.1), 3), rng.choice([0, 0, -100, 100])
    effects = ["tempo", str(tempo)] + (["pitch", str(cents)] if cents else []) + ["pad", "0.4", "0.4"]
    cmd = ["sox", str(raw), "-r", "16000", "-c", "1", "-b", "16", str(out), *effects]
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)
    return f"tempo {tempo} pitch {cents}"


def _add_noise(path: Path, rng: random.Random) -> None:
    import soundfile

    clip = load_audio(path)
    snr_db = rng.uniform(20, 40)
    power = float(np.mean(clip**2)) or 1e-8
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0, np.sqrt(power / 10 ** (snr_db / 10)), clip.shape)
    soundfile.write(str(path), np.clip(clip + noise, -1, 1).astype(np.float32), 16_000, subtype="PCM_16")


def choose_sentences(n_train: int, n_heldout: int, seed: int = 0, heldout_frac: float = 0.25) -> dict[str, list[str]]:
    """The first sentences of each split; a sentence's split is decided by a hash of its lower-cased text."""
    want = {"train": n_train, "heldout": n_heldout}
    chosen: dict[str, list[str]] = {"train": [], "heldout": []}
    for text in sentences():
        split = "heldout" if split_score(seed, text.lower()) < heldout_frac else "train"
        if len(chosen[split]) < want[split]:
            chosen[split].append(text)
        if all(len(chosen[s]) >= want[s] for s in want):
            break
    return chosen


def check_tools() -> None:
    """Raise a one-line error when a synthesis tool is missing."""
    missing = [tool for tool in ("espeak-ng", "flite", "sox") if shutil.which(tool) is None]
    if missing:
        raise UserError(f"speech corpus: missing {', '.join(missing)} (apt-get install -y espeak-ng flite sox)")


def synthesize_corpus(
    out_dir: str | Path, n_train: int, n_heldout: int, seed: int = 0, heldout_frac: float = 0.25
) -> dict[str, Path]:
    """Write `train.jsonl` and `heldout.jsonl` (+ their wavs under `audio/`) into out_dir.

    A clip already written (same name) is kept, so an interrupted run resumes.

    Returns:
        {"train": path, "heldout": path}.
    """
    from tqdm.auto import tqdm

    check_tools()
    out_dir = Path(out_dir)
    (out_dir / "audio").mkdir(parents=True, exist_ok=True)
    chosen = choose_sentences(n_train, n_heldout, seed, heldout_frac)
    paths = {}
    with tqdm(total=n_train + n_heldout, desc="synthesize") as bar:
        for split, texts in chosen.items():
            records = []
            for i, text in enumerate(texts):
                rng = random.Random(f"{seed}:{split}:{i}")
                wav = out_dir / "audio" / f"{split}-{i:05d}.wav"
                if not wav.exists():
                    engine, voice = _voice(rng)
                    raw = wav.with_suffix(".raw.wav")
                    _synthesize(engine, voice, text, raw, rng)
                    _augment(raw, raw.with_suffix(".16k.wav"), rng)
                    _add_noise(raw.with_suffix(".16k.wav"), rng)
                    raw.with_suffix(".16k.wav").replace(wav)
                    raw.unlink()
                records.append(AudioRecord(str(wav.resolve()), text, "synthetic"))
                bar.update()
            paths[split] = out_dir / f"{split}.jsonl"
            write_audio_jsonl(paths[split], records)
    return paths


def real_recordings(root: Path = POCKETSPHINX_DATA) -> list[AudioRecord]:
    """Debian pocketsphinx-testdata recordings (LibriVox reading, card names) with their transcripts.

    Raises:
        UserError: the package is not installed.
    """
    records = []
    for sub, transcription in (("librivox", "transcription"), ("cards", "cards.transcription")):
        path = root / sub / transcription
        if not path.is_file():
            raise UserError(f"{path}: missing (apt-get install -y pocketsphinx-testdata)")
        for line in path.read_text().splitlines():
            match = re.match(r"\s*<s>(.*)</s>\s*\((.+)\)", line)
            if match:
                records.append(AudioRecord(str(root / sub / f"{match[2]}.wav"), match[1].strip(), "real"))
    return records
