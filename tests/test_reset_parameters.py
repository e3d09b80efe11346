"""reset_parameters() of the ARM and the ATM restores their documented initialisation (docs/model.md,
"Residual start"): after any change to the trainable weights, an untrained-state DART scores exactly
as the frozen VLP again."""
import pytest
import torch

from dart_core.atm import ATM, GATv2Residual, NeighbourTable
from dart_core.crg.graph import random_crg
from dart_core.model import DART
from tests.model_fixtures import NAMES, fixed_batch, tiny_clip_ckpt, tiny_config, vocab  # noqa: F401


def _model(ckpt, vocab) -> DART:
    torch.manual_seed(0)
    m = DART(tiny_config(pretrained=ckpt))
    m.set_classes(NAMES, random_crg(vocab, 3, seed=1).edge_index(vocab))
    return m


def _trainable(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def _perturb(*modules: torch.nn.Module, value: float | None = None) -> None:
    with torch.no_grad():
        for module in modules:
            for p in module.parameters():
                if p.requires_grad:
                    p.fill_(value) if value is not None else p.normal_(0, 0.05)


def _vlp_scores(m: DART, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        g = torch.nn.functional.normalize(m.backbone.clip.encode_image(x).float(), dim=-1)
        return m.scale * g @ m.text.T


@pytest.mark.parametrize("redraw", [True, False])
def test_reset_makes_a_perturbed_dart_score_exactly_as_the_frozen_vlp_again(tiny_clip_ckpt, vocab, redraw):
    m = _model(tiny_clip_ckpt, vocab)
    x, _ = fixed_batch(5)
    vlp = _vlp_scores(m, x)
    m.eval()
    with torch.no_grad():
        assert torch.allclose(m(x).logits, vlp, atol=1e-5)  # fills the Text-ATM cache too
        _perturb(m.arm, m.atm)
        out = m(x)
    assert out.delta.abs().sum() > 0 and not torch.allclose(out.logits, vlp, atol=1e-3)

    m.arm.reset_parameters(redraw=redraw)
    m.atm.reset_parameters(redraw=redraw)
    with torch.no_grad():
        out = m(x)
    assert torch.count_nonzero(out.delta) == 0  # Δx̃ = 0 exactly: S̃ = S*
    assert torch.allclose(out.patch_logits, out.prior_logits)
    assert torch.allclose(out.logits, vlp, atol=1e-5)
    assert torch.allclose(out.logits, out.zero_shot, atol=1e-5)
    m.train()  # the training forward too (no Text-ATM cache)
    assert torch.allclose(m(x).logits, vlp, atol=1e-5)


def test_the_constructor_applies_the_same_init_as_reset_parameters(tiny_clip_ckpt, vocab):
    """The constructor ends with reset_parameters(redraw=False): on a fresh model it changes nothing,
    and it keeps the weights its layers drew (so a seed's initial weights stay what they were)."""
    m = _model(tiny_clip_ckpt, vocab)
    before = _trainable(m)
    m.arm.reset_parameters(redraw=False)
    m.atm.reset_parameters(redraw=False)
    after = _trainable(m)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[n], after[n]) for n in before)
    again = _model(tiny_clip_ckpt, vocab)  # same seed, same weights
    assert all(torch.equal(before[n], p) for n, p in _trainable(again).items())


def test_the_documented_init_after_reset(tiny_clip_ckpt, vocab):
    m = _model(tiny_clip_ckpt, vocab)
    frozen_k = m.arm.layers[-1].attn.k.weight.detach().clone()
    _perturb(m.arm, m.atm, value=3.0)
    kept = _trainable(m)
    m.arm.reset_parameters(redraw=False)
    m.atm.reset_parameters(redraw=False)

    for i, layer in enumerate(m.arm.layers):
        grid = torch.randn(2, layer.dwconv.in_channels, *layer.grid)
        assert torch.equal(layer.dwconv(grid), grid)  # DW-conv = identity
        for name in ("q", "out"):
            lin = getattr(layer.attn, name)
            assert torch.count_nonzero(lin.lora_B["default"].weight) == 0  # LoRA B = 0
            # LoRA A is random: kept without redraw
            assert torch.equal(lin.lora_A["default"].weight, kept[f"arm.layers.{i}.attn.{name}.lora_A.default.weight"])
        for ln in (layer.ln_q, layer.ln_kv):
            assert torch.equal(ln.weight, torch.ones_like(ln.weight)) and torch.count_nonzero(ln.bias) == 0
    assert torch.count_nonzero(m.arm.ffn[-1].weight) == 0 and torch.count_nonzero(m.arm.ffn[-1].bias) == 0
    assert torch.equal(m.arm.ffn[1].weight, kept["arm.ffn.1.weight"])  # random: kept without redraw
    assert torch.equal(m.arm.layers[-1].attn.k.weight, frozen_k)  # frozen copies untouched

    assert torch.count_nonzero(m.atm.fnn_out.weight) == 0 and torch.count_nonzero(m.atm.fnn_out.bias) == 0
    for layer in (*m.atm.text_layers, *m.atm.mm_layers):
        assert torch.count_nonzero(layer.gamma) == 0  # LayerScale = 0
    assert torch.equal(m.atm.fnn_vis.weight, kept["atm.fnn_vis.weight"])


def test_redraw_draws_the_random_weights_again_from_their_defaults(tiny_clip_ckpt, vocab):
    m = _model(tiny_clip_ckpt, vocab)
    fixed = {n for n, p in _trainable(m).items() if not p.any() or n.endswith(("dwconv.weight", "dwconv.bias"))}
    _perturb(m.arm, m.atm, value=3.0)
    torch.manual_seed(7)
    m.arm.reset_parameters()
    m.atm.reset_parameters()
    first = _trainable(m)
    for n, p in first.items():
        if n.startswith("arm.") and (".ln_" in n or ".ffn.0." in n):
            continue  # LayerNorms: back to (1, 0)
        if n not in fixed and not n.endswith(("in_proj_bias", "out_proj.bias", "conv.bias")):
            assert p.abs().max() < 1.0 and p.std() > 0, n  # drawn again (default inits are O(1/sqrt(fan_in)))
    # the same seed draws the same weights
    _perturb(m.arm, m.atm)
    torch.manual_seed(7)
    m.arm.reset_parameters()
    m.atm.reset_parameters()
    assert all(torch.equal(first[n], p) for n, p in _trainable(m).items())


def test_a_reset_atm_is_the_identity():
    torch.manual_seed(0)
    C, D, B = 9, 16, 3
    edges = torch.cat([torch.randint(0, C, (2, 20)), torch.arange(C).repeat(2, 1)], 1)
    graph = NeighbourTable.from_edge_index(edges, C)
    atm = ATM(D, heads=2)
    t, x_vis = torch.randn(C, D), torch.randn(B, C, D)
    _perturb(atm)
    with torch.no_grad():
        assert not torch.allclose(atm.multimodal(atm.fuse(x_vis, atm.text(t, graph)), graph), x_vis)
        atm.reset_parameters()
        h_txt = atm.text(t, graph)
        assert torch.equal(h_txt, t)
        assert torch.equal(atm.multimodal(atm.fuse(x_vis, h_txt), graph), x_vis)


def test_gatv2_residual_reset_restores_its_layerscale_init():
    layer = GATv2Residual(8, heads=2, layerscale_init=0.1)
    assert torch.equal(layer.gamma, torch.full((8,), 0.1))
    _perturb(layer)
    layer.reset_parameters()
    assert torch.equal(layer.gamma, torch.full((8,), 0.1))
