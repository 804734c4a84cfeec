"""Student from a teacher: measured layer pruning, vocabulary trimming with an id map, exact weight copy, errors."""

from __future__ import annotations

import json

import pytest
import torch

from gemma_tokenizer import gemma_like_tokenizer
from potstill.errors import UserError
from potstill.models.vocab import ID_MAP_FILE, load_id_map
from potstill.student.init import STUDENT_FILE, init_student, init_student_cli
from potstill.student.layers import build_student, evenly_spaced, layer_scores
from potstill.student.vocab import tokenization_mismatch, vocabulary_to_keep

MORE_TEXTS = [
    "class Teacher:\n    def forward(self, x):\n        return self.head(self.body(x))\n",
    "The student keeps the layers that matter most for the calibration loss.",
]
UNSEEN = ["Völlig neue Wörter: Quokka, zymurgy, 🦜🍣 and 漢字かな交じり文, tabs\tand\r\nnewlines", "x=∑∫√∞ ±1 €5"]


@pytest.fixture(scope="module")
def texts(tiny_corpus) -> list[str]:
    """The tiny tokenizer's texts and MORE_TEXTS three times: the teachers' tokenizers and calibration data."""
    return tiny_corpus + MORE_TEXTS * 3


@pytest.fixture(scope="module")
def gemma_teacher(tmp_path_factory, build_model, texts):
    """A Gemma 3 text model (hidden 32, 4 layers: 3 sliding + 1 full attention, 2 heads, 1 kv head, tied) over
    the Gemma-like tokenizer."""
    tok = gemma_like_tokenizer(texts)
    path = tmp_path_factory.mktemp("teacher") / "gemma"
    layer_types = ["sliding_attention"] * 3 + ["full_attention"]
    build_model(tok, 0, arch="gemma3", layers=4, kv_heads=1, max_positions=256, head_dim=16, layer_types=layer_types,
                sliding_window=8, save_to=path)  # fmt: skip
    return path


@pytest.fixture(scope="module")
def llama_teacher(tmp_path_factory, build_model, make_tokenizer, texts):
    """A Llama (hidden 32, 3 layers, untied head) over a byte-level BPE of 350 tokens."""
    tok = make_tokenizer(vocab_size=350, texts=texts)  # byte-level BPE, untied head
    path = tmp_path_factory.mktemp("teacher") / "llama"
    build_model(tok, 1, layers=3, max_positions=256, save_to=path)
    return path


def load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_pruned_student_loads_generates_and_records_scores(gemma_teacher, tmp_path, texts):
    out = init_student(gemma_teacher, 2, tmp_path / "student", texts, calib_tokens=256, calib_seq_len=32)
    teacher, _ = load(gemma_teacher)
    student, tok = load(out)
    info = json.loads((out / STUDENT_FILE).read_text())
    kept, scores = info["kept_layers"], info["layer_scores"]
    assert len(scores) == 4 and kept == sorted(sorted(range(4), key=lambda i: -scores[i])[:2])
    assert student.config.num_hidden_layers == 2
    assert student.config.layer_types == [teacher.config.layer_types[i] for i in kept]
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1]
    assert student.get_output_embeddings().weight.data_ptr() == student.get_input_embeddings().weight.data_ptr()
    enc = tok("def add(a, b):", return_tensors="pt")
    assert enc["input_ids"][0, 0].item() == tok.bos_token_id
    gen = student.generate(**enc, max_new_tokens=5, do_sample=False)  # KV cache: needs renumbered layer_idx
    assert gen.shape[1] == enc["input_ids"].shape[1] + 5


def test_layer_scores_equal_loss_of_the_model_without_that_layer(gemma_teacher, texts):
    """The in-place skip (only_layers) scores layer i exactly as a model rebuilt without layer i would."""
    teacher, tok = load(gemma_teacher)
    ids = tok(texts[0] + texts[3], return_tensors="pt")["input_ids"]
    scores, base = layer_scores(teacher, [ids], keep_ids=None)

    def ce(model) -> float:
        logits = model(input_ids=ids).logits[:, :-1].double()
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[0, 1:]).item()

    with torch.no_grad():
        assert base == pytest.approx(ce(teacher), abs=1e-5)
        for skip in range(4):
            pruned = build_student(teacher, [i for i in range(4) if i != skip], None)
            assert base + scores[skip] == pytest.approx(ce(pruned), abs=1e-5)


@pytest.mark.parametrize("teacher_name", ["gemma_teacher", "llama_teacher"])
def test_trimmed_tokenizer_matches_teacher_and_round_trips(teacher_name, request, tmp_path, texts):
    teacher_dir = request.getfixturevalue(teacher_name)
    out = init_student(teacher_dir, 1, tmp_path / "s", texts[:6], calib_tokens=128, calib_seq_len=16)
    _, teacher_tok = load(teacher_dir)
    _, tok = load(out)
    id_map = load_id_map(out)
    assert len(id_map) == len(tok) < len(teacher_tok)
    assert tokenization_mismatch(tok, teacher_tok, id_map, texts[:6]) == (0, 6)
    for text in texts[:6]:  # with special tokens too (the <bos> the post-processor adds)
        mapped = id_map[tok(text)["input_ids"]].tolist()
        assert mapped == teacher_tok(text)["input_ids"]
    for text in UNSEEN + texts[6:]:
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    vocab = json.loads((out / ID_MAP_FILE).read_text())
    assert vocab["teacher_vocab_size"] == len(teacher_tok)


def test_trimmed_student_keeps_the_teachers_chat_template(llama_teacher, tmp_path, texts):
    from transformers import AutoTokenizer

    template = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    teacher_dir = tmp_path / "instruct"
    teacher_tok = AutoTokenizer.from_pretrained(llama_teacher)
    teacher_tok.chat_template = template
    for name in ("config.json", "model.safetensors"):
        (teacher_dir / name).parent.mkdir(exist_ok=True)
        (teacher_dir / name).write_bytes((llama_teacher / name).read_bytes())
    teacher_tok.save_pretrained(teacher_dir)
    turns = [{"role": "user", "content": "The student keeps"}, {"role": "assistant", "content": "the layers"}]
    rendered = teacher_tok.apply_chat_template(turns, tokenize=False)
    out = init_student(teacher_dir, 1, tmp_path / "s", [*texts[:6], rendered], calib_tokens=128, calib_seq_len=16)
    student_tok = AutoTokenizer.from_pretrained(out)
    assert student_tok.chat_template == template
    assert student_tok.apply_chat_template(turns, tokenize=False) == rendered


@pytest.mark.parametrize("teacher_name", ["gemma_teacher", "llama_teacher"])
def test_all_layers_kept_gives_teacher_logits_at_kept_ids(teacher_name, request, tmp_path, texts):
    teacher_dir = request.getfixturevalue(teacher_name)
    n_layers = load(teacher_dir)[0].config.num_hidden_layers
    out = init_student(teacher_dir, n_layers, tmp_path / "s", texts, calib_tokens=128, calib_seq_len=16)
    teacher, _ = load(teacher_dir)
    student, tok = load(out)
    id_map = load_id_map(out)
    ids = tok(texts[4] + UNSEEN[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = teacher(input_ids=id_map[ids]).logits[..., id_map]
        got = student(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_no_trim_keeps_full_vocabulary(gemma_teacher, tmp_path, texts):
    out = init_student(gemma_teacher, 3, tmp_path / "s", texts, trim_vocab=False, calib_tokens=128, calib_seq_len=16)
    student, tok = load(out)
    assert load_id_map(out) is None and student.config.vocab_size == len(tok) == len(load(gemma_teacher)[1])


def test_even_fallback_without_corpus(gemma_teacher, tmp_path):
    out = init_student_cli(gemma_teacher, 2, tmp_path / "s", [], trim_vocab=False, selection="even")
    assert json.loads((out / STUDENT_FILE).read_text())["kept_layers"] == [0, 3]
    assert evenly_spaced(18, 6) == [0, 3, 7, 10, 14, 17]


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"layers": 0}, "--layers 0"),
        ({"layers": 9}, "--layers 9: the teacher has 4"),
        ({"corpus": []}, "--corpus"),
        ({"corpus": [], "trim_vocab": False}, "--select even"),
        ({"selection": "random"}, "--select random"),
        ({"calib_dtype": "int8"}, "--calib-dtype int8: expected one of float32"),
    ],
)
def test_bad_requests_are_user_errors(gemma_teacher, tmp_path, write_jsonl, kwargs, needle, texts):
    corpus = [write_jsonl("c.jsonl", [{"text": t} for t in texts])]
    args = {"teacher": gemma_teacher, "layers": 2, "out": tmp_path / "s", "corpus": corpus}
    args.update(kwargs)
    with pytest.raises(UserError, match=needle.replace("-", r"\-")):
        init_student_cli(**args)
    assert not (tmp_path / "s").exists()


def test_cli_errors_are_one_line_and_keep_existing_output(
    gemma_teacher, tmp_path, write_jsonl, run_main, assert_one_line_error, texts
):
    corpus = write_jsonl("c.jsonl", [{"text": t} for t in texts])
    out = tmp_path / "s"
    args = ["student", "init", "--teacher", gemma_teacher, "--corpus", corpus, "--out", out]
    assert_one_line_error(run_main(*args, "--layers", "99"), "--layers 99")
    assert not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_one_line_error(run_main(*args, "--layers", "2"), str(out), "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"


def test_overwrite_replaces_output(gemma_teacher, tmp_path, texts):
    out = tmp_path / "s"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    init_student(gemma_teacher, 1, out, texts, calib_tokens=64, calib_seq_len=16, overwrite=True)
    assert not (out / "stale.txt").exists() and (out / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # no temp dirs left beside it


def test_load_id_map_errors(tmp_path):
    assert load_id_map(tmp_path) is None
    (tmp_path / ID_MAP_FILE).write_text('{"teacher_vocab_size": 10, "teacher_ids": [1, 12]}')
    with pytest.raises(UserError, match=ID_MAP_FILE):
        load_id_map(tmp_path)
    (tmp_path / ID_MAP_FILE).write_text("{not json")
    with pytest.raises(UserError, match="malformed"):
        load_id_map(tmp_path)


def test_fill_vocabulary_keeps_corpus_tokenization_and_grows_to_size(gemma_teacher, tmp_path, texts):
    _, teacher_tok = load(gemma_teacher)
    kwargs = {"calib_tokens": 64, "calib_seq_len": 8}
    needed = load_id_map(init_student(gemma_teacher, 1, tmp_path / "a", texts[:6], **kwargs))
    size = len(needed) + 20
    out = init_student(gemma_teacher, 1, tmp_path / "b", texts[:6], vocab_size=size, **kwargs)
    _, tok = load(out)
    _, needed_tok = load(tmp_path / "a")
    id_map = load_id_map(out)
    assert len(id_map) == size < len(teacher_tok) and set(needed.tolist()) < set(id_map.tolist())
    assert tokenization_mismatch(tok, teacher_tok, id_map, texts[:6]) == (0, 6)
    unseen = UNSEEN + texts[6:]
    assert sum(len(tok(t)["input_ids"]) for t in unseen) < sum(len(needed_tok(t)["input_ids"]) for t in unseen)


def test_cli_reads_a_config_file_with_overrides_and_options(gemma_teacher, tmp_path, run_main):
    import yaml

    cfg = tmp_path / "student.yaml"
    cfg.write_text(yaml.safe_dump({"teacher": str(gemma_teacher), "layers": 3, "trim_vocab": False, "out": "x"}))
    out = tmp_path / "s"
    proc = run_main("student", "init", "-c", cfg, "layers=2", "selection=even", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / STUDENT_FILE).read_text())["kept_layers"] == [0, 3]


def test_vocabulary_to_keep_skips_byte_tokens_the_tokenizer_lacks(texts):
    """A byte-level BPE trained without the full byte alphabet (SmolLM2 lacks some control bytes) used to KeyError."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"], show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    assert "Ė" not in tokenizer.get_vocab()  # byte 0x16 never occurs in the texts
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts[:4]]
    keep = vocabulary_to_keep(tokenizer, ids)
    assert {i for row in ids for i in row} <= set(keep) <= set(range(len(tokenizer)))


def test_calib_tokens_sets_how_much_corpus_scores_the_layers(gemma_teacher, tmp_path, write_jsonl, texts):
    from potstill.config import StudentInitConfig, load_config

    corpus = write_jsonl("corpus.jsonl", [{"text": t} for t in texts * 20])  # more than 512 tokens, less than 4096
    flags = {"teacher": str(gemma_teacher), "layers": 2, "out": str(tmp_path / "s"), "corpus": [str(corpus)]}
    cfg = load_config(None, ["calib_tokens=512"], StudentInitConfig, flags=flags)
    init_student_cli(**cfg.model_dump())
    assert json.loads((tmp_path / "s" / STUDENT_FILE).read_text())["calib_tokens"] == 512  # 2 windows of 256
