"""Hand-computed values for the losses of Eq. 1 / Eq. 4."""
import math

import pytest
import torch

from dart_core.losses import penalty_loss, ranking_loss, wps_loss


def test_ranking_loss_hand_computed():
    # one positive (0.5), negatives 0.2 and 0.9: hinges 1+0.2-0.5=0.7, 1+0.9-0.5=1.4 -> 2.1 / 2 pairs
    s = torch.tensor([[0.5, 0.2, 0.9]])
    y = torch.tensor([[1, -1, -1]])
    assert ranking_loss(s, y).item() == pytest.approx(1.05)


def test_ranking_loss_counts_only_violating_pairs_and_ignores_unknown():
    # image 0: pos 3.0, 0.1; neg 0.0 (pairs: 1+0-3 <0 no, 1+0-0.1=0.9 yes), unknown 10.0 ignored
    # image 1: no violating pair -> 0; image 2: no positive -> 0. Mean over the 3 images.
    s = torch.tensor([[3.0, 0.1, 0.0, 10.0], [5.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0]])
    y = torch.tensor([[1, 1, -1, 0], [1, -1, 0, 0], [-1, -1, 0, 0]])
    assert ranking_loss(s, y).item() == pytest.approx(0.9 / 3)


def test_ranking_loss_margin():
    s = torch.tensor([[0.5, 0.2]])
    y = torch.tensor([[1, -1]])
    assert ranking_loss(s, y, margin=0.2).item() == pytest.approx(0.0)
    assert ranking_loss(s, y, margin=0.5).item() == pytest.approx(0.2)


def _logsig(x):
    return -math.log1p(math.exp(-x))


def test_wps_loss_hand_computed():
    ln3 = math.log(3)
    # B=1, P=2 patches, C=3 classes: class 0 positive, class 1 negative, class 2 unknown
    S = torch.tensor([[[0.0, 2.0, 7.0], [ln3, -1.0, -7.0]]], requires_grad=True)  # S~ (1,2,3)
    S_star = torch.tensor([[[0.0, 5.0, 1.0], [0.0, 5.0, 1.0]]])  # S* (1,2,3)
    y = torch.tensor([[1, -1, 0]])
    lam = 0.5
    # positive: z = softmax([0, ln3]) = [1/4, 3/4]; z* = [1/2, 1/2]; z' = [3/8, 5/8]
    pos = -(3 / 8 * _logsig(0.0) + 5 / 8 * _logsig(ln3))
    # negative, k_hard=1: the hardest patch has S~ = 2 -> -log sigma(-2)
    neg = -_logsig(-2.0)
    loss = wps_loss(S, S_star, y, lam, k_hard=1)
    assert loss.item() == pytest.approx(pos + neg, rel=1e-6)
    loss.backward()
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    # d/dS of -z' log sigma(S) with z' detached = -z'(1 - sigma(S)); only the hard negative patch
    # gets gradient sigma(S); the unknown class none.
    expected = [[-(3 / 8) * (1 - sig(0.0)), sig(2.0), 0.0], [-(5 / 8) * (1 - sig(ln3)), 0.0, 0.0]]
    assert torch.allclose(S.grad[0], torch.tensor(expected), atol=1e-6)


def test_wps_lambda_one_uses_only_the_prior():
    S = torch.tensor([[[0.0], [0.0]]])
    S_star = torch.tensor([[[0.0], [math.log(3)]]])  # z* = [1/4, 3/4]
    y = torch.tensor([[1]])
    # S~ = 0 everywhere, so -sum z'_i log sigma(0) = log 2 whatever z' is (it sums to 1)
    assert wps_loss(S, S_star, y, 1.0).item() == pytest.approx(math.log(2))
    S2 = torch.tensor([[[0.0], [1.0]]])
    expected = -(0.25 * _logsig(0.0) + 0.75 * _logsig(1.0))
    assert wps_loss(S2, S_star, y, 1.0).item() == pytest.approx(expected, rel=1e-6)


def test_wps_batch_mean_and_default_k():
    # two images; image 1 has only unknown labels -> contributes 0; mean over batch of 2
    S = torch.zeros(2, 20, 1)
    S[0, :, 0] = torch.arange(20.0)  # negative class: the top 16 patches are 4..19
    y = torch.tensor([[-1], [0]])
    expected = sum(-_logsig(-float(v)) for v in range(4, 20)) / 2
    assert wps_loss(S, S, y, 0.3).item() == pytest.approx(expected, rel=1e-5)


def test_wps_rejects_mismatched_labels():
    with pytest.raises(ValueError, match="do not match"):
        wps_loss(torch.zeros(1, 4, 3), torch.zeros(1, 4, 3), torch.zeros(1, 2), 0.5)


def test_penalty_is_mean_absolute_value():
    d = torch.tensor([[[1.0, -3.0], [0.0, 4.0]]])
    assert penalty_loss(d).item() == pytest.approx(2.0)


def test_wps_responsibility_temperature():
    ln3 = math.log(3)
    S = torch.tensor([[[0.0], [ln3]]])  # one positive class, two patches
    S_star = torch.tensor([[[ln3], [0.0]]])
    y = torch.tensor([[1]])
    # resp_scale 2 sharpens both softmaxes: z = softmax([0, 2 ln3]) = [1/10, 9/10],
    # z* = [9/10, 1/10]; λ = 0.25 -> z' = [0.25*0.9 + 0.75*0.1, 0.25*0.1 + 0.75*0.9] = [0.3, 0.7];
    # the σ terms keep the unscaled S~.
    expected = -(0.3 * _logsig(0.0) + 0.7 * _logsig(ln3))
    assert wps_loss(S, S_star, y, 0.25, resp_scale=2.0).item() == pytest.approx(expected, rel=1e-6)
    # resp_scale 1 is the plain loss: z = [1/4, 3/4], z* = [3/4, 1/4] -> z' = [3/8, 5/8]
    plain = -(3 / 8 * _logsig(0.0) + 5 / 8 * _logsig(ln3))
    assert wps_loss(S, S_star, y, 0.25).item() == pytest.approx(plain, rel=1e-6)
