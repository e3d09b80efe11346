"""Adaptive Refinement Module (paper Sec. 3.2, App. A).

A parallel pathway beside the last `n_layers` frozen ViT blocks. Per ARM layer l:
  1. LoRA-augmented attention (Eq. 2-3) with the ARM's *own* q/k/v/out copies of the frozen block's
     attention weights; LoRA (peft, r=32, alpha=128) on q and out only. (peft on the fused
     nn.MultiheadAttention would adapt the whole qkv projection, so the copies are separate
     nn.Linear modules.) As in the frozen block, the input is pre-normalised by the block's ln_1.
  2. Depth-wise 3x3 conv over the patch grid (local context); the class token passes through.
  3. Cross-attention: query = the ARM features, key/value = the frozen block's output x_orig^l.
After the last layer an FFN maps the patch tokens to the residual Δx̃ in the projected embedding
space, and x̃ = x_orig + Δx̃ (the caller adds it).

Choices where the paper is silent (documented in README):
  * the ARM layers are chained: layer l's LoRA attention reads layer l-1's ARM output (the first
    reads x_orig^{l-1}), which is how "accumulated task-specific enhancement" reaches layer L;
  * the DW-conv starts as the identity and the FFN's last layer starts at zero, so at step 0
    Δx̃ = 0 and DART starts from the frozen VLP's patch features (LoRA's B is zero too).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dart_core.backbone import FrozenBackbone, VisionFeatures


class _LoRAAttention(nn.Module):
    """Self-attention with the frozen block's weights as four separate linears (Eq. 2-3)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        attn: nn.MultiheadAttention = block.attn
        d = attn.embed_dim
        self.heads = attn.num_heads
        self.ln_1 = _frozen_copy_layernorm(block.ln_1)
        w, b = attn.in_proj_weight.detach(), attn.in_proj_bias
        b = b.detach() if b is not None else torch.zeros(3 * d)
        self.q, self.k, self.v = (self._linear(w[i * d:(i + 1) * d], b[i * d:(i + 1) * d]) for i in range(3))
        self.out = self._linear(attn.out_proj.weight.detach(), attn.out_proj.bias.detach())
        self.requires_grad_(False)  # the copies stay frozen; peft adds the trainable low-rank parts

    @staticmethod
    def _linear(weight: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
        lin = nn.Linear(weight.shape[1], weight.shape[0])
        lin.weight.data.copy_(weight)
        lin.bias.data.copy_(bias)
        return lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, d = x.shape
        y = self.ln_1(x)

        def heads(t):
            return t.view(B, L, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = heads(self.q(y)), heads(self.k(y)), heads(self.v(y))  # Eq. 2 (LoRA on q)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, d)
        return self.out(a) + x  # Eq. 3 (LoRA on out), residual to x^{l-1}


def _frozen_copy_layernorm(ln: nn.LayerNorm) -> nn.LayerNorm:
    new = nn.LayerNorm(ln.normalized_shape, eps=ln.eps)
    new.load_state_dict(ln.state_dict())
    new.requires_grad_(False)
    return new


class ARMLayer(nn.Module):
    def __init__(self, block: nn.Module, grid: tuple[int, int]):
        super().__init__()
        self.attn = _LoRAAttention(block)
        d, h = self.attn.q.in_features, self.attn.heads
        self.grid = grid
        self.dwconv = nn.Conv2d(d, d, kernel_size=3, padding=1, groups=d)
        with torch.no_grad():  # identity at init: only the centre tap is 1
            self.dwconv.weight.zero_()
            self.dwconv.weight[:, 0, 1, 1] = 1.0
            self.dwconv.bias.zero_()
        self.ln_q = nn.LayerNorm(d)
        self.ln_kv = nn.LayerNorm(d)
        self.cross = nn.MultiheadAttention(d, h, batch_first=True)

    def forward(self, x_prev: torch.Tensor, x_orig_out: torch.Tensor) -> torch.Tensor:
        x_lora = self.attn(x_prev)  # Eq. 2-3
        cls, patches = x_lora[:, :1], x_lora[:, 1:]
        B, P, d = patches.shape
        gh, gw = self.grid
        grid = patches.transpose(1, 2).reshape(B, d, gh, gw)
        patches = self.dwconv(grid).reshape(B, d, P).transpose(1, 2)  # x_arm^dw = DWConv(x_arm^lora)
        x_dw = torch.cat([cls, patches], dim=1)
        kv = self.ln_kv(x_orig_out)
        # x_arm^l = Attn(Q = x_arm^dw, K = x_orig^l, V = x_orig^l)
        return self.cross(self.ln_q(x_dw), kv, kv, need_weights=False)[0]


class ARM(nn.Module):
    def __init__(self, backbone: FrozenBackbone, n_layers: int = 2, lora_r: int = 32, lora_alpha: int = 128,
                 ffn_hidden: int | None = None):
        super().__init__()
        from peft import LoraConfig, inject_adapter_in_model

        if not 1 <= n_layers <= backbone.n_layers:
            raise ValueError(f"arm_layers={n_layers} must be in 1..{backbone.n_layers}")
        self.n_layers = n_layers
        blocks = list(backbone.blocks)[-n_layers:]
        self.layers = nn.ModuleList(ARMLayer(b, backbone.grid_size) for b in blocks)
        lora = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=0.0, target_modules=["q", "out"])
        for layer in self.layers:
            # Only the `attn` submodule goes through peft: it freezes everything else it sees.
            inject_adapter_in_model(lora, layer.attn)
        d, D = backbone.width, backbone.embed_dim
        hidden = ffn_hidden or d
        self.ffn = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, D))
        nn.init.zeros_(self.ffn[-1].weight)
        nn.init.zeros_(self.ffn[-1].bias)

    def forward(self, feats: VisionFeatures) -> torch.Tensor:
        """Δx̃ for every patch: (B, P, D) in the backbone's projected embedding space."""
        h = feats.block_inputs[0]
        for layer, x_out in zip(self.layers, feats.block_outputs):
            h = layer(h, x_out)
        return self.ffn(h[:, 1:])  # Δx̃ = FFN(x_arm^L), patch tokens only
