"""Losses: Sabour's margin loss on class scores and the decoder's reconstruction loss.

The CNN baseline outputs scores = sigmoid(logits) (see `capsmodels.networks.CNN`), so it trains on the
same margin loss as the CapsNets and losses, accuracies and probes stay comparable across archs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def margin_loss(scores: torch.Tensor, y: torch.Tensor, m_pos: float = 0.9, m_neg: float = 0.1,
                lam: float = 0.5) -> torch.Tensor:
    """sum_k T_k max(0, m+ - a_k)^2 + lam (1 - T_k) max(0, a_k - m-)^2, summed over classes k, mean over
    the batch. scores (B, K) in [0, 1], y (B,) class indices."""
    t = F.one_hot(y, scores.shape[1]).to(scores.dtype)                      # (B, K)
    pos = t * F.relu(m_pos - scores) ** 2
    neg = lam * (1.0 - t) * F.relu(scores - m_neg) ** 2
    return (pos + neg).sum(1).mean()


def reconstruction_loss(recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Sum of squared pixel errors per image, mean over the batch. recon (B, C*H*W), x (B, C, H, W)."""
    return ((recon - x.reshape(x.shape[0], -1)) ** 2).sum(1).mean()


def total_loss(out, x: torch.Tensor, y: torch.Tensor, recon_weight: float):
    """margin + recon_weight * reconstruction (the latter only when the model has a decoder; "recon" is
    0 without one).

    out is a `capsmodels.networks.NetOutput`. Returns (loss, parts) with parts = {"margin", "recon",
    "total"}: detached 0-dim tensors (float() them to log; no device sync happens here).
    """
    margin = margin_loss(out.scores, y)
    if out.recon is not None:                   # logged even at weight 0 (then without a graph)
        if recon_weight > 0:
            recon = reconstruction_loss(out.recon, x)
            loss = margin + recon_weight * recon
        else:
            with torch.no_grad():
                recon = reconstruction_loss(out.recon, x)
            loss = margin
    else:
        recon = torch.zeros((), device=margin.device, dtype=margin.dtype)
        loss = margin
    return loss, {"margin": margin.detach(), "recon": recon.detach(), "total": loss.detach()}
