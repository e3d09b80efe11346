"""Hand-computed values for the losses of Eq. 1 / Eq. 4."""
import math

import pytest
import torch

from types import SimpleNamespace

from dart_core.losses import class_ranking_loss, loss_terms, penalty_loss, ranking_loss, wps_loss
from dart_core.model import DARTConfig


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


def test_class_ranking_loss_hand_computed():
    # class 0 over 4 images: positives 0.5 (img 0), 0.9 (img 1); negatives 0.2 (img 2), 1.2 (img 3).
    # pairs (neg, pos): 1+0.2-0.5=0.7, 1+1.2-0.5=1.7, 1+0.2-0.9=0.3, 1+1.2-0.9=1.3 -> 4.0 / 4 = 1.0.
    # class 1: positive 3.0 (img 0), negatives 0.5, 2.5 (imgs 1, 2), unknown 9.0 (img 3):
    # 1+0.5-3 < 0 (not violating), 1+2.5-3=0.5 -> 0.5 / 1.
    # class 2: no positive -> not counted. Mean over the 2 counted classes: 0.75.
    s = torch.tensor([[0.5, 3.0, 0.0], [0.9, 0.5, 0.0], [0.2, 2.5, 0.0], [1.2, 9.0, 0.0]], requires_grad=True)
    y = torch.tensor([[1, 1, -1], [1, -1, -1], [-1, -1, -1], [-1, 0, -1]])
    loss = class_ranking_loss(s, y)
    assert loss.item() == pytest.approx(0.75)
    loss.backward()
    # d/ds: class 0 (weight 1/2 · 1/4): pos imgs 0, 1 each -2 pairs, neg imgs 2, 3 each +2 pairs;
    # class 1 (weight 1/2 · 1/1): the one violating pair: img 0 -1, img 2 +1
    expected = [[-0.25, -0.5, 0.0], [-0.25, 0.0, 0.0], [0.25, 0.5, 0.0], [0.25, 0.0, 0.0]]
    assert torch.allclose(s.grad, torch.tensor(expected))


def test_class_ranking_loss_is_the_per_image_loss_across_images():
    # the same hinge with the roles of images and classes swapped (every class has pairs here)
    g = torch.Generator().manual_seed(3)
    s = torch.randn(9, 4, generator=g)
    y = torch.tensor([[1, -1, 1, -1], [-1, 1, -1, 1], [1, 0, -1, 1]] * 3)
    assert class_ranking_loss(s, y, 0.3).item() == pytest.approx(ranking_loss(s.t(), y.t(), 0.3).item(), rel=1e-6)


def test_wps_mean_reduction_is_one_unit_per_known_pair():
    ln3 = math.log(3)
    S = torch.tensor([[[0.0, 2.0, 7.0], [ln3, -1.0, -7.0]]])
    S_star = torch.tensor([[[0.0, 5.0, 1.0], [0.0, 5.0, 1.0]]])
    y = torch.tensor([[1, -1, 0]])
    pos = -(3 / 8 * _logsig(0.0) + 5 / 8 * _logsig(ln3))
    # k_hard=2: the negative class averages its 2 hardest patches; 2 known pairs
    neg = -(_logsig(-2.0) + _logsig(1.0)) / 2
    assert wps_loss(S, S_star, y, 0.5, k_hard=2, reduction="mean").item() == pytest.approx((pos + neg) / 2, rel=1e-6)


def test_relative_penalty():
    d = torch.tensor([[[1.0, -3.0], [0.0, 4.0]]])
    x = torch.tensor([[[2.0, 2.0], [4.0, -4.0]]])
    # patch 0: 4 / 4 = 1; patch 1: 4 / 8 = 0.5 -> mean 0.75
    assert penalty_loss(d, x).item() == pytest.approx(0.75)


def test_wps_threshold_centres_the_sigmoid_on_the_class_s_best_patch_prior():
    # scale 10; prior best patches: class 0 0.3 and 0.1 in the two images -> θ_0 = 10 · 0.2 = 2.
    # The sigmoid sees S̃ - θ_c; the softmaxes (responsibilities) are unchanged by the shift.
    cfg = DARTConfig(rank_image_weight=0, rank_class_weight=0, wps_tau=10.0, wps_hard_share=0.5,
                     penalty="mean", gamma_penalty=0)
    prior = 10 * torch.tensor([[[0.3], [0.0]], [[0.1], [-0.2]]])
    refined = prior.clone()
    out = SimpleNamespace(logits=torch.zeros(2, 1), patch_logits=refined, prior_logits=prior, delta=torch.zeros(2, 2, 4),
                          extras={"scale": 10.0, "x_orig": torch.ones(2, 2, 4)})
    y = torch.tensor([[1], [-1]])
    terms = loss_terms(out, y, 1.0, cfg)
    z = torch.softmax(torch.tensor([3.0, 0.0]), 0)  # image 0: responsibilities at τ=10 over cos 0.3, 0
    pos = -(z[0] * _logsig(3.0 - 2.0) + z[1] * _logsig(0.0 - 2.0))
    neg = -_logsig(-(1.0 - 2.0))  # image 1, k = 1 hardest patch (S̃ = 1)
    assert terms["wps"][1].item() == pytest.approx((pos.item() + neg) / 2, rel=1e-6)
    no_threshold = loss_terms(out, y, 1.0, DARTConfig(**{**cfg.to_dict(), "wps_threshold": "none"}))
    pos0 = -(z[0] * _logsig(3.0) + z[1] * _logsig(0.0))
    assert no_threshold["wps"][1].item() == pytest.approx((pos0.item() - _logsig(-1.0)) / 2, rel=1e-6)
