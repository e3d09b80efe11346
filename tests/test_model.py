"""The DART model: frozen main stream, where gradients go, LoRA placement, open vocabulary."""
import pytest
import torch

from dart_core.backbone import BackboneError, FrozenBackbone
from dart_core.losses import total_loss
from dart_core.model import DART
from tests.model_fixtures import NAMES, fixed_batch, other_clip_ckpt, tiny_clip_ckpt, tiny_config, tiny_model, vocab  # noqa: F401


def test_local_checkpoint_loads_through_open_clip(tiny_clip_ckpt):
    b = FrozenBackbone("dart-tiny-vit", pretrained=tiny_clip_ckpt)
    saved = torch.load(tiny_clip_ckpt, weights_only=True)
    assert torch.equal(b.clip.visual.proj, saved["visual.proj"])
    assert all(not p.requires_grad for p in b.parameters())
    b.train()
    assert not b.training  # the backbone stays in eval mode


def test_backbone_errors_are_clear(tmp_path):
    with pytest.raises(BackboneError, match="unknown open_clip model 'No-Such-ViT'"):
        FrozenBackbone("No-Such-ViT", pretrained=None)
    with pytest.raises(BackboneError, match="not found"):
        FrozenBackbone("dart-tiny-vit", pretrained=str(tmp_path / "missing.pt"))
    with pytest.raises(BackboneError, match="no '\\{\\}'"):
        FrozenBackbone("dart-tiny-vit", pretrained=None, prompt_template="a photo")


def test_main_stream_bit_identical_with_and_without_arm(tiny_clip_ckpt):
    x, _ = fixed_batch(4)
    b = FrozenBackbone("dart-tiny-vit", pretrained=tiny_clip_ckpt)
    ref = b.clip.encode_image(x)
    with_arm = DART(tiny_config(pretrained=tiny_clip_ckpt), backbone=b)
    with_arm.set_classes(NAMES)
    without = DART(tiny_config(pretrained=tiny_clip_ckpt, use_arm=False), backbone=b)
    without.set_classes(NAMES)
    # make the ARM do something: random LoRA/FFN weights
    with torch.no_grad():
        for n, p in with_arm.arm.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    f0 = b.forward_features(x, 0)
    f2 = b.forward_features(x, 2)
    assert torch.equal(f0.global_feature, ref) and torch.equal(f2.global_feature, ref)
    assert torch.equal(f0.patch_features, f2.patch_features)
    o1, o2 = with_arm(x), without(x)
    assert torch.equal(o1.zero_shot, o2.zero_shot)
    assert torch.equal(o1.prior_logits, o2.prior_logits)
    assert o1.delta.abs().sum() > 0 and not torch.equal(o1.patch_logits, o2.patch_logits)
    assert torch.equal(b.clip.encode_image(x), ref)  # nothing in the backbone changed


@pytest.mark.parametrize("gate", ["vector", "scalar"])
def test_untrained_dart_scores_exactly_as_the_frozen_vlp(tiny_clip_ckpt, vocab, gate):
    """Residual init: ARM and ATM on, a real CRG, any vocabulary — ŷ = s·cos(global, t_c) exactly,
    also with classes added at inference."""
    from dart_core.crg.graph import random_crg

    torch.manual_seed(0)
    m = DART(tiny_config(pretrained=tiny_clip_ckpt, patch_gate=gate))
    m.set_classes(NAMES, random_crg(vocab, 3, seed=1).edge_index(vocab))
    x, _ = fixed_batch(5)
    m.eval()
    with torch.no_grad():
        out = m(x)
        g = torch.nn.functional.normalize(m.backbone.clip.encode_image(x).float(), dim=-1)
        vlp = m.scale * g @ m.text.T
    assert torch.allclose(out.logits, vlp, atol=1e-5)
    assert torch.allclose(out.logits, out.zero_shot, atol=1e-5)
    m.train()  # the training forward too
    assert torch.allclose(m(x).logits, vlp, atol=1e-5)


def test_arm_starts_as_identity(tiny_model):
    x, _ = fixed_batch(2)
    out = tiny_model(x)
    assert torch.count_nonzero(out.delta) == 0
    assert torch.allclose(out.patch_logits, out.prior_logits)


def test_lora_only_on_q_and_out_with_paper_rank(tiny_clip_ckpt):
    m = DART(tiny_config(pretrained=tiny_clip_ckpt, lora_r=32, lora_alpha=128))
    for layer in m.arm.layers:
        lora = {n for n, p in layer.attn.named_parameters() if p.requires_grad}
        assert lora == {"q.lora_A.default.weight", "q.lora_B.default.weight",
                        "out.lora_A.default.weight", "out.lora_B.default.weight"}
        assert layer.attn.q.lora_A["default"].weight.shape == (32, 64)
        assert layer.attn.q.scaling["default"] == 128 / 32
        assert not hasattr(layer.attn.k, "lora_A") and not hasattr(layer.attn.v, "lora_A")
        # the copies hold the frozen block's weights
    blk = m.backbone.blocks[-1]
    d = blk.attn.embed_dim
    assert torch.equal(m.arm.layers[-1].attn.k.weight, blk.attn.in_proj_weight[d:2 * d])
    assert torch.equal(m.arm.layers[-1].attn.out.base_layer.weight, blk.attn.out_proj.weight)


def test_gradients_reach_only_arm_atm_and_the_patch_weight(tiny_model):
    x, y = fixed_batch(4)
    # one optimiser step so the zero-initialised layers stop blocking gradients
    opt = torch.optim.SGD([p for p in tiny_model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(4):  # zero-initialised FFN out, LoRA B: gradients reach deeper each step
        opt.zero_grad()
        loss, _ = total_loss(tiny_model(x), y, 0.5, tiny_model.cfg)
        loss.backward()
        opt.step()
    for n, p in tiny_model.named_parameters():
        if n.startswith("backbone.") or ".base_layer." in n or n.split(".")[-2:-1] in (["k"], ["v"], ["ln_1"]):
            assert p.grad is None and not p.requires_grad, n
        else:
            assert p.requires_grad, n
            assert p.grad is not None and p.grad.abs().sum() > 0, n
    prefixes = {n.split(".")[0] for n, p in tiny_model.named_parameters() if p.requires_grad}
    assert prefixes == {"arm", "atm", "patch_gate"}


def test_ablation_switches_change_the_parameter_set(tiny_clip_ckpt):
    full = DART(tiny_config(pretrained=tiny_clip_ckpt)).parameter_counts()
    no_arm = DART(tiny_config(pretrained=tiny_clip_ckpt, use_arm=False)).parameter_counts()
    no_atm = DART(tiny_config(pretrained=tiny_clip_ckpt, use_atm=False)).parameter_counts()
    assert no_arm["arm"] == 0 and no_atm["atm"] == 0
    assert full["trainable"] == no_arm["trainable"] + full["arm"] == no_atm["trainable"] + full["atm"]


def test_new_classes_at_inference_without_retraining(tiny_model):
    x, _ = fixed_batch(3)
    with torch.no_grad():
        before = tiny_model(x).logits
    C = len(NAMES)
    old_edges = tiny_model.edge_index
    # two new classes linked to each other only: the old classes' scores must not move
    new_edges = torch.tensor([[C, C + 1], [C + 1, C]])
    tiny_model.set_classes(NAMES + ["zebra", "giraffe"], torch.cat([old_edges, new_edges, torch.arange(C, C + 2).repeat(2, 1)], 1))
    with torch.no_grad():
        after = tiny_model(x).logits
    assert after.shape == (3, C + 2)
    assert torch.allclose(after[:, :C], before, atol=1e-5)
    with pytest.raises(ValueError, match="refers to class"):
        tiny_model.set_classes(["a", "b"], torch.tensor([[0, 5], [1, 1]]))


def test_bounded_mm_atm_equals_exact_when_candidates_cover_all(tiny_model):
    x, _ = fixed_batch(3)
    with torch.no_grad():
        for p in tiny_model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    tiny_model.eval()
    C = len(NAMES)
    with torch.no_grad():
        exact = tiny_model(x).logits
        # the candidate path with every class as a candidate, in a scrambled order per image
        t = tiny_model.text
        h_txt = tiny_model.atm.text(t, tiny_model.graph)
        out = tiny_model(x)
        feats = tiny_model.backbone.forward_features(x, tiny_model.cfg.arm_layers)
        x_ref = torch.nn.functional.normalize(feats.patch_features + tiny_model.arm(feats), dim=-1)
        g = torch.nn.functional.normalize(feats.global_feature, dim=-1)
        x_vis = tiny_model.class_attentive(x_ref, g, out.topk)
        cand = torch.stack([torch.randperm(C) for _ in range(3)])
        h = tiny_model.atm.multimodal_candidates(x_vis, h_txt, tiny_model.graph, cand)
        scores = tiny_model.scale * (torch.nn.functional.normalize(h, dim=-1) * t[cand]).sum(-1)
        assert torch.allclose(torch.zeros_like(exact).scatter(1, cand, scores), exact, atol=1e-4)
        # with fewer candidates, the top candidates are rescored and the rest keep the pre-ATM score
        tiny_model.mm_candidates = 3
        bounded = tiny_model(x).logits
        pre = tiny_model.scale * torch.einsum("bcd,cd->bc", torch.nn.functional.normalize(x_vis, dim=-1), t)
        top = pre.topk(3, dim=1).indices
        rest = torch.ones_like(pre, dtype=torch.bool).scatter(1, top, False)
        assert torch.allclose(bounded[rest], pre[rest], atol=1e-5)


def test_text_atm_cache_follows_weights_and_vocabulary(tiny_model):
    x, _ = fixed_batch(2)
    tiny_model.eval()
    with torch.no_grad():
        for p in tiny_model.parameters():
            if p.requires_grad:  # a "trained" model: zero-initialised layers would hide h_txt
                p.normal_(0, 0.1)
        a = tiny_model(x).logits
        assert torch.equal(tiny_model(x).logits, a)  # served from the cache
        for p in tiny_model.atm.text_layers.parameters():
            p.add_(0.5)  # an in-place update (as an optimiser step) invalidates it
        b = tiny_model(x).logits
    assert not torch.allclose(a, b)
    with torch.no_grad():
        ref = tiny_model.atm.text(tiny_model.text, tiny_model.graph)
        assert torch.equal(tiny_model._text_atm(), ref)
    tiny_model.set_classes(NAMES[:3])
    with torch.no_grad():
        assert tiny_model(x).logits.shape == (2, 3)


def test_unreachable_pretrained_weights_fail_fast_with_the_fix(tmp_path):
    """No cached weights and no way to the hub: one error within seconds, not a minute of
    huggingface_hub retries. The hub endpoint is pointed at a closed loopback port, so the test
    means the same with or without internet."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO, free_port

    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=f"http://127.0.0.1:{free_port()}")
    script = ("import time\nfrom dart_core.backbone import BackboneError, FrozenBackbone\nt = time.time()\n"
              "try:\n    FrozenBackbone('ViT-B-32', 'laion2b_s34b_b79k')\n"
              "except BackboneError as e:\n    print(f'{time.time() - t:.2f}'); print(e)\n")
    r = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    lines = r.stdout.splitlines()
    assert r.returncode == 0 and len(lines) == 2, r.stdout + r.stderr
    assert float(lines[0]) < 10
    assert lines[1].startswith(
        f"cannot fetch the pretrained weights ViT-B-32/laion2b_s34b_b79k: they are not in the local cache "
        f"({tmp_path / 'hf' / 'hub'}) and 127.0.0.1 cannot be reached (ConnectionRefusedError: ")
    assert lines[1].endswith("download the checkpoint file on a connected machine and pass --pretrained /path/to/file.pt")
    assert "Retrying" not in r.stderr


def test_no_warning_about_intended_random_init(caplog):
    import logging

    import open_clip

    with caplog.at_level(logging.WARNING):
        FrozenBackbone("dart-tiny-vit", pretrained=None)  # asked for: random weights
    assert [r.getMessage() for r in caplog.records] == []
    with caplog.at_level(logging.WARNING):
        open_clip.create_model("dart-tiny-vit")  # the same build outside our guard does warn
    assert [r.getMessage() for r in caplog.records] == [
        "No pretrained weights loaded for model 'dart-tiny-vit'. Model initialized randomly."]


def test_importing_the_model_shows_no_library_future_warning():
    import subprocess
    import sys

    from tests.conftest import REPO

    r = subprocess.run([sys.executable, "-W", "error::FutureWarning", "-c", "import dart_core.model"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
