"""`ftdist chat` driven through a pseudo-terminal as a person types: streamed answers that are the model's
greedy answers to the whole conversation so far, /system, /reset, unknown commands, /exit."""

import os
import pty
import re
import select
import subprocess
import sys
import time

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.dist

MAX_NEW = 10


class Terminal:
    """A process on a pseudo-terminal: type lines, wait for text (a small pexpect)."""

    def __init__(self, cmd: list[str]):
        self.master, slave = pty.openpty()
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TERM": "dumb"}
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=slave, stdout=slave, stderr=slave,
                                     start_new_session=True)
        os.close(slave)
        self.seen = ""

    def expect(self, pattern: str, timeout: float = 120) -> str:
        """Everything up to and including the first match of `pattern` after what was consumed."""
        deadline = time.monotonic() + timeout
        while True:
            m = re.search(pattern, self.seen)
            if m:
                out, self.seen = self.seen[:m.end()], self.seen[m.end():]
                return out
            left = deadline - time.monotonic()
            assert left > 0, f"no {pattern!r} within {timeout}s; output so far:\n{self.seen[-3000:]}"
            ready, _, _ = select.select([self.master], [], [], min(left, 1.0))
            if ready:
                try:
                    self.seen += os.read(self.master, 4096).decode(errors="replace").replace("\r\n", "\n")
                except OSError:  # the process closed the terminal
                    assert False, f"the process ended; output:\n{self.seen[-3000:]}"

    def type(self, line: str) -> None:
        os.write(self.master, (line + "\n").encode())

    def close(self) -> int:
        try:
            return self.proc.wait(timeout=60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            os.close(self.master)


def _greedy(messages: list[dict]) -> str:
    import torch

    from ftdist.infer import load_model
    from ftdist.models.generate import generate

    model, tok = load_model("ftdist/tiny", device=torch.device("cpu"))
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    _, response = generate(model, tok, [prompt], max_new_tokens=MAX_NEW, device=torch.device("cpu"))
    ids = response[0].tolist()
    ids = ids[:ids.index(tok.eos_token_id)] if tok.eos_token_id in ids else ids
    return tok.decode(ids, skip_special_tokens=True)


def _answer(term: Terminal) -> str:
    """The streamed answer after `assistant> `, up to the next prompt."""
    term.expect(r"assistant> ")
    return term.expect(r"\nyou> ")[:-len("\nyou> ")]


def test_chat_streams_answers_keeps_the_conversation_and_obeys_commands():
    term = Terminal([sys.executable, "-m", "ftdist", "chat", "ftdist/tiny", "--temperature", "0",
                     "--max-new-tokens", str(MAX_NEW)])
    try:
        assert "/reset" in term.expect(r"you> ")
        q1, q2, q3 = "Sort the digits: 3 1 2", "And 9 4?", "Sort the digits: 5 2 7"
        term.type(q1)
        a1 = _answer(term)
        term.type(q2)
        a2 = _answer(term)
        term.type("/system be brief")
        term.expect(r"\(system prompt set; history cleared\)\nyou> ")
        term.type(q3)
        a3 = _answer(term)
        term.type("/reset")
        term.expect(r"\(history cleared\)\nyou> ")
        term.type("/frobnicate")
        term.expect(r"\(unknown command /frobnicate: .*\)\nyou> ")
        term.type("/exit")
        assert term.close() == 0
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
    # what streamed is the greedy answer to the conversation so far: the second turn sees the first exchange,
    # the third only the system prompt (the history was cleared)
    first = [{"role": "user", "content": q1}]
    g1 = _greedy(first)
    assert a1.strip() == g1.strip()
    assert a2.strip() == _greedy(first + [{"role": "assistant", "content": g1}, {"role": "user", "content": q2}]).strip()
    assert a3.strip() == _greedy([{"role": "system", "content": "be brief"}, {"role": "user", "content": q3}]).strip()
