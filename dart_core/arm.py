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

Choices where the paper is silent (docs/model.md, "Where the paper is silent"):
  * the ARM layers are chained: layer l's LoRA attention reads layer l-1's ARM output (the first
    reads x_orig^{l-1}), which is how "accumulated task-specific enhancement" reaches layer L;
  * the DW-conv starts as the identity and the FFN's last layer starts at zero, so at step 0
    Δx̃ = 0 and DART starts from the frozen VLP's patch features (LoRA's B is zero too).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dart_core.backbone import FrozenBackbone, VisionFeatures


class _LoRAAttention(nn.Module):
    r"""The ARM's LoRA-augmented self-attention (Eq. 2-3): the frozen block's attention with its
    weights as four separate linears, so that peft can adapt q and out alone.

    .. math::
        \mathbf{y} = \mathrm{LN}_1(\mathbf{x}^{l-1}), \qquad
        \mathbf{Q} = \mathbf{y}\,(\mathbf{W}_q + \tfrac{\alpha}{r}\mathbf{B}_q\mathbf{A}_q)^{\top},\;
        \mathbf{K} = \mathbf{y}\,\mathbf{W}_k^{\top},\;
        \mathbf{V} = \mathbf{y}\,\mathbf{W}_v^{\top}

    .. math::
        \mathbf{x}_{arm}^{lora} = \mathrm{MHA}(\mathbf{Q}, \mathbf{K}, \mathbf{V})\,
        (\mathbf{W}_o + \tfrac{\alpha}{r}\mathbf{B}_o\mathbf{A}_o)^{\top} + \mathbf{x}^{l-1}

    (biases omitted). :math:`\mathbf{W}_{q,k,v,o}` and :math:`\mathrm{LN}_1` are frozen copies of the
    block's ``attn.in_proj_*``, ``attn.out_proj`` and ``ln_1``; the LoRA factors ``A``, ``B`` are
    added by :class:`ARM` (peft) and are the only trainable weights here.

    Args:
        block (nn.Module): the frozen open_clip ``ResidualAttentionBlock`` whose weights are copied.

    Shapes:
        - **input:** :math:`(B, 1+P, d)` tokens (class token first)
        - **output:** :math:`(B, 1+P, d)`
    """

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
    r"""One ARM layer beside frozen block :math:`l` (Sec. 3.2): LoRA attention (Eq. 2-3,
    :class:`_LoRAAttention`), depth-wise convolution, cross-attention to the frozen block's output.

    .. math::
        \mathbf{x}_{arm}^{lora} = \mathrm{LoRAAttn}(\mathbf{x}_{arm}^{l-1})

    .. math::
        \mathbf{x}_{arm}^{dw} = \big[\,\mathbf{x}_{arm,\,cls}^{lora} \,\|\,
        \mathrm{DWConv}_{3\times3}(\mathbf{x}_{arm,\,patches}^{lora})\,\big]

    .. math::
        \mathbf{x}_{arm}^{l} = \mathrm{Attn}\big(Q = \mathrm{LN}_q(\mathbf{x}_{arm}^{dw}),\;
        K = V = \mathrm{LN}_{kv}(\mathbf{x}_{orig}^{l})\big)

    The depth-wise convolution runs over the patch grid (the class token passes through); the
    cross-attention's key/value are the frozen block's own output :math:`\mathbf{x}_{orig}^{l}`.
    Initialisation (:meth:`reset_parameters`): the DW-conv is the identity (centre tap 1, bias 0),
    LoRA's B is zero, the LayerNorms are (1, 0); LoRA's A and the cross-attention are random (peft's
    and torch's defaults).

    Args:
        block (nn.Module): the frozen open_clip block :math:`l` (its attention weights and ``ln_1``
            are copied, frozen).
        grid (tuple[int, int]): the patch grid (rows, cols), :math:`P = rows \cdot cols`.

    Shapes:
        - **input:** :math:`\mathbf{x}_{arm}^{l-1}` :math:`(B, 1+P, d)`, :math:`\mathbf{x}_{orig}^{l}`
          :math:`(B, 1+P, d)`, d the ViT width
        - **output:** :math:`\mathbf{x}_{arm}^{l}` :math:`(B, 1+P, d)`
    """

    def __init__(self, block: nn.Module, grid: tuple[int, int]):
        super().__init__()
        self.attn = _LoRAAttention(block)
        d, h = self.attn.q.in_features, self.attn.heads
        self.grid = grid
        self.dwconv = nn.Conv2d(d, d, kernel_size=3, padding=1, groups=d)
        self.ln_q = nn.LayerNorm(d)
        self.ln_kv = nn.LayerNorm(d)
        self.cross = nn.MultiheadAttention(d, h, batch_first=True)
        # the random layers were just drawn by their own constructors: set only the fixed init, so
        # that a seed gives the same initial weights as before reset_parameters existed
        self.reset_parameters(redraw=False)

    @torch.no_grad()
    def reset_parameters(self, redraw: bool = True) -> None:
        """Restore the documented initialisation: DW-conv = identity, LoRA B = 0, LayerNorms (1, 0).
        With `redraw`, also draw LoRA's A (peft's default, kaiming-uniform with a = sqrt(5)) and the
        cross-attention (torch's nn.MultiheadAttention default) again. The frozen copies of the
        block's weights are not trained and stay as they are."""
        for lin in (self.attn.q, self.attn.out):  # peft LoRA layers once ARM has injected them
            for a in getattr(lin, "lora_A", {}).values():
                if redraw:
                    nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
            for b in getattr(lin, "lora_B", {}).values():
                nn.init.zeros_(b.weight)
                if b.bias is not None:
                    nn.init.zeros_(b.bias)
        self.dwconv.weight.zero_()  # identity: only the centre tap is 1
        self.dwconv.weight[:, 0, 1, 1] = 1.0
        self.dwconv.bias.zero_()
        self.ln_q.reset_parameters()
        self.ln_kv.reset_parameters()
        if redraw:  # what nn.MultiheadAttention's constructor does
            self.cross.out_proj.reset_parameters()
            nn.init.xavier_uniform_(self.cross.in_proj_weight)
            nn.init.zeros_(self.cross.in_proj_bias)
            nn.init.zeros_(self.cross.out_proj.bias)

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
    r"""The Adaptive Refinement Module (Sec. 3.2, Eq. 2-3, App. A): a chain of :class:`ARMLayer`
    beside the last ``n_layers`` frozen blocks :math:`L-n+1, \dots, L`, then an FFN to the residual
    of the patch features:

    .. math::
        \mathbf{x}_{arm}^{L-n} = \mathbf{x}_{orig}^{L-n}, \qquad
        \mathbf{x}_{arm}^{l} = \mathrm{ARMLayer}_l(\mathbf{x}_{arm}^{l-1}, \mathbf{x}_{orig}^{l}),
        \quad l = L-n+1, \dots, L

    .. math::
        \Delta\tilde{\mathbf{x}} = \mathrm{FFN}(\mathbf{x}_{arm,\,patches}^{L}), \qquad
        \mathrm{FFN} = \mathrm{Linear}_{h \to D} \circ \mathrm{GELU} \circ
        \mathrm{Linear}_{d \to h} \circ \mathrm{LN}

    and the caller (:class:`dart_core.model.DART`) adds it to the frozen patch features in the
    projected space: :math:`\tilde{\mathbf{x}} = \mathbf{x}_{orig} + \Delta\tilde{\mathbf{x}}`.
    :math:`\mathbf{x}_{orig}^{l}` is frozen block :math:`l`'s output (its input for
    :math:`l = L-n`), from :meth:`FrozenBackbone.forward_features`.

    Initialisation (:meth:`reset_parameters`, the residual start of docs/model.md): the FFN's last
    layer is zero, and with each layer's identity DW-conv and zero LoRA B, :math:`\Delta\tilde{\mathbf{x}} = 0`
    exactly: an untrained ARM leaves the VLP's patch features as they are.

    Args:
        backbone (FrozenBackbone): the frozen VLP; its last ``n_layers`` blocks are copied.
        n_layers (int): ARM layers, in ``1 .. backbone.n_layers`` (default 2; DART's config uses 1).
        lora_r (int): LoRA rank on q and out (App. A: 32).
        lora_alpha (int): LoRA alpha; the low-rank update is scaled by ``lora_alpha / lora_r`` (App. A: 128).
        ffn_hidden (int, optional): the FFN's hidden width h (default: the ViT width d).

    Shapes:
        - **input:** :class:`VisionFeatures` with ``block_inputs[0]`` :math:`(B, 1+P, d)` and
          ``n_layers`` ``block_outputs`` :math:`(B, 1+P, d)`
        - **output:** :math:`\Delta\tilde{\mathbf{x}}` :math:`(B, P, D)`, D the projected embedding size
    """

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
        self.reset_parameters(redraw=False)  # fixed init only; as in ARMLayer, keeps a seed's weights

    @torch.no_grad()
    def reset_parameters(self, redraw: bool = True) -> None:
        """Restore the documented initialisation, after which Δx̃ = 0 exactly: every layer's
        (ARMLayer.reset_parameters) and the FFN's — LayerNorm (1, 0), last linear zero. With
        `redraw`, the random weights (LoRA A, cross-attention, the FFN's first linear) are drawn
        again from their defaults; without, they are kept."""
        for layer in self.layers:
            layer.reset_parameters(redraw)
        self.ffn[0].reset_parameters()
        if redraw:
            self.ffn[1].reset_parameters()
        nn.init.zeros_(self.ffn[-1].weight)
        nn.init.zeros_(self.ffn[-1].bias)

    def forward(self, feats: VisionFeatures) -> torch.Tensor:
        """Δx̃ for every patch: (B, P, D) in the backbone's projected embedding space."""
        h = feats.block_inputs[0]
        for layer, x_out in zip(self.layers, feats.block_outputs):
            h = layer(h, x_out)
        return self.ffn(h[:, 1:])  # Δx̃ = FFN(x_arm^L), patch tokens only
