"""The sentence-embedding teacher: masked mean pooling, unit vectors, on a tiny random BERT saved here."""

from __future__ import annotations

import pytest
import torch

from potstill.errors import UserError
from potstill.teacher.text_encoder import TextEncoderTeacher


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "red", "circle", "blue", "square", "cat", "on", "the", "mat"]
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    folder = tmp_path_factory.mktemp("encoder")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32)  # fmt: skip
    BertModel(config).save_pretrained(folder)
    return folder


def test_unit_vectors_independent_of_padding(encoder_dir):
    teacher = TextEncoderTeacher(encoder_dir)
    alone = teacher.embed(["a red circle"])
    batched = teacher.embed(["a red circle", "the cat on the mat a blue square"], batch_size=2)
    assert batched.shape == (2, teacher.dim) == (2, 32)
    torch.testing.assert_close(batched.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(batched[0], alone[0], atol=1e-5, rtol=1e-5)  # padding is not averaged in
    assert teacher.fingerprint(["a"]) != teacher.fingerprint(["b"])


def test_not_a_model_folder(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        TextEncoderTeacher(tmp_path)


@pytest.mark.integration
def test_real_minilm_places_related_captions_together(tmp_path):
    pytest.importorskip("all_minilm_l6_v2")
    from potstill.teacher.text_encoder import minilm_dir

    teacher = TextEncoderTeacher(minilm_dir(tmp_path))
    e = teacher.embed(["animals bugs: ladybug", "a red ladybug", "science astronomy: jupiter"])
    assert teacher.dim == 384
    assert float(e[0] @ e[1]) > float(e[0] @ e[2]) + 0.3
