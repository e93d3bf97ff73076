"""Margin and reconstruction losses against values worked by hand."""
import pytest
import torch

from capsmodels.losses import margin_loss, reconstruction_loss, total_loss
from capsmodels.networks import NetOutput

SCORES = torch.tensor([[0.95, 0.3, 0.05], [0.2, 0.8, 0.5]], dtype=torch.float64)
Y = torch.tensor([0, 2])
# image 1 (class 0): present 0.95 > 0.9 -> 0; absent 0.3: 0.5*(0.2)^2 = 0.02; absent 0.05 < 0.1 -> 0
# image 2 (class 2): present (0.9-0.5)^2 = 0.16; absent 0.2: 0.5*0.1^2 = 0.005; absent 0.8: 0.5*0.7^2 = 0.245
# mean over images: (0.02 + 0.41) / 2 = 0.215
HAND_MARGIN = 0.215


def test_margin_loss_hand_computed():
    assert margin_loss(SCORES, Y).item() == pytest.approx(HAND_MARGIN, abs=1e-12)
    # other margins: m+ = 1, m- = 0, lambda = 1: (0.05^2 + 0.3^2 + 0.05^2 + 0.2^2 + 0.8^2 + 0.5^2) / 2
    got = margin_loss(SCORES, Y, m_pos=1.0, m_neg=0.0, lam=1.0).item()
    assert got == pytest.approx((0.0025 + 0.09 + 0.0025 + 0.04 + 0.64 + 0.25) / 2, abs=1e-12)


def test_reconstruction_loss_hand_computed():
    x = torch.ones(2, 1, 2, 2)
    recon = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 0.5, 1.0, 1.0]])
    assert reconstruction_loss(recon, x).item() == pytest.approx((4 + 0.25) / 2)


def test_total_loss_combines_parts():
    x = torch.ones(2, 1, 1, 3, dtype=torch.float64)
    recon = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    loss, parts = total_loss(NetOutput(SCORES, recon, []), x, Y, recon_weight=0.5)
    assert loss.item() == pytest.approx(HAND_MARGIN + 0.5 * 3)
    assert float(parts["margin"]) == pytest.approx(HAND_MARGIN) and float(parts["recon"]) == pytest.approx(3)
    assert float(parts["total"]) == pytest.approx(loss.item()) and not parts["total"].requires_grad
    loss.backward()
    assert recon.grad is not None
    loss0, parts0 = total_loss(NetOutput(SCORES, recon, []), x, Y, recon_weight=0.0)
    assert loss0.item() == pytest.approx(HAND_MARGIN) and float(parts0["recon"]) == pytest.approx(3)
    loss_cnn, parts_cnn = total_loss(NetOutput(SCORES, None, []), x, Y, recon_weight=0.5)
    assert loss_cnn.item() == pytest.approx(HAND_MARGIN) and float(parts_cnn["recon"]) == 0.0
