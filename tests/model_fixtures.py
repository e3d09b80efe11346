"""Tiny open_clip backbones and checkpoints made by the tests (no network, no downloaded weights)."""
from __future__ import annotations

import pytest
import torch

from dart_core.crg.graph import random_crg
from dart_core.model import DART, DARTConfig
from dart_core.vocab import Vocabulary

TINY = "dart-tiny-vit"
NAMES = ["cat", "dog", "car", "tree", "sky", "boat"]


def tiny_config(**kw) -> DARTConfig:
    base = dict(backbone=TINY, pretrained=None, top_k_share=0.25, wps_hard_share=0.25, arm_layers=2, gat_heads=2)
    base.update(kw)
    return DARTConfig(**base)


def make_clip_checkpoint(path, seed: int) -> str:
    """A tiny CLIP's weights, saved the way open_clip checkpoints are (a state_dict file)."""
    import open_clip

    from dart_core.backbone import register_model_configs

    register_model_configs()
    torch.manual_seed(seed)
    model = open_clip.create_model(TINY, pretrained=None)
    torch.save(model.state_dict(), path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_clip_ckpt(tmp_path_factory):
    return make_clip_checkpoint(tmp_path_factory.mktemp("clip") / "tiny_a.pt", seed=1)


@pytest.fixture(scope="session")
def other_clip_ckpt(tmp_path_factory):
    return make_clip_checkpoint(tmp_path_factory.mktemp("clip") / "tiny_b.pt", seed=2)


@pytest.fixture
def vocab():
    return Vocabulary.from_names(NAMES, unseen={"boat", "sky"})


@pytest.fixture
def tiny_model(tiny_clip_ckpt, vocab):
    torch.manual_seed(0)
    m = DART(tiny_config(pretrained=tiny_clip_ckpt))
    m.set_classes(list(vocab.names), random_crg(vocab, 2, seed=0).edge_index(vocab))
    return m


def fixed_batch(n=16, C=len(NAMES), seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = ((torch.rand(n, C, generator=g) < 0.35).to(torch.int8) * 2 - 1)
    y[0, 0] = 0  # some unknown labels too
    y[min(3, n - 1), 2] = 0
    return x, y
