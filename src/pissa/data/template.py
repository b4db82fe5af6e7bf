"""Marking every assistant turn of a chat for the loss, with the model's own chat template.

TRL's `assistant_only_loss` trains the tokens a template wraps in `{% generation %}` ...
`{% endgeneration %}`; few shipped templates have those markers, and TRL only swaps in a marked copy
of a handful of templates it knows. So pissa makes a marked copy of *any* template, without editing
it: the original becomes a macro, and the copy renders the conversation turn by turn,

    before_i  = original(messages[:i], add_generation_prompt=True)    # up to the opened assistant turn i
    through_i = original(messages[:i + 1])                            # turn i written out
    output    = ... before_i[done:] {% generation %} through_i[len(before_i):] {% endgeneration %} ...

so the marked span of assistant turn i is exactly what the model must generate after the prompt: the
content and the template's end-of-turn text (`4<|im_end|>\\n` for ChatML), the same tokens TRL trains
in a prompt-completion record. This holds when the template is prefix-preserving (a conversation
renders as an extension of its prefixes); the copy is therefore checked, record by record, to render
exactly as the original (`check_same_render`), and a record where it does not is refused.
"""

from __future__ import annotations

import re

from ..errors import PissaError

MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")
_MACRO = "__pissa_original_chat_template"
# No whitespace control touches the original text, so it renders inside the macro as it does alone.
_WRAPPER = (
    "{% macro " + _MACRO + "(messages, add_generation_prompt) %}{ORIGINAL}{% endmacro %}"
    "{%- set ns = namespace(done='') -%}"
    "{%- for i in range(messages | length) -%}"
    "{%- if messages[i]['role'] == 'assistant' -%}"
    "{%- set before = " + _MACRO + "(messages[:i], true) -%}"
    "{%- set through = " + _MACRO + "(messages[:i + 1], false) -%}"
    "{{- before[ns.done | length:] -}}"
    "{%- generation -%}{{- through[before | length:] -}}{%- endgeneration -%}"
    "{%- set ns.done = through -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{{- " + _MACRO + "(messages, add_generation_prompt)[ns.done | length:] -}}"
)


def has_generation_markers(template: str) -> bool:
    return MARKER.search(template) is not None


def original_template(tokenizer) -> str:
    template = tokenizer.chat_template
    if isinstance(template, dict):  # named variants: the default one renders chats
        template = template.get("default")
    if not isinstance(template, str) or not template:
        raise PissaError("the tokenizer has no chat template; training every assistant turn of a chat needs one")
    return template


def with_generation_markers(template: str) -> str:
    """A copy of `template` whose every assistant turn is marked for the loss (the template itself when it
    already has `{% generation %}` markers)."""
    if has_generation_markers(template):
        return template
    return _WRAPPER.replace("{ORIGINAL}", template)


def render(tokenizer, turns: list[dict], template: str, where: str) -> str:
    """The conversation rendered by `template`; a template error names the record."""
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(turns, tokenize=False, chat_template=template)
    except TemplateError as e:
        raise PissaError(f"{where}: the chat template refused this conversation ({e}); fix the record's roles "
                         "or order") from None


def check_same_render(tokenizer, turns: list[dict], original: str, marked: str, where: str) -> str:
    """The marked copy's text, checked to equal the original's; refuses a conversation where they differ."""
    text = render(tokenizer, turns, marked, where)
    if text != render(tokenizer, turns, original, where):
        raise PissaError(
            f"{where}: the model's chat template renders the earlier turns of this conversation differently once "
            "later turns follow (it is not prefix-preserving, e.g. it drops earlier reasoning), so its assistant "
            "turns cannot all be marked for the loss; give a tokenizer whose chat_template has "
            "{% generation %} markers, or train on single-turn records (prompt/completion)")
    return text


def stop_token_trained(tokenizer, marked: str) -> bool:
    """Whether the marked span of an assistant turn ends with a special end-of-turn token (TRL's check):
    otherwise the model never learns to stop."""
    from trl.chat_template_utils import is_chat_template_stop_token_trained

    return is_chat_template_stop_token_trained(tokenizer, chat_template=marked)
