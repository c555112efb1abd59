"""What scores an answer besides a reference: a reward model (an ftdist rm output) and a local judge model
(G-Eval-style ratings and pairwise preferences, after rubric templates). Loaded once per evaluation and shared
by every model evaluated (eval/suites.py takes them as `helpers`)."""

from __future__ import annotations

from pathlib import Path

from ftdist.eval.rows import EvalError

TEMPLATES = Path(__file__).parent / "judge_templates"


def _conversation_text(tok, prompt, answer: str) -> str:
    """The prompt and answer as the scoring model sees them: its chat template for conversations (a failing
    template is one line naming it)."""
    from ftdist.data.formats import RowProblem
    from ftdist.data.templates import render_chat

    if isinstance(prompt, str) or getattr(tok, "chat_template", None) is None:
        text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
        return text + answer
    try:
        return render_chat(tok, list(prompt) + [{"role": "assistant", "content": answer}], tokenize=False)
    except RowProblem as e:
        raise EvalError(f"the reward model: {e}") from None


class RewardScorer:
    """Scores of (prompt, answer) pairs under a reward model (an ftdist rm output: XForSequenceClassification),
    taken at the last real token as training takes them (models/heads.py)."""

    def __init__(self, path: str, dtype, device):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from ftdist.models.loading import ModelError, check_model_source, load_failure

        try:
            source = check_model_source(path, "--reward-model")  # a missing local path is not taken for a hub id
        except ModelError as e:
            raise EvalError(str(e)) from None
        try:
            self.model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=1, dtype=dtype).to(device)
            self.tok = AutoTokenizer.from_pretrained(source)
        except Exception as e:  # OSError, a damaged or crafted weights file, ...
            raise EvalError(f"--reward-model {path}: cannot be loaded: {load_failure(source, e)}") from None
        self.model.eval()
        self.device = device

    def scores(self, pairs: list[tuple[object, str]], batch_size: int) -> list[float]:
        import torch

        from ftdist.algos.reward import gather_last
        from ftdist.models.heads import token_values

        out = []
        for start in range(0, len(pairs), batch_size):
            texts = [_conversation_text(self.tok, p, a) for p, a in pairs[start:start + batch_size]]
            enc = self.tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            inputs = {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            with torch.no_grad():
                values = token_values(self.model.__call__, self.model, inputs)
            out += gather_last(values, inputs["attention_mask"]).tolist()
        return out


def load_template(path: str | None, default: str, fields: tuple[str, ...]) -> str:
    text = Path(path or TEMPLATES / default).read_text()
    missing = [f for f in fields if "{" + f + "}" not in text]
    if missing:
        raise EvalError(f"{path or default}: the template lacks {', '.join('{' + f + '}' for f in missing)}")
    return text


class Judge:
    """A causal LM as a judge: ratings as the probability-weighted mean over the rating tokens 1..10 (G-Eval's
    scoring: no answer parsing, no sampling), and pairwise preferences from P(A) against P(B)."""

    def __init__(self, model, tok, args, device):
        self.model, self.tok = model, tok
        self.score_template = load_template(args.judge_template, "score.txt", ("question", "answer"))
        self.pair_template = load_template(args.pairwise_template, "pairwise.txt", ("question", "answer_a", "answer_b"))
        self.device = device

    def _next_probs(self, prompt: str):
        import torch

        ids = self.tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].to(self.device)
        with torch.no_grad():
            return torch.softmax(self.model(input_ids=ids).logits[0, -1].float(), -1)

    def _first_token(self, text: str) -> int:
        return self.tok(text, add_special_tokens=False)["input_ids"][0]

    def _next_token_probs(self, prompt: str, choices: list[str]) -> list[float]:
        """The judge's probability of each choice's first token after the prompt, renormalised over the choices."""
        probs = self._next_probs(prompt)
        p = [float(probs[self._first_token(c)]) for c in choices]
        total = sum(p)
        return [x / total for x in p] if total > 0 else [1 / len(p)] * len(p)

    def rate(self, question: str, answer: str) -> float:
        """Expected rating over 1..10. Where "10" starts with the token of "1" (digits tokenised one by one), its
        probability is P("1") P("0" | "1") and the rating 1 keeps the rest of P("1")."""
        prompt = self.score_template.format(question=question, answer=answer)
        probs = self._next_probs(prompt)
        p = {k: float(probs[self._first_token(str(k))]) for k in range(1, 10)}
        ten = self.tok("10", add_special_tokens=False)["input_ids"]
        if len(ten) == 1:
            p[10] = float(probs[ten[0]])
        else:
            then_zero = float(self._next_probs(prompt + "1")[ten[1]])
            p[10], p[1] = p[1] * then_zero, p[1] * (1 - then_zero)
        total = sum(p.values())
        return sum(k * v for k, v in p.items()) / total if total > 0 else 5.5

    def prefer(self, question: str, answer: str, baseline: str) -> float:
        """P(answer better than baseline), averaged over both orders (position bias cancels)."""
        first = self._next_token_probs(self.pair_template.format(question=question, answer_a=answer,
                                                                  answer_b=baseline), ["A", "B"])[0]
        second = self._next_token_probs(self.pair_template.format(question=question, answer_a=baseline,
                                                                   answer_b=answer), ["A", "B"])[1]
        return (first + second) / 2
