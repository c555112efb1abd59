"""Chat templates by name, for models whose tokenizer has none (base models) or the wrong one.

`data.chat_template` is one of the names below, a path to a Jinja file, or Jinja text itself; it replaces
the tokenizer's template everywhere (training data, evaluation, PPO prompts) and is saved with final/.
The templates render every message's content verbatim (assistant labels are found by their text) and
follow each family's published format.
"""

from __future__ import annotations

from pathlib import Path

from ftdist.config import ConfigError

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
