"""Preference-optimisation losses on sequence log-probs: DPO (sigmoid, IPO, hinge) and ORPO.

Inputs are per-sequence log-probs (B,) from `sft.sequence_logprobs`, summed over the
response tokens unless said otherwise. The reference log-probs carry no gradient
(reference model, or the policy with its LoRA adapter disabled, under no_grad).

What we match in TRL 1.16 (`DPOTrainer._compute_loss`, checked in the tests):
- sigmoid: -log sigmoid(beta * h), h = (pi_c - ref_c) - (pi_r - ref_r). TRL 1.16
  dropped label smoothing from "sigmoid" (it lives in "robust"/"exo_pair"); ours
  keeps the cDPO form -(1-eps) log sigmoid(beta h) - eps log sigmoid(-beta h), which
  is TRL's at eps = 0 and the classic TRL `label_smoothing` otherwise.
- ipo: (h_avg - 1/(2 beta))^2 where each log-ratio is divided by its response
  length before taking the difference. TRL normalises this way (confirmed with the
  IPO authors, per its comment) so beta means the same thing for any length. We
  therefore require the lengths; pass ones to get the unnormalised paper form.
- hinge: relu(1 - beta * h) (SLiC).
Implicit rewards are beta * (pi - ref), summed log-probs, for every loss type.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO-family loss, mean over pairs.

    policy_*_logps, ref_*_logps: (B,) summed response log-probs.
    chosen_lengths, rejected_lengths: (B,) response token counts; required for "ipo".
    label_smoothing: cDPO flip probability in [0, 0.5); only meaningful for "sigmoid".
    Returns loss () float32 and metrics rewards/chosen, rewards/rejected,
    rewards/margins, rewards/accuracies, logps/chosen, logps/rejected (batch means).
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"dpo loss_type={loss_type!r} is not one of {DPO_LOSS_TYPES}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"dpo label_smoothing={label_smoothing} must be in [0, 0.5)")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"dpo label_smoothing={label_smoothing} is only defined for loss_type='sigmoid'")

    chosen_logratios = policy_chosen_logps.float() - ref_chosen_logps.float()  # (B,)
    rejected_logratios = policy_rejected_logps.float() - ref_rejected_logps.float()  # (B,)
    h = chosen_logratios - rejected_logratios  # (B,)

    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:  # ipo
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError(
                "dpo loss_type='ipo' needs chosen_lengths and rejected_lengths: the log-ratios are "
                "averaged per response token as in TRL; pass ones for the unnormalised form"
            )
        chosen_avg = chosen_logratios / chosen_lengths.float().clamp(min=1)  # (B,)
        rejected_avg = rejected_logratios / rejected_lengths.float().clamp(min=1)  # (B,)
        losses = (chosen_avg - rejected_avg - 1 / (2 * beta)) ** 2
    loss = losses.mean()

    with torch.no_grad():
        chosen_rewards = beta * chosen_logratios  # (B,)
        rejected_rewards = beta * rejected_logratios  # (B,)
        metrics = {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "logps/chosen": policy_chosen_logps.float().mean(),
            "logps/rejected": policy_rejected_logps.float().mean(),
        }
    return loss, metrics


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, switching formula at -ln 2 to avoid cancellation (Maechler 2012)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(
    chosen_logps_mean: torch.Tensor,
    rejected_logps_mean: torch.Tensor,
    nll_chosen: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ORPO (Hong et al. 2024): nll_chosen + beta * mean(-log sigmoid(log odds ratio)).

    chosen_logps_mean, rejected_logps_mean: (B,) log-probs AVERAGED over response
    tokens (sequence_logprobs(..., average=True)); they must be < 0.
    nll_chosen: () the SFT loss on the chosen responses.
    log odds(p) = log p - log(1 - p), computed from log p with log1mexp, as TRL's
    experimental ORPOTrainer.odds_ratio_loss does. Metrics use TRL's names:
    log_odds_ratio is mean log sigmoid(log odds ratio), log_odds_chosen the mean
    log odds ratio, rewards/* = beta * mean log-probs.
    """
    chosen = chosen_logps_mean.float()
    rejected = rejected_logps_mean.float()
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))  # (B,)
    log_sigmoid_odds = F.logsigmoid(log_odds)  # (B,)
    loss = nll_chosen.float() - beta * log_sigmoid_odds.mean()

    with torch.no_grad():
        chosen_rewards = beta * chosen
        rejected_rewards = beta * rejected
        metrics = {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "logps/chosen": chosen.mean(),
            "logps/rejected": rejected.mean(),
            "nll_loss": nll_chosen.detach().float(),
            "log_odds_ratio": log_sigmoid_odds.mean(),
            "log_odds_chosen": log_odds.mean(),
        }
    return loss, metrics
