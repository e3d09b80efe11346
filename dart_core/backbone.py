"""The frozen VLP backbone: an open_clip CLIP model whose weights never change (paper Sec. 3.1).

It exposes what DART needs: class text embeddings (prompt template configurable), the inputs and
outputs of the last `n_blocks` vision blocks (the ARM runs beside them), the patch tokens after
`ln_post` + visual projection, the global image feature, and `logit_scale`.

The main stream is computed by exactly the modules and operations of open_clip's own
`VisionTransformer.forward`, so `global_feature` is bit-identical to `model.encode_image` and
nothing DART attaches can change it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

_CONFIG_DIR = Path(__file__).with_name("model_configs")
_registered = False


class BackboneError(ValueError):
    """A backbone that cannot be loaded or is not a ViT DART can attach to."""


def register_model_configs(extra_dir: str | Path | None = None) -> None:
    """Make the project's model configs (tiny test/demo CLIPs) known to open_clip by name."""
    global _registered
    import open_clip

    if not _registered:
        open_clip.add_model_config(_CONFIG_DIR)
        _registered = True
    if extra_dir is not None:
        open_clip.add_model_config(Path(extra_dir))


def patch_grid(model_name: str) -> tuple[int, int]:
    """The patch grid (rows, cols) of an open_clip ViT config, without building the model."""
    import open_clip

    register_model_configs()
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise BackboneError(f"unknown open_clip model {model_name!r}")
    v = cfg["vision_cfg"]
    size, patch = v.get("image_size", 224), v.get("patch_size", 16)
    size = (size, size) if isinstance(size, int) else tuple(size)
    return size[0] // patch, size[1] // patch


@dataclass
class VisionFeatures:
    block_inputs: list[torch.Tensor]  # x_orig^{l-1} for the last n blocks, (B, 1+P, width) each
    block_outputs: list[torch.Tensor]  # x_orig^{l}   for the same blocks
    patch_features: torch.Tensor  # (B, P, D): ln_post + proj of the patch tokens (not normalised)
    global_feature: torch.Tensor  # (B, D): the CLIP image embedding (not normalised)
    grid: tuple[int, int]


class FrozenBackbone(nn.Module):
    def __init__(self, model_name: str = "ViT-B-16", pretrained: str | None = "openai",
                 prompt_template: str | list[str] = "a photo of a {}.", device: str | torch.device = "cpu",
                 cache_dir: str | None = None):
        super().__init__()
        import open_clip

        register_model_configs()
        if model_name not in open_clip.list_models():
            raise BackboneError(f"unknown open_clip model {model_name!r} (see open_clip.list_models())")
        if pretrained and (pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")) or "/" in pretrained):
            if not Path(pretrained).is_file():
                raise BackboneError(f"pretrained checkpoint {pretrained!r} not found")
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=pretrained or None, device=device, cache_dir=cache_dir)
        except RuntimeError as e:  # open_clip's message for unknown tags / mismatched state dicts
            raise BackboneError(f"cannot load {model_name!r} with pretrained={pretrained!r}: {e}") from None
        self.model_name = model_name
        self.pretrained = pretrained
        self.clip = model.eval()
        self.clip.requires_grad_(False)
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.templates = [prompt_template] if isinstance(prompt_template, str) else list(prompt_template)
        for t in self.templates:
            if "{}" not in t:
                raise BackboneError(f"prompt template {t!r} has no '{{}}' for the class name")
        v = self.clip.visual
        if not hasattr(v, "transformer") or getattr(v, "attn_pool", None) is not None or v.pool_type != "tok":
            raise BackboneError(f"{model_name}: DART needs a ViT with a class token (pool_type 'tok', no attentional pool)")
        self.width = v.transformer.width
        self.heads = v.transformer.resblocks[0].attn.num_heads
        self.embed_dim = v.output_dim
        self.n_layers = len(v.transformer.resblocks)

    # The backbone never trains, whatever the caller does with .train().
    def train(self, mode: bool = True):
        super().train(False)
        return self

    @property
    def blocks(self) -> nn.ModuleList:
        return self.clip.visual.transformer.resblocks

    @property
    def logit_scale(self) -> float:
        """exp of CLIP's learned temperature: the fixed score scale and the WPS τ (App. A)."""
        return float(self.clip.logit_scale.exp())

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.clip.visual.grid_size)

    @torch.no_grad()
    def text_embeddings(self, names: list[str], batch_size: int = 256) -> torch.Tensor:
        """(C, D) L2-normalised; the mean over templates when several are given (then re-normalised)."""
        device = next(self.clip.parameters()).device
        out = []
        for start in range(0, len(names), batch_size):
            chunk = names[start:start + batch_size]
            emb = 0
            for t in self.templates:
                tokens = self.tokenizer([t.format(n) for n in chunk]).to(device)
                emb = emb + F.normalize(self.clip.encode_text(tokens).float(), dim=-1)
            out.append(F.normalize(emb, dim=-1))
        return torch.cat(out)

    @torch.no_grad()
    def forward_features(self, images: torch.Tensor, n_blocks: int = 0) -> VisionFeatures:
        """Run the frozen vision tower once, keeping what the ARM needs from its last `n_blocks`."""
        v = self.clip.visual
        if images.shape[-2:] != tuple(v.image_size):
            raise BackboneError(f"images are {tuple(images.shape[-2:])}, the backbone expects {tuple(v.image_size)}")
        x = v._embeds(images)
        first_kept = self.n_layers - n_blocks
        ins, outs = [], []
        for i, blk in enumerate(v.transformer.resblocks):  # same loop as open_clip Transformer.forward
            if i >= first_kept:
                ins.append(x)
            x = blk(x, attn_mask=None)
            if i >= first_kept:
                outs.append(x)
        pooled, _ = v._pool(x)
        global_feature = pooled @ v.proj if v.proj is not None else pooled
        patches = v.ln_post(x[:, 1:])
        if v.proj is not None:
            patches = patches @ v.proj
        return VisionFeatures(ins, outs, patches, global_feature, self.grid_size)
