"""Rollout engines: how a policy rank turns its prompts into sampled responses.

The policy worker asks its engine for one Rollout per call and tells it when the
weights have changed; the driver never sees which engine runs. An engine:

    generate(prompts, seed) -> Rollout   the rank's share of the batch; seed None = greedy
    sync_weights()                       after every policy update (an engine holding its own
                                         copy of the weights refreshes it here)
    exact_logprobs                       True when Rollout.logprobs are the training forward's
                                         (up to fp32 rounding), so the driver need not recompute
                                         the old policy's log-probs

`hf` (HFRolloutEngine) decodes with the policy's own transformers model, in its own loop:
  - the G samples of a prompt share one encoding of it: the prompt is run once and its
    KV cache copied to the G rows (prompts of the driver's batch arrive G times in a row);
  - a row that has produced EOS leaves the batch (its cache rows are dropped), so the
    batch shrinks to the rows still decoding instead of carrying padding to the longest;
  - ppo.generate_batch_size samples decode at a time (whole prompts' groups), apart from
    train.micro_batch_size;
  - under ZeRO-3 with several ranks the whole policy is gathered into a plain replica once
    per rollout (ppo.gather_for_rollout), so decoding gathers nothing per token and each
    rank stops when its own rows are done; without it, every rank runs transformers'
    generate with synced_gpus (every layer gathered at every decoding step);
  - the log-prob of each sampled token under the tempered distribution is recorded as it
    is sampled (the same numbers the training forward gives, fp32 rounding aside).
"""

from __future__ import annotations

from typing import Optional

import torch

from ftdist.rl.experience import (Experience, Rollout, action_logprobs, ends_with_eos, position_ids,
                                  response_mask)


def prompt_runs(prompts: list[str]) -> tuple[list[str], list[int]]:
    """Consecutive equal prompts -> (the distinct prompts in order, how many times each came in a row)."""
    unique: list[str] = []
    counts: list[int] = []
    for text in prompts:
        if unique and unique[-1] == text:
            counts[-1] += 1
        else:
            unique.append(text)
            counts.append(1)
    return unique, counts


def _processors(tokenizer, *, do_sample: bool, temperature: float, top_p: float, top_k: int,
                repetition_penalty: float, min_new_tokens: int, prompt_width: int):
    """transformers' own logits processors, in the order generate applies them."""
    from transformers import (LogitsProcessorList, MinNewTokensLengthLogitsProcessor, RepetitionPenaltyLogitsProcessor,
                              TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    out = LogitsProcessorList()
    if repetition_penalty != 1.0:
        out.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))
    if min_new_tokens:
        out.append(MinNewTokensLengthLogitsProcessor(prompt_width, min_new_tokens, tokenizer.eos_token_id))
    if do_sample:
        if temperature != 1.0:
            out.append(TemperatureLogitsWarper(temperature))
        if top_k:
            out.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            out.append(TopPLogitsWarper(top_p))
    return out


@torch.no_grad()
def decode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, repeats: list[int], *, max_new_tokens: int,
           eos_token_id: int, pad_token_id: int, logprob_temperature: float, processors,
           do_sample: bool, drop_finished: bool = True, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample repeats[u] responses to each left-padded prompt u, sharing its KV cache.

    input_ids, attention_mask (U, P) on the model's device -> (tokens (N, R) with pad after EOS, log-probs (N, R)
    of each token under softmax(logits / logprob_temperature), 0 after EOS), N = sum(repeats), R <= max_new_tokens.
    Rows that have sampled EOS leave the batch (drop_finished=False: they decode padding to the end, as generate
    does; for measuring what leaving saves).
    """
    device = input_ids.device
    U, P = input_ids.shape
    expand = torch.repeat_interleave(torch.arange(U, device=device), torch.tensor(repeats, device=device))
    N = int(expand.numel())
    params = _forward_params(model)
    cache_kw = "cache" if "cache" in params else "past_key_values"  # the name transformers 5.2x gives the KV cache
    # the prompt pass needs the logits of its last position only
    keep = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                use_cache=True, **keep)
    cache = getattr(out, cache_kw)
    logits = out.logits[:, -1].float()[expand]  # (N, V)
    if N != U:
        cache.reorder_cache(expand)  # the prompt's keys and values, copied to each of its samples
    mask = attention_mask[expand]  # (N, P)
    next_pos = mask.sum(dim=-1, keepdim=True)  # (N, 1): positions count real tokens only
    history = input_ids[expand]  # (N, P + t): what the processors see (repetition penalty, min length)
    tokens = torch.full((N, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    logps = torch.zeros((N, max_new_tokens), dtype=torch.float32, device=device)
    active = torch.arange(N, device=device)  # rows still decoding, in cache order
    ended = torch.zeros(N, dtype=torch.bool, device=device)
    width = 0
    for t in range(max_new_tokens):
        width = t + 1
        logp = torch.log_softmax(logits / logprob_temperature, dim=-1)  # the distribution training sees
        scores = processors(history, logits) if len(processors) else logits
        if do_sample:
            nxt = torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator).squeeze(1)
        else:
            nxt = scores.argmax(dim=-1)
        if not drop_finished:  # rows that ended earlier keep decoding, padding
            nxt = nxt.masked_fill(ended, pad_token_id)
        tokens[active, t] = nxt
        logps[active, t] = logp.gather(1, nxt[:, None]).squeeze(1)
        done = nxt == eos_token_id
        if not drop_finished:
            ended |= done
            done = ended
        if t == max_new_tokens - 1 or bool(done.all()):
            break
        if drop_finished and bool(done.any()):  # finished rows leave the batch, their cache rows with them
            keep = (~done).nonzero().squeeze(1)
            cache.reorder_cache(keep)
            active, nxt, mask, next_pos, history = active[keep], nxt[keep], mask[keep], next_pos[keep], history[keep]
        mask = torch.cat([mask, mask.new_ones((mask.size(0), 1))], dim=1)
        history = torch.cat([history, nxt[:, None]], dim=1)
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=next_pos, use_cache=True,
                    **{cache_kw: cache})
        cache = getattr(out, cache_kw)
        logits = out.logits[:, -1].float()
        next_pos = next_pos + 1
    return tokens[:, :width], logps[:, :width]


def _forward_params(model) -> set[str]:
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(inspect.signature(base.forward).parameters)


class HFRolloutEngine:
    """Rollouts with the policy's transformers model (see the module docstring)."""

    def __init__(self, engine, tokenizer, cfg, info, build=None):
        self.engine, self.tokenizer, self.cfg, self.p, self.info = engine, tokenizer, cfg, cfg.ppo, info
        # incremental decoding and the training forward agree to fp32 rounding (~1e-6); in 16-bit they differ by
        # the 16-bit rounding of two different summation orders, so there the old policy is recomputed
        self.exact_logprobs = cfg.model.dtype == "fp32"
        self.build = build  # makes a plain (unpartitioned) copy of the policy: the ZeRO-3 replica
        self.replica = None
        self.stale = True
        zero3_gather = (engine.zero_stage == 3 and info is not None and info.world_size > 1
                        and self.p.gather_for_rollout)
        # a replica: under ZeRO-3 (gathered once per rollout), and with async rollouts (weights the update
        # does not touch while the next batch is generated)
        self.gather = (zero3_gather or self.p.async_rollouts) and build is not None

    def sync_weights(self) -> None:
        self.stale = True  # the replica is refreshed at the next rollout (no work when none follows)

    def refresh(self) -> None:
        """The replica (if any) made equal to the trained weights now."""
        if not self.gather:
            return
        if self.replica is None:
            from ftdist.engine.engine import whole_model_context

            with whole_model_context():
                self.replica = self.build().to(self.engine.device)
            self.replica.requires_grad_(False)
            self.replica.eval()
        if self.stale:
            self._refresh()
            self.stale = False

    def _model(self, refresh: bool):
        if not self.gather:
            return self.engine.module
        if refresh or self.replica is None:
            self.refresh()
        return self.replica

    def _refresh(self) -> None:
        """Copy the trained parameters, gathered, into the replica, 64M elements at a time. The frozen ones (a
        LoRA model's base, 4-bit or not) are the replica's own: built by the same loader from the same files."""
        src = {n: p for n, p in self.engine.module.named_parameters() if p.requires_grad}
        dst = dict(self.replica.named_parameters())
        missing = sorted(set(src) - set(dst))
        if missing:
            raise RuntimeError(f"rollout engine: the policy's parameter {missing[0]} has no counterpart in its "
                               f"rollout copy; set ppo.gather_for_rollout=false and ppo.async_rollouts=false")
        names, budget, group = list(src), 64 * 2**20, []

        def flush():
            with self.engine.gathered([src[n] for n in group]):
                for n in group:
                    dst[n].data.copy_(src[n].data.to(dst[n].device, dst[n].dtype))
            group.clear()

        size = 0
        for n in names:
            group.append(n)
            size += getattr(src[n], "ds_numel", src[n].numel())
            if size >= budget:
                flush()
                size = 0
        if group:
            flush()

    @torch.no_grad()
    def generate(self, prompts: list[str], seed: Optional[int], device, refresh: bool = True) -> Rollout:
        from ftdist.models.generate import encode_prompts, generate

        tok, p = self.tokenizer, self.p
        do_sample = seed is not None
        # the rollout's own random stream: a rollout beside an update must not share the global generator
        gen = torch.Generator(device=device).manual_seed(seed) if do_sample else None
        max_prompt = self.cfg.data.max_length - p.max_new_tokens
        model = self._model(refresh)
        if self.engine.zero_stage == 3 and self.info is not None and self.info.world_size > 1 and not self.gather:
            # every layer gathered at every step: transformers' synced generate keeps the ranks in step
            if do_sample:
                torch.manual_seed(seed)
            enc, response = generate(model, tok, prompts, max_new_tokens=p.max_new_tokens, device=device,
                                     synced_gpus=True, max_prompt_tokens=max_prompt, do_sample=do_sample,
                                     temperature=p.temperature, top_p=p.top_p, top_k=p.top_k,
                                     repetition_penalty=p.repetition_penalty, min_new_tokens=p.min_new_tokens)
            return self._rollout(prompts, enc["input_ids"], enc["attention_mask"], response.cpu(), None)
        unique, counts = prompt_runs(prompts)
        enc = encode_prompts(tok, unique, max_prompt)
        ids, am = enc["input_ids"], enc["attention_mask"]
        was_training = model.training
        model.eval()
        parts = []
        try:
            for lo, hi in self._chunks(counts):
                P = int(am[lo:hi].sum(dim=1).max())  # the chunk's own prompt width (left padding trimmed)
                procs = _processors(tok, do_sample=do_sample, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k,
                                    repetition_penalty=p.repetition_penalty, min_new_tokens=p.min_new_tokens,
                                    prompt_width=P)
                parts.append(decode(model, ids[lo:hi, -P:].to(device), am[lo:hi, -P:].to(device), counts[lo:hi],
                                    max_new_tokens=p.max_new_tokens, eos_token_id=tok.eos_token_id,
                                    pad_token_id=tok.pad_token_id, logprob_temperature=p.temperature,
                                    processors=procs, do_sample=do_sample, generator=gen))
        finally:
            model.train(was_training)
        R = max(t.size(1) for t, _ in parts)
        response = torch.cat([torch.nn.functional.pad(t.cpu(), (0, R - t.size(1)), value=tok.pad_token_id)
                              for t, _ in parts])
        logps = torch.cat([torch.nn.functional.pad(lp.cpu(), (0, R - lp.size(1))) for _, lp in parts])
        expand = torch.repeat_interleave(torch.arange(len(unique)), torch.tensor(counts))
        rollout = self._rollout(prompts, ids[expand], am[expand], response, logps)
        if not self.exact_logprobs:
            # 16-bit: the sampler's numbers are not the training forward's; with async rollouts the generating
            # weights are gone by the update, so their log-probs come from one full forward of the replica now
            rollout.logprobs = self._forward_logprobs(model, rollout, device) if self.p.async_rollouts else None
        return rollout

    @torch.no_grad()
    def _forward_logprobs(self, model, r: Rollout, device) -> torch.Tensor:
        exp = Experience.from_rollout(r)
        out = []
        for c in exp.chunks(self.cfg.train.micro_batch_size):
            am = c.attention_mask.to(device)
            logits = model(input_ids=c.sequences.to(device), attention_mask=am, position_ids=position_ids(am),
                           use_cache=False).logits
            out.append(action_logprobs(logits.float() / self.p.temperature, c.sequences.to(device),
                                       c.num_actions).cpu())
        return torch.cat(out).masked_fill(~exp.action_mask, 0.0)

    def _chunks(self, counts: list[int]):
        """Ranges of prompts holding at most ppo.generate_batch_size samples each (at least one prompt)."""
        limit = self.p.generate_batch_size or sum(counts)
        lo, rows = 0, 0
        for i, c in enumerate(counts):
            if rows and rows + c > limit:
                yield lo, i
                lo, rows = i, 0
            rows += c
        if lo < len(counts):
            yield lo, len(counts)

    def _rollout(self, prompts, prompt_ids, prompt_mask, response, logps) -> Rollout:
        tok = self.tokenizer
        mask = response_mask(response, tok.eos_token_id)  # (b, R)
        response = response.masked_fill(~mask, tok.pad_token_id)
        texts = tok.batch_decode([r[m].tolist() for r, m in zip(response, mask)], skip_special_tokens=True)
        return Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response, action_mask=mask,
                       finished=ends_with_eos(response, mask, tok.eos_token_id), prompts=list(prompts),
                       responses=texts, logprobs=None if logps is None else logps.masked_fill(~mask, 0.0))


ENGINES = {"hf": HFRolloutEngine}


def rollout_engine(name: str, engine, tokenizer, cfg, info, build=None):
    return ENGINES[name](engine, tokenizer, cfg, info, build=build)
