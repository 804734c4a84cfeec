"""A distilled chat assistant end to end: a Debian help desk taught by SmolLM2-135M-Instruct, measured.

Every step is the user-facing CLI run as a subprocess (docs/chat.md explains each one); a step whose output exists
is skipped, so a rerun resumes:

1. prompts: questions about the Debian packages installed here (`/var/lib/dpkg/status`: name and description), a
   help desk of a real product; held-out packages are never trained on (split by a hash of the name).
2. teacher: `potstill generate` (mode complete, local backend, chat template, greedy) writes the answers; the
   training answers the token limit cut are left out (`--cut-answers drop`) or kept without an end-of-turn target
   (`mark`): no arm learns to stop where the teacher did not.
3. student: `potstill student init` prunes the teacher to `--layers` layers, vocabulary trimmed to the conversations.
4. train: `potstill distill` on the chat records (every `--val-every`-th left out as a validation split): a shared
   SFT first stage (`--start-steps`), then from its student the arms: KD (fkl, alpha 0.5, from a teacher cache built
   once by `potstill cache build`) and its SFT twin (CE on the teacher's answers), same steps, batch, lr and seed;
   `--seeds` seeds each (docs/chat.md, "Why KD lost", for why the first stage).
5. eval: every student answers the held-out questions (greedy, the chat template): ROUGE-L F1 to the teacher's answers
   (`rouge_score`) and the teacher-scored reverse KL: mean over the student's answer tokens of
   KL(q_student || p_teacher) over the student's vocabulary (the teacher renormalized over the kept ids).
6. serve: `potstill serve` the first seed's KD student, one held-out conversation streamed through the `openai` client.
7. export: `potstill export` to GGUF f16 / q8_0 (and ONNX int8); the same conversation answered by llama.cpp
   (`xllamacpp`), greedy, through the GGUF's own chat template.
8. bench: `potstill bench` on the teacher and every student format, side by side in one run.

Writes OUT/results.json and prints the tables, with the paired differences per seed (an arm minus its twin from
the same stage-1 student, `--pair`). Needs `potstill[generate,export,chat]`.
Run: `python benchmarks/chat_assistant.py --teacher DIR [--out runs/chat] [--start-steps 30] [--steps 30]
[--seeds 0 1 2] [--no-repeat-ngram 3] [--eval-split val --quality-only] [--arm NAME="OVERRIDES"]
[--pair ARM:TWIN] [--cut-answers drop|mark|sentence]`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from smollm2_rationales import Server, cli, read_jsonl, write_jsonl  # noqa: E402 - the shared CLI / server helpers

STATUS = Path("/var/lib/dpkg/status")
SYSTEM = "You are the help desk of a Debian system. Answer in two or three short sentences."
QUESTIONS = [
    "What is the Debian package {name} for?",
    "Do I need {name} on my system? Why would I install it?",
    "Explain in simple words what {name} does.",
    "A colleague told me to install {name}. What does it give me?",
]
DESCRIPTION_CHARS = 280  # of the long description: keeps prompts near 100 tokens


def dpkg_packages(path: Path = STATUS) -> list[dict[str, str]]:
    """(name, description) of each package paragraph of a dpkg status file; one per distinct short description."""
    seen, out = set(), []
    for para in path.read_text(errors="replace").split("\n\n"):
        fields, key = {}, None
        for line in para.splitlines():
            if line[:1] in (" ", "\t") and key:
                fields[key] += "\n" + line[1:]
            elif ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if "Package" in fields and "Description" in fields:
            short, _, long = fields["Description"].partition("\n")
            if short not in seen:
                seen.add(short)
                out.append({"name": fields["Package"], "short": short, "long": long})
    return out


def question(pkg: dict[str, str]) -> str:
    """The user's message: the package's description (the help desk's documentation) and one question about it."""
    digest = int(hashlib.sha1(pkg["name"].encode()).hexdigest(), 16)
    long = " ".join(line for line in pkg["long"].splitlines() if line.strip() != ".")
    long = " ".join(long.split())
    if len(long) > DESCRIPTION_CHARS:
        long = long[:DESCRIPTION_CHARS].rsplit(" ", 1)[0] + " ..."
    ask = QUESTIONS[digest % len(QUESTIONS)].format(name=pkg["name"])
    return f"Package: {pkg['name']}\nDescription: {pkg['short']}\n{long}\n\n{ask}"


def build_prompts(out: Path, n_train: int, n_heldout: int) -> tuple[Path, Path]:
    """OUT/data/{train,heldout}_prompts.jsonl: held-out = packages whose name hashes to 0 mod 8."""
    data = out / "data"
    train, held = data / "train_prompts.jsonl", data / "heldout_prompts.jsonl"
    if train.exists() and held.exists():
        return train, held
    data.mkdir(parents=True, exist_ok=True)
    pkgs = sorted(dpkg_packages(), key=lambda p: hashlib.sha1(p["name"].encode()).hexdigest())
    is_held = [int(hashlib.sha1(p["name"].encode()).hexdigest(), 16) % 8 == 0 for p in pkgs]
    rows = [{"prompt": question(p), "package": p["name"], "domain": "debian"} for p in pkgs]
    held_rows = [r for r, h in zip(rows, is_held, strict=True) if h][:n_heldout]
    train_rows = [r for r, h in zip(rows, is_held, strict=True) if not h][:n_train]
    write_jsonl(held, held_rows)
    write_jsonl(train, train_rows)
    return train, held


def decoding(max_tokens: int, no_repeat: int) -> dict:
    """The greedy decoding of the teacher's answers and of every student (`potstill generate`'s sampling fields)."""
    return {"temperature": 0.0, "max_tokens": max_tokens} | ({"no_repeat_ngram_size": no_repeat} if no_repeat else {})


def tag(params: dict) -> str:
    """File-name suffix of a decoding: "" for plain greedy, "_nr3" with no_repeat_ngram_size 3."""
    return f"_nr{params['no_repeat_ngram_size']}" if params.get("no_repeat_ngram_size") else ""


def teacher_answers(out: Path, teacher: Path, prompts: Path, params: dict) -> tuple[Path, float]:
    """`potstill generate` (complete, local, chat template, greedy `params`) on `prompts` ->
    OUT/data/NAME_teacher{tag}.jsonl."""
    name = prompts.stem.replace("_prompts", "") + tag(params)
    answers = out / "data" / f"{name}_teacher.jsonl"
    summary = answers.with_name(answers.name + ".summary.json")
    if summary.exists():
        return answers, json.loads(summary.read_text()).get("wall_s", 0.0)
    config = {
        "mode": "complete",
        "inputs": [str(prompts)],
        "output": str(answers),
        "teacher": {
            "backend": "local",
            "model": str(teacher),
            "chat": True,
            "system": SYSTEM,
            "batch_size": 16,
            "dtype": "bfloat16",
        },
        "sampling": params,
    }
    cfg = out / "data" / f"generate_{name}.yaml"
    cfg.write_text(yaml.safe_dump(config, sort_keys=False))
    _, wall = cli("generate", "-c", str(cfg), env={"OMP_NUM_THREADS": "1"})
    summary.write_text(json.dumps(json.loads(summary.read_text()) | {"wall_s": round(wall, 1)}, indent=2))
    return answers, wall


def whole_sentences(text: str) -> str:
    """An answer cut by max_tokens ends at its last complete sentence (a student should not learn to stop mid-word)."""
    text = text.strip()
    if re.search(r"[.!?)`]$", text):
        return text
    ends = [m.end() for m in re.finditer(r"[.!?](\s|$)", text)]
    return text[: ends[-1]].strip() if ends else text


def repetitive(text: str, min_distinct2: float = 0.6) -> bool:
    """Whether an answer loops ("a, and highly-secure, and highly-secure, ..."): few distinct word bigrams."""
    words = text.split()
    pairs = list(zip(words, words[1:], strict=False))
    return len(pairs) >= 8 and len(set(pairs)) / len(pairs) < min_distinct2


def chat_records(
    answers: Path, data: Path, val_every: int, count_tokens, max_tokens: int, cut: str = "drop"
) -> tuple[Path, Path, Path, dict[str, int]]:
    """Teacher answers -> chat records {"messages": [system, user, assistant]} (what `potstill distill` trains on):
    DATA/all_chat.jsonl, and its split into DATA/train_chat.jsonl and DATA/val_chat.jsonl (every `val_every`-th
    conversation: where each arm's settings are chosen, never the held-out packages). The answers that loop are left
    out. An answer the token limit cut (`count_tokens(completion)` reached `max_tokens`: the teacher did not end it)
    must not teach `<|im_end|>` where it stops, as the teacher itself puts little mass on it there (docs/chat.md,
    "Cut answers"): `cut="drop"` leaves it out, `cut="mark"` keeps it as written with `"cut": true` (no end-of-turn
    target after it, for every arm: `potstill.data.sources`); both keep each ended answer exactly as the teacher
    wrote it. `cut="sentence"` (the recipe before 2026-12-03 evening) cuts every answer back to its last whole
    sentence and trains `<|im_end|>` there. (all, train, val, counts).

    Args:
        count_tokens: text -> its number of teacher tokens (the teacher's tokenizer, no special tokens).
    """
    rows, counts = [], {"loops": 0, "cut": 0, "cut_dropped": 0}
    for r in read_jsonl(answers):
        ended = count_tokens(r["completion"]) < max_tokens
        counts["cut"] += not ended
        if not ended and cut == "drop":
            counts["cut_dropped"] += 1
            continue
        answer = whole_sentences(r["completion"]) if cut == "sentence" else r["completion"]
        if repetitive(answer):
            counts["loops"] += 1
            continue
        turns = [("system", SYSTEM), ("user", r["prompt"]), ("assistant", answer)]
        rows.append({"messages": [{"role": a, "content": b} for a, b in turns], "domain": "debian"})
        if not ended and cut == "mark":
            rows[-1]["cut"] = True
    val = [r for i, r in enumerate(rows) if i % val_every == val_every - 1]
    train = [r for i, r in enumerate(rows) if i % val_every != val_every - 1]
    paths = [write_jsonl(data / f"{name}_chat.jsonl", part) for name, part in (("all", rows), ("train", train),
                                                                               ("val", val))]  # fmt: skip
    return *paths, counts


def vocab_corpus(chats: Path, teacher: Path, out_path: Path) -> Path:
    """The conversations as the chat template renders them ({"text"} rows): the student's vocabulary and calibration
    text (so the template's own tokens, <|im_start|> and <|im_end|>, are kept)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(teacher)
    rows = [{"text": tok.apply_chat_template(r["messages"], tokenize=False)} for r in read_jsonl(chats)]
    return write_jsonl(out_path, rows)


def make_student(out: Path, teacher: Path, corpus: Path, layers: int) -> tuple[Path, float]:
    """`potstill student init`: `layers` layers chosen on the conversations (measured), vocabulary trimmed to them."""
    student = out / "student_init"
    if (student / "config.json").exists():
        return student, 0.0
    _, wall = cli("student", "init", "--teacher", str(teacher), "--layers", str(layers), "--corpus", str(corpus),
                  "--calib-dtype", "bfloat16", "--out", str(student), "calib_tokens=512",
                  env={"OMP_NUM_THREADS": "1"})  # fmt: skip
    return student, wall


START = "loss.alpha=0 train.lr=1e-3"  # the shared first stage: SFT on the teacher's answers (`--start-steps`)
ARMS = {  # the second stage, from the first one's student (`--arm NAME=OVERRIDES` adds others; docs/chat.md)
    "kd": "loss.name=fkl loss.alpha=0.5 train.lr=1e-3",
    "sft": "loss.alpha=0 train.lr=1e-3",
}


def teacher_cache(out: Path, teacher: Path, student: Path, chats: Path) -> Path:
    """`potstill cache build`: the teacher's top-64 targets over the training conversations, once for every KD run
    (a KD step then costs what an SFT step costs; top-64 of the 3,956-id vocabulary plus the tail's mass)."""
    cache = out / "cache"
    if not (cache / "manifest.json").exists():
        cli("cache", "build", "--teacher", str(teacher), "--student", str(student), "--data", str(chats),
            "--out", str(cache), "--k", "64", "--encoding", "lossless", "--seq-len", "256", "--dtype", "bfloat16",
            env={"OMP_NUM_THREADS": "1"})  # fmt: skip
    return cache


def train_args(arm: str, seed: int, student: Path, cache: Path, chats: Path, run: Path, steps: int) -> list[str]:
    """`potstill distill` overrides of one run: the shared ones, then the arm's (`arm` = its overrides); a KD arm
    (loss.alpha > 0) reads the teacher cache unless it names its own `teacher.source` (an on-policy arm: online)."""
    args = [
        f"model.student={student}",
        f"data.train=[{chats}]",
        "data.seq_len=256",
        f"train.output_dir={run}",
        f"train.max_steps={steps}",
        "train.batch_size=4",
        "train.warmup_steps=4",
        "train.mixed_precision=bf16",
        f"train.seed={seed}",
        "train.logging_steps=5",
        "train.save_steps=0",
        *arm.split(),
    ]
    own = "loss.alpha=0" in arm.split() or any(a.startswith("teacher.source=") for a in arm.split())
    return args if own else [*args, "teacher.source=cache", f"teacher.cache={cache}"]


def train_runs(out: Path, plan: dict[str, list[str]], parallel: int) -> dict[str, dict]:
    """Every run of `plan` ({run name: `potstill distill` overrides}) not done yet (OUT/runs/NAME), `parallel` at a
    time (each single-threaded); {run name: summary + wall_s}."""
    pending, results = [], {}
    for name, args in plan.items():
        run = out / "runs" / name
        if (run / "summary.json").exists():
            results[name] = json.loads((run / "summary.json").read_text())
        else:
            pending.append((run, args))
    running: list[tuple[Path, float, subprocess.Popen]] = []
    while pending or running:
        while pending and len(running) < parallel:
            run, args = pending.pop(0)
            run.parent.mkdir(parents=True, exist_ok=True)
            log = (run.parent / f"{run.name}.log").open("w")
            cmd = [sys.executable, "-m", "potstill.cli", "distill", *args, "--overwrite"]
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            running.append((run, time.time(), subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)))
        time.sleep(5)
        for item in [r for r in running if r[2].poll() is not None]:
            running.remove(item)
            run, start, proc = item
            if proc.returncode != 0:
                sys.exit(f"potstill distill failed for {run.name}; see {run.parent / (run.name + '.log')}")
            summary = json.loads((run / "summary.json").read_text()) | {"wall_s": round(time.time() - start, 1)}
            (run / "summary.json").write_text(json.dumps(summary, indent=2))
            results[run.name] = summary
    return results


# --- evaluation: agreement with the teacher on held-out questions ------------------------------------------------


def answer_ids(
    model, tok, prompts: list[str], params: dict, batch: int = 16
) -> tuple[list[list[int]], list[list[int]]]:
    """Greedy answers to each user prompt through the chat template: (prompt ids, answer ids up to and including the
    end-of-turn token when the model wrote one)."""
    import torch

    from potstill.teacher.generate import adds_bos, chat_prompt, generation_kwargs

    texts = [chat_prompt(tok, p, SYSTEM, "eval") for p in prompts]
    prompt_ids = [tok(t, add_special_tokens=adds_bos(texts, tok))["input_ids"] for t in texts]
    eos, pad = tok.eos_token_id, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    answers = []
    for start in range(0, len(texts), batch):
        ids = prompt_ids[start : start + batch]
        width = max(map(len, ids))
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=mask,
                                 **generation_kwargs(params, tok))  # fmt: skip
        for row in out[:, width:].tolist():
            answers.append(row[: row.index(eos) + 1] if eos in row else row)
    return prompt_ids, answers


class PromptCachedTeacher:
    """The teacher's logits at the positions that predict an answer, each prompt's KV cache computed once and reused
    for every student that answers it (the prompt is about 70% of the tokens the teacher reads; the same logits as
    one forward over prompt + answer, up to float rounding; tests/eval/test_chat_assistant_arms.py).

    Args:
        model: the teacher causal LM (eval mode).
    """

    def __init__(self, model):
        self.model, self.caches = model, {}

    def logits(self, teacher, prompt: list[int], answer: list[int]):
        """[len(answer), V_student] float32: the teacher's logits (over the student's ids, through `teacher`, an
        `OnlineTeacher` of this model with the student's id map) before each answer token, given the prompt."""
        import torch

        to_teacher = (lambda x: x) if teacher.id_map is None else (lambda x: teacher.id_map[torch.tensor(x)].tolist())
        prefix, rest = to_teacher(prompt[:-1]), to_teacher(prompt[-1:] + answer[:-1])
        key = tuple(prefix)
        with torch.no_grad():
            if key not in self.caches:
                self.caches[key] = self.model.base_model(input_ids=torch.tensor([prefix]), use_cache=True).cache
            cache = self.caches[key]
            hidden = self.model.base_model(input_ids=torch.tensor([rest]), cache=cache, use_cache=True)
            cache.crop(-len(rest))  # back to the prompt alone for the next student
            hidden = hidden.last_hidden_state[0]
            weight, bias, softcap = teacher.head()
            logits = torch.nn.functional.linear(hidden, weight, bias).float()
        return torch.tanh(logits / softcap) * softcap if softcap else logits


def reverse_kl(student, score, prompt_ids: list[list[int]], answers: list[list[int]]) -> list[float]:
    """Teacher-scored reverse KL of the student's own answers: per example, the sum over its answer tokens y_t of
    KL(q_student(.|y<t) || p_teacher(.|y<t)) over the student's vocabulary (0.0 for an empty answer).

    Args:
        student: the student causal LM.
        score: (prompt ids, answer ids) -> the teacher's [len(answer), V_student] logits before each answer token
            (`PromptCachedTeacher.logits` bound to an `OnlineTeacher` over the student's ids).
        prompt_ids, answers: per example, the prompt's and the answer's student token ids.
    """
    import torch

    from potstill.losses.divergences import rkl

    sums = []
    for p, a in zip(prompt_ids, answers, strict=True):
        if not a:
            sums.append(0.0)
            continue
        at = slice(len(p) - 1, len(p) + len(a) - 1)  # the positions that predict the answer's tokens
        with torch.no_grad():
            q = student(input_ids=torch.tensor([p + a])).logits[0, at].float()
        sums.append(float(rkl(q, score(p, a)).sum()))
    return sums


def evaluate_student(path: Path, teacher: PromptCachedTeacher, rows: list[dict], refs: list[str], params: dict) -> dict:
    """ROUGE-L F1 of the student's greedy answers to the teacher's, and the teacher-scored reverse KL per token."""
    from rouge_score import rouge_scorer

    from potstill.models.load import load_model
    from potstill.models.vocab import load_id_map
    from potstill.teacher.online import OnlineTeacher

    model, tok = load_model(path)
    start = time.time()
    prompt_ids, answers = answer_ids(model, tok, [r["prompt"] for r in rows], params)
    texts = [tok.decode(a, skip_special_tokens=True).strip() for a in answers]
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rouge = [scorer.score(ref, text)["rougeL"].fmeasure for ref, text in zip(refs, texts, strict=True)]
    online = OnlineTeacher(teacher.model, load_id_map(path))
    kl = reverse_kl(model, lambda p, a: teacher.logits(online, p, a), prompt_ids, answers)
    tokens = [len(a) for a in answers]
    return {
        "rougeL_f1": sum(rouge) / len(rouge),
        "reverse_kl_per_token": sum(kl) / sum(tokens),
        "answer_tokens_mean": sum(tokens) / len(answers),
        "ended_share": sum(bool(a) and a[-1] == tok.eos_token_id for a in answers) / len(answers),
        "eval_s": round(time.time() - start, 1),
        "answers": texts,
        "per_question": {"rougeL_f1": rouge, "reverse_kl_sum": kl, "answer_tokens": tokens},  # for `paired`
    }


def reference_lengths(completions: list[str], count_tokens, max_tokens: int) -> dict[str, float]:
    """The teacher's answers counted as a student's are: mean tokens (an ended answer's `<|im_end|>` included) and
    the share it ended itself (fewer than `max_tokens` tokens; `count_tokens` as in `chat_records`)."""
    counts = [count_tokens(c) for c in completions]
    ended = [n < max_tokens for n in counts]
    return {
        "answer_tokens_mean": sum(n + e for n, e in zip(counts, ended, strict=True)) / len(counts),
        "ended_share": sum(ended) / len(counts),
    }


def eval_rows(split: str, held_answers: Path, val_chats: Path, limit: int) -> tuple[list[dict], list[str]]:
    """The first `limit` questions of a split and the teacher's answers to them: "heldout" (other packages; the
    recipe's measure) or "val" (training-side conversations left out of training; where the arms are tuned)."""
    if split == "val":
        chats = read_jsonl(val_chats)[:limit]
        return [{"prompt": c["messages"][1]["content"]} for c in chats], [c["messages"][2]["content"] for c in chats]
    rows = read_jsonl(held_answers)[:limit]
    return rows, [whole_sentences(r["completion"]) for r in rows]


def evaluate_all(
    out: Path, teacher: Path, students: dict[str, Path], split: str, rows: list[dict], refs: list[str], params: dict
) -> dict:
    """`evaluate_student` of each student on the rows of `split` (cached: OUT/eval/SPLIT/NAME.json)."""
    from potstill.models.load import load_model

    teacher_model, results = None, {}
    for name, path in students.items():
        cached = out / "eval" / split / f"{name}.json"
        if not cached.exists():
            if teacher_model is None:
                teacher_model = PromptCachedTeacher(load_model(teacher, dtype="bfloat16")[0].eval())  # as in training
            cached.parent.mkdir(parents=True, exist_ok=True)
            cached.write_text(json.dumps(evaluate_student(path, teacher_model, rows, refs, params), indent=2))
        results[name] = json.loads(cached.read_text())
    return results


# --- serve, export, llama.cpp, bench ---------------------------------------------------------------------------


def served_conversation(out: Path, student: Path, user: str, max_tokens: int) -> dict:
    """`potstill serve STUDENT`, one conversation streamed through the official `openai` client (greedy)."""
    from openai import OpenAI

    with Server(student, out / "serve.log", threads=1, name="student") as server:
        client = OpenAI(base_url=server.url, api_key="unused")
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
        start, first, chunks = time.time(), None, []
        stream = client.chat.completions.create(model="student", messages=messages, max_tokens=max_tokens,
                                                temperature=0, stream=True)  # fmt: skip
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                first = first if first is not None else time.time() - start
                chunks.append(chunk.choices[0].delta.content)
        whole = client.chat.completions.create(model="student", messages=messages, max_tokens=max_tokens,
                                               temperature=0)  # fmt: skip
    return {
        "user": user,
        "streamed": "".join(chunks),
        "chunks": len(chunks),
        "first_chunk_s": round(first or 0.0, 3),
        "stream_s": round(time.time() - start, 1),
        "not_streamed_equal": whole.choices[0].message.content == "".join(chunks),
    }


def export_files(out: Path, student: Path) -> dict[str, dict]:
    """`potstill export` GGUF f16 / q8_0 and ONNX int8, each checked by the command itself; a file the check
    refuses is recorded with its message and then written with `--max-error 10` (marked `forced`)."""
    files = {}
    for fmt, quant, name in (("gguf", "f16", "student-f16.gguf"), ("gguf", "q8_0", "student-q8_0.gguf"),
                             ("onnx", "int8", "student-int8.onnx")):  # fmt: skip
        path, record = out / "export" / name, out / "export" / f"{name}.json"
        if not record.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            args = ["export", str(student), "--format", fmt, "--quant", quant, "--out", str(path), "--overwrite"]
            start = time.time()
            proc = subprocess.run([sys.executable, "-m", "potstill.cli", *args], capture_output=True, text=True,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
            info = {"refused": None, "forced": False}
            if proc.returncode != 0:
                info["refused"] = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else str(proc.returncode)
                cli(*args, "--max-error", "10", env={"OMP_NUM_THREADS": "1"})
                info["forced"] = True
                report = {}
            else:
                report = json.loads(proc.stdout)
            record.write_text(json.dumps(info | {"report": report, "wall_s": round(time.time() - start, 1)}, indent=2))
        files[name] = json.loads(record.read_text()) | {"path": str(path)}
    return files


def llamacpp_conversation(gguf: Path, user: str, max_tokens: int) -> str:
    """The same conversation answered by llama.cpp (`xllamacpp`) from the GGUF alone (its chat template), greedy."""
    from potstill.export.runtime import LlamaCppModel

    model = LlamaCppModel(gguf, n_ctx=1024)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
    result = model.server.handle_chat_completions({"messages": messages, "max_tokens": max_tokens, "temperature": 0})
    return result["choices"][0]["message"]["content"]


def bench(out: Path, models: list[Path]) -> list[dict]:
    """`potstill bench` on every model, side by side in one run (a chat-sized prompt: 128 tokens, 64 generated)."""
    path = out / "bench.json"
    if not path.exists():
        cli("bench", *map(str, models), "--prompt-tokens", "128", "--new-tokens", "64", "--runs", "3",
            "--out", str(path), env={"OMP_NUM_THREADS": "1"})  # fmt: skip
    return json.loads(path.read_text())


def targets(rows: list[dict], teacher: Path) -> dict:
    """The issue's speed / size target: the q8_0 student in llama.cpp vs the teacher's faster HF row."""
    by = {(Path(r["model"]).name, r["dtype"]): r for r in rows}
    teacher_hf = max((r for r in rows if r["model"] == str(teacher)), key=lambda r: r["gen_tok_s"])
    q8 = by[("student-q8_0.gguf", None)]
    return {
        "teacher_hf_best": f"{teacher_hf['dtype']}: {teacher_hf['gen_tok_s']:.1f} tok/s",
        "speed_ratio": q8["gen_tok_s"] / teacher_hf["gen_tok_s"],
        "size_ratio": q8["bytes"] / teacher_hf["bytes"],
        "met": q8["gen_tok_s"] >= 3 * teacher_hf["gen_tok_s"] and q8["bytes"] <= 0.3 * teacher_hf["bytes"],
    }


def quality_table(evals: dict[str, dict], runs: dict[str, dict]) -> str:
    """One row per student; train s = its own run's wall time (+ its seed's first stage, when there is one)."""
    lines = ["| student | ROUGE-L F1 to teacher | reverse KL / token (teacher-scored) | answer tokens | ended |"
             " train s |", "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, e in evals.items():
        start = runs.get("start_" + name.rsplit("_", 1)[-1], {}).get("wall_s")
        wall = runs.get(name, {}).get("wall_s", "")
        wall = f"{start} + {wall}" if start is not None else wall
        lines.append(f"| {name} | {e['rougeL_f1']:.4f} | {e['reverse_kl_per_token']:.4f} | "
                     f"{e['answer_tokens_mean']:.1f} | {e['ended_share']:.2f} | {wall} |")  # fmt: skip
    return "\n".join(lines) + "\n"


METRICS = {"rougeL_f1": 1, "reverse_kl_per_token": -1}  # the direction in which an arm beats its twin


def question_se(a: dict, b: dict, resamples: int = 2000) -> dict[str, float]:
    """Bootstrap standard error, over the questions, of one seed's paired difference a - b (both students answered
    the same questions): the evaluation's own noise, beside the seed-to-seed spread. `a`, `b`: `per_question`."""
    import numpy as np

    rng = np.random.default_rng(0)
    n = len(a["rougeL_f1"])
    idx = rng.integers(0, n, size=(resamples, n))  # the same resampled questions for both students

    def kl(e):  # token-weighted like reverse_kl_per_token: [resamples]
        return np.asarray(e["reverse_kl_sum"])[idx].sum(1) / np.maximum(np.asarray(e["answer_tokens"])[idx].sum(1), 1)

    rouge = np.asarray(a["rougeL_f1"])[idx].mean(1) - np.asarray(b["rougeL_f1"])[idx].mean(1)
    return {"rougeL_f1": float(rouge.std()), "reverse_kl_per_token": float((kl(a) - kl(b)).std())}


def paired(evals: dict[str, dict], seeds: list[int], arm: str, twin: str) -> dict:
    """`arm` minus `twin` per seed, both trained from that seed's own stage-1 student: for each metric the
    differences, their mean, sd and 95% t-interval over the seeds, the seeds the arm wins, and the mean over seeds
    of the question-bootstrap standard error (where per-question scores were stored). `met`: on both metrics the
    interval lies wholly on the arm's side of 0 (ROUGE-L higher, reverse KL lower)."""
    import statistics

    from scipy.stats import t

    out: dict = {"arm": arm, "twin": twin, "seeds": seeds}
    for key, sign in METRICS.items():
        diffs = [evals[f"{arm}_s{s}"][key] - evals[f"{twin}_s{s}"][key] for s in seeds]
        mean = statistics.mean(diffs)
        sd = statistics.stdev(diffs) if len(diffs) > 1 else float("nan")
        half = float(t.ppf(0.975, len(diffs) - 1)) * sd / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
        both = [(evals[f"{arm}_s{s}"], evals[f"{twin}_s{s}"]) for s in seeds]
        ses = [question_se(a["per_question"], b["per_question"])[key] for a, b in both
               if "per_question" in a and "per_question" in b]  # fmt: skip
        out[key] = {
            "diffs": diffs,
            "mean": mean,
            "sd": sd,
            "ci95": [mean - half, mean + half],
            "won": sum(sign * d > 0 for d in diffs),
            "question_se": statistics.mean(ses) if ses else None,
            "beyond_seed_noise": bool(sign * (mean - sign * half) > 0),  # NaN (one seed) compares False
        }
    out["met"] = all(out[key]["beyond_seed_noise"] for key in METRICS)
    out["means_favour_arm"] = all(sign * out[key]["mean"] > 0 for key, sign in METRICS.items())
    return out


def paired_table(pairs: list[dict]) -> str:
    """One row per (pair, metric): the per-seed differences arm - twin and what they add up to."""
    lines = ["| arm - twin | metric | per seed | mean | sd | 95% interval | seeds won | question SE |",
             "|---|---|---|---:|---:|---|---:|---:|"]  # fmt: skip
    for p in pairs:
        for key in METRICS:
            m = p[key]
            se = "" if m["question_se"] is None else f"{m['question_se']:.4f}"
            lines.append(f"| {p['arm']} - {p['twin']} | {key} | {' / '.join(f'{d:+.4f}' for d in m['diffs'])} | "
                         f"{m['mean']:+.4f} | {m['sd']:.4f} | [{m['ci95'][0]:+.4f}, {m['ci95'][1]:+.4f}] | "
                         f"{m['won']}/{len(m['diffs'])} | {se} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", type=Path, required=True, help="SmolLM2-135M-Instruct HF directory")
    ap.add_argument("--teacher-gguf", type=Path, default=None, help="the teacher's GGUF too, for the bench table")
    ap.add_argument("--out", type=Path, default=Path("runs/chat"))
    ap.add_argument("--train", type=int, default=192, help="training questions the teacher answers")
    ap.add_argument("--heldout", type=int, default=48, help="held-out questions (other packages)")
    ap.add_argument("--max-tokens", type=int, default=64, help="answer length (teacher and students)")
    ap.add_argument(
        "--no-repeat-ngram",
        type=int,
        default=0,
        help="evaluation decoding (the teacher's held-out answers and every student): no repeated n-gram"
        " of the answer's own tokens (0: plain greedy); the training answers stay plain greedy",
    )
    ap.add_argument(
        "--cut-answers",
        choices=["drop", "mark", "sentence"],
        default="drop",
        help="training answers the token limit cut: drop (train on the answers the teacher ended), mark (trained"
        " on as written, no end-of-turn target after them) or sentence (cut back to the last whole sentence,"
        " <|im_end|> trained there: the recipe before 2026-12-03 evening)",
    )
    ap.add_argument("--layers", type=int, default=6, help="decoder layers of the student (the teacher has 30)")
    ap.add_argument(
        "--start-steps",
        type=int,
        default=30,
        help="steps of the shared SFT first stage (0: the arms start from the pruned student)",
    )
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps per arm after the first stage (batch 4)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--eval-rows", type=int, default=48, help="questions of the split the students are measured on")
    ap.add_argument(
        "--eval-split",
        choices=["heldout", "val"],
        default="heldout",
        help="heldout: the held-out packages (the recipe's measure); val: the validation conversations",
    )
    ap.add_argument("--val-every", type=int, default=8, help="every N-th conversation is validation, not training")
    ap.add_argument(
        "--arm",
        action="append",
        default=[],
        metavar="NAME=OVERRIDES",
        help='an arm: distill overrides (e.g. kd_fkl="loss.name=fkl loss.alpha=0.5 train.lr=1e-3");'
        " replaces the default arm of that name, else is added",
    )
    ap.add_argument(
        "--pair",
        action="append",
        default=None,
        metavar="ARM:TWIN",
        help="report ARM minus TWIN per seed (both from the seed's stage-1 student; default kd:sft), repeatable",
    )
    ap.add_argument("--quality-only", action="store_true", help="stop after the quality table (a sweep on val)")
    ap.add_argument("--parallel", type=int, default=1, help="training runs at once (each on one thread)")
    args = ap.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"args": {k: str(v) for k, v in vars(args).items()}}

    train_prompts, held_prompts = build_prompts(out, args.train, args.heldout)
    greedy, params = decoding(args.max_tokens, 0), decoding(args.max_tokens, args.no_repeat_ngram)
    held_answers, results["teacher_heldout_s"] = teacher_answers(out, args.teacher, held_prompts, params)
    train_answers, results["teacher_train_s"] = teacher_answers(out, args.teacher, train_prompts, greedy)
    from transformers import AutoTokenizer

    teacher_tok = AutoTokenizer.from_pretrained(args.teacher)

    def count_tokens(text: str) -> int:  # the teacher's tokens of an answer (it wrote them; they round-trip)
        return len(teacher_tok(text, add_special_tokens=False)["input_ids"])

    chats, train_chats, val_chats, results["training_answers"] = chat_records(
        train_answers, out / "data", args.val_every, count_tokens, args.max_tokens, args.cut_answers
    )
    corpus = vocab_corpus(chats, args.teacher, out / "data" / "corpus.jsonl")
    student, results["student_init_s"] = make_student(out, args.teacher, corpus, args.layers)
    results["student"] = json.loads((student / "potstill_student.json").read_text())
    print(f"student: {results['student']['params']:,} params, vocab {results['student']['vocab_size']}", flush=True)

    arms = ARMS | dict(a.split("=", 1) for a in args.arm)
    args.pair = args.pair or ["kd:sft"]
    for pair in args.pair:
        if pair.count(":") != 1 or not set(pair.split(":")) <= set(arms):
            ap.error(f"--pair {pair!r}: expected ARM:TWIN with both arms among {sorted(arms)}")
    cache = teacher_cache(out, args.teacher, student, train_chats)
    runs, starts = {}, {s: student for s in args.seeds}
    if args.start_steps:  # the first stage, shared by the arms of a seed
        plan = {f"start_s{s}": train_args(START, s, student, cache, train_chats, out / "runs" / f"start_s{s}",
                                          args.start_steps) for s in args.seeds}  # fmt: skip
        runs = train_runs(out, plan, args.parallel)
        starts = {s: out / "runs" / f"start_s{s}" / "student" for s in args.seeds}
    plan = {f"{name}_s{s}": train_args(arm, s, starts[s], cache, train_chats, out / "runs" / f"{name}_s{s}", args.steps)
            for s in args.seeds for name, arm in arms.items()}  # fmt: skip
    runs |= train_runs(out, plan, args.parallel)
    results["start"], results["arms"], results["runs"] = START if args.start_steps else None, arms, runs
    students = {name: out / "runs" / name / "student" for name in plan}
    rows, refs = eval_rows(args.eval_split, held_answers, val_chats, args.eval_rows)
    evals = evaluate_all(out, args.teacher, students, args.eval_split + tag(params), rows, refs, params)
    results["eval"] = evals
    print(quality_table(evals, runs), flush=True)
    if args.eval_split == "heldout":  # the teacher's own length and stop on the same questions, for comparison
        results["teacher_reference"] = reference_lengths([r["completion"] for r in rows], count_tokens, args.max_tokens)
        print(f"teacher (the references): {json.dumps(results['teacher_reference'])}", flush=True)
    for arm in arms:
        for key in ("rougeL_f1", "reverse_kl_per_token"):
            values = [evals[f"{arm}_s{s}"][key] for s in args.seeds]
            results.setdefault("means", {})[f"{arm}.{key}"] = {"mean": sum(values) / len(values),
                                                               "spread": max(values) - min(values)}  # fmt: skip
    means = results["means"]
    results["paired"] = [paired(evals, args.seeds, *pair.split(":")) for pair in args.pair]
    print(paired_table(results["paired"]), flush=True)
    print(json.dumps({"means": means, "met": {f"{p['arm']}:{p['twin']}": p["met"] for p in results["paired"]}},
                     indent=2), flush=True)  # fmt: skip
    if args.quality_only:
        (out / f"results_{args.eval_split}{tag(params)}.json").write_text(json.dumps(results, indent=2))
        return

    chosen = out / "runs" / f"kd_s{args.seeds[0]}" / "student"
    user = read_jsonl(held_prompts)[0]["prompt"]
    results["serve"] = served_conversation(out, chosen, user, args.max_tokens)
    files = export_files(out, chosen)
    results["export"] = files
    results["llamacpp"] = {q: llamacpp_conversation(Path(files[q]["path"]), user, args.max_tokens)
                           for q in ("student-f16.gguf", "student-q8_0.gguf")}  # fmt: skip
    print(json.dumps({"serve": results["serve"], "llamacpp": results["llamacpp"]}, indent=2), flush=True)

    models = [args.teacher, *([args.teacher_gguf] if args.teacher_gguf else []), chosen]
    models += [Path(files[n]["path"]) for n in ("student-f16.gguf", "student-q8_0.gguf", "student-int8.onnx")]
    rows = bench(out, models)
    results["bench"], results["targets"] = rows, targets(rows, args.teacher)
    from potstill.eval.bench import bench_table

    print(bench_table(rows), json.dumps(results["targets"], indent=2), flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
