"""Fidelity of a pruned model against the unpruned one (works on any weights, random included)."""
from __future__ import annotations

import torch


def next_token_fidelity(ref_logits: torch.Tensor, logits: torch.Tensor) -> dict:
    """Top-1 agreement and mean KL(ref || pruned) of next-token distributions, [N, V] each."""
    ref = torch.log_softmax(ref_logits.float(), dim=-1)
    new = torch.log_softmax(logits.float(), dim=-1)
    kl = (ref.exp() * (ref - new)).sum(-1)
    agree = (ref.argmax(-1) == new.argmax(-1)).float()
    return {"top1_agreement": float(agree.mean()), "mean_kl": float(kl.mean()), "n": int(ref.shape[0])}
