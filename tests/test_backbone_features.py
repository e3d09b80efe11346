"""FrozenBackbone.forward_features through open_clip's public Transformer.forward_intermediates:
the ARM's block inputs and outputs are those of a plain loop over the blocks, bit for bit, for
every number of kept blocks (none, one, all but one, all: then the first input is the embedded
image itself)."""
import pytest
import torch

from dart_core.backbone import FrozenBackbone
from tests.model_fixtures import fixed_batch, tiny_clip_ckpt  # noqa: F401


@pytest.fixture(scope="module")
def backbone(tiny_clip_ckpt):  # noqa: F811
    return FrozenBackbone("dart-tiny-vit", pretrained=tiny_clip_ckpt)


def plain_loop(backbone: FrozenBackbone, images: torch.Tensor) -> tuple[list, list, torch.Tensor]:
    """Every block's input and output, and the last output, by calling the blocks one by one."""
    v = backbone.clip.visual
    x = v._embeds(images)
    ins, outs = [], []
    with torch.no_grad():
        for blk in v.transformer.resblocks:
            ins.append(x)
            x = blk(x, attn_mask=None)
            outs.append(x)
    return ins, outs, x


def test_kept_blocks_are_the_plain_loop_s(backbone):
    images, _ = fixed_batch(3)
    ins, outs, last = plain_loop(backbone, images)
    depth = backbone.n_layers
    assert depth >= 2
    for n in sorted({0, 1, depth - 1, depth}):
        f = backbone.forward_features(images, n)
        assert len(f.block_inputs) == len(f.block_outputs) == n
        for got, want in zip(f.block_inputs + f.block_outputs, ins[depth - n:] + outs[depth - n:]):
            assert torch.equal(got, want), n
        assert torch.equal(f.global_feature, backbone.clip.encode_image(images)), n
    # the last block's output is what the patch features come from
    v = backbone.clip.visual
    assert torch.equal(backbone.forward_features(images, 0).patch_features, v.ln_post(last[:, 1:]) @ v.proj)
