"""Chat templates by name, for models whose tokenizer has none (base models) or the wrong one.

`data.chat_template` is one of the names below, a path to a Jinja file, or Jinja text itself; it replaces
the tokenizer's template everywhere (training data, evaluation, PPO prompts) and is saved with final/.
The templates render every message's content verbatim (assistant labels are found by their text) and
follow each family's published format.
"""

from __future__ import annotations

from pathlib import Path

from ftdist.config import ConfigError
from ftdist.data.formats import RowProblem
from ftdist.data.loading import DataError

_SYSTEM_FIRST = ("{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
                 "{% set loop_messages = messages[1:] %}{% else %}{% set system = '' %}"
                 "{% set loop_messages = messages %}{% endif %}")

BUILTIN = {
    # OpenAI ChatML (Qwen, OpenHermes, many fine-tunes)
    "chatml": ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
               "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"),
    # Llama 3 / 3.1 instruct
    "llama3": ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
               "'<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"),
    # Llama 2 chat: [INST] ... [/INST], the system prompt inside the first instruction
    "llama2": (_SYSTEM_FIRST + "{% for message in loop_messages %}{% if message['role'] == 'user' %}"
               "{{ bos_token + '[INST] ' }}{% if loop.first and system %}{{ '<<SYS>>\n' + system + '\n<</SYS>>\n\n' }}"
               "{% endif %}{{ message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
               "{{ ' ' + message['content'] + ' ' + eos_token }}{% endif %}{% endfor %}"),
    # Mistral instruct: no system role; a system prompt goes before the first instruction
    "mistral": (_SYSTEM_FIRST + "{{ bos_token }}{% for message in loop_messages %}{% if message['role'] == 'user' %}"
                "{{ '[INST] ' }}{% if loop.first and system %}{{ system + '\n\n' }}{% endif %}"
                "{{ message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
                "{{ message['content'] + eos_token }}{% endif %}{% endfor %}"),
    # Zephyr (also TinyLlama-Chat): <|role|>\n content </s>
    "zephyr": ("{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + "
               "'\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"),
}
BUILTIN["tinyllama"] = BUILTIN["zephyr"]


def resolve_chat_template(spec: str) -> str:
    """data.chat_template -> Jinja text: a built-in name, a Jinja file, or Jinja text."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    if "{%" in spec or "{{" in spec:
        return spec
    path = Path(spec).expanduser()
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        if "{{" not in text and "{%" not in text:
            raise ConfigError(f"data.chat_template={spec}: the file holds no Jinja template ({{{{ ... }}}})")
        return text
    raise ConfigError(f"data.chat_template={spec!r}: neither a built-in template ({', '.join(BUILTIN)}) nor a "
                      f"Jinja file")


def template_label(spec: str | None, tokenizer, key: str = "data.chat_template") -> str:
    """How errors name the chat template in use: the value of `key` (data.chat_template, eval's --chat-template),
    or the tokenizer's own."""
    if spec:
        return f"{key}={spec}" if len(spec) <= 80 and "\n" not in spec else f"{key} (the Jinja text given)"
    return f"the chat template of {getattr(tokenizer, 'name_or_path', '') or 'the tokenizer'}"


def render_chat(tokenizer, messages: list[dict], template: str | None = None, **kwargs):
    """tokenizer.apply_chat_template(messages, **kwargs), with the template's own failures in one line naming it
    (`template`, from template_label) and the template line jinja2 gives: a syntax error, or an attempt to leave
    jinja2's sandbox, is a DataError (every row would fail); an error the template raises for this conversation
    (raise_exception, an undefined value or index) is a RowProblem (the caller adds file and row)."""
    import jinja2

    try:
        return tokenizer.apply_chat_template(messages, **kwargs)
    except jinja2.TemplateError as e:
        label = template or template_label(None, tokenizer)
        line = getattr(e, "lineno", None) or _template_line(e)
        where = f"{label}, line {line}" if line else label
        message = " ".join(str(getattr(e, "message", None) or e).split())
        if isinstance(e, jinja2.TemplateSyntaxError):
            raise DataError(f"{where}: not a valid Jinja template: {message}") from None
        if isinstance(e, jinja2.exceptions.SecurityError):
            raise DataError(f"{where}: refused by the template sandbox: {message}") from None
        kind = "undefined value" if isinstance(e, jinja2.UndefinedError) else "the template raised an error"
        raise RowProblem(f"{where}: {kind}: {message}") from None


def _template_line(exc: BaseException):
    """The line of the template where a runtime error happened: jinja2 rewrites the traceback so that frames of
    the compiled template carry the template's file name ('<template>') and line."""
    line, tb = None, exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line
