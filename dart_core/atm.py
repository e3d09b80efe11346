"""Adaptive Transfer Module (paper Sec. 3.4, Eq. 5, App. C.2-C.3).

GATv2 message passing over the Class Relationship Graph, in two stages:
  Text-ATM : h_0 = t_c, 2 GATv2 layers -> h_txt
  fusion   : x_mm = FNN([x_vis || h_txt])
  MM-ATM   : h_0 = x_mm, 2 GATv2 layers over each image's copy of the class graph -> h_mm

Each layer: multi-head GATv2 (heads concatenated, C.15), ELU (σ_GAT of C.14), residual (Eq. 5 / C.16).
Choices where the paper is silent (docs/model.md): a LayerScale on each residual branch and a
residual FNN whose last layer starts at zero (x_mm = x_vis + FNN(...)), both zero at init, so an
untrained ATM is the identity and training starts from the VLP's own zero-shot scores exactly.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

with warnings.catch_warnings():
    # torch_geometric applies torch.jit.script to a class at import time; torch 2.14 deprecates
    # that call with a FutureWarning we can do nothing about. Silenced for this import only.
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
    from torch_geometric.nn import GATv2Conv


class GATv2Residual(nn.Module):
    def __init__(self, dim: int, heads: int = 4, layerscale_init: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"ATM dim {dim} is not divisible by gat_heads={heads}")
        # Edges already carry self-loops (CRG.edge_index), so GATv2Conv must not add them again.
        self.conv = GATv2Conv(dim, dim // heads, heads=heads, concat=True, add_self_loops=False)  # C.12-C.15
        self.act = nn.ELU()
        self.gamma = nn.Parameter(torch.full((dim,), layerscale_init))

    def forward(self, h: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        return h + self.gamma * self.act(self.conv(h, edge_index))  # Eq. 5 / C.16


class ATM(nn.Module):
    def __init__(self, dim: int, heads: int = 4, n_layers: int = 2, fnn_hidden: int | None = None):
        super().__init__()
        self.text_layers = nn.ModuleList(GATv2Residual(dim, heads) for _ in range(n_layers))
        hidden = fnn_hidden or dim
        self.fnn_vis = nn.Linear(dim, hidden)  # FNN on the concatenation [x_vis || h_txt], with its
        self.fnn_txt = nn.Linear(dim, hidden, bias=False)  # first layer split in two halves
        self.fnn_out = nn.Linear(hidden, dim)
        nn.init.zeros_(self.fnn_out.weight)
        nn.init.zeros_(self.fnn_out.bias)
        self.act = nn.GELU()
        self.mm_layers = nn.ModuleList(GATv2Residual(dim, heads) for _ in range(n_layers))

    def text(self, t: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        """Text-ATM: (C, D) -> (C, D)."""
        h = t
        for layer in self.text_layers:
            h = layer(h, edge_index)
        return h

    def fuse(self, x_vis: torch.Tensor, h_txt: torch.Tensor) -> torch.Tensor:
        """x_mm = x_vis + FNN([x_vis || h_txt]); x_vis (B, C, D), h_txt (C, D).

        Splitting the first linear over the two halves of the concatenation is the same map and
        computes W_txt·h_txt once per class instead of once per (image, class)."""
        return x_vis + self.fnn_out(self.act(self.fnn_vis(x_vis) + self.fnn_txt(h_txt)))

    def multimodal_candidates(self, x_vis: torch.Tensor, h_txt: torch.Tensor, edge_index: torch.Tensor,
                              cand: torch.Tensor) -> torch.Tensor:
        """Fusion + MM-ATM restricted to each image's candidate classes `cand` (B, M): the CRG's
        edges between two candidates of the same image are kept, the others dropped.

        Bounds the (images x classes) graph at large vocabularies (7,586 classes): cost grows with
        M, not C. Returns h_mm for the candidates only, (B, M, D)."""
        B, C, D = x_vis.shape
        M = cand.shape[1]
        x_c = x_vis.gather(1, cand.unsqueeze(-1).expand(B, M, D))
        x_mm = self.fuse(x_c, h_txt[cand])  # (B, M, D); h_txt[cand] is (B, M, D)
        # local index of every class in its image's candidate list, -1 when not a candidate
        local = torch.full((B, C), -1, dtype=torch.long, device=x_vis.device)
        local.scatter_(1, cand, torch.arange(M, device=x_vis.device).expand(B, M))
        src, dst = local[:, edge_index[0]], local[:, edge_index[1]]  # (B, E)
        keep = (src >= 0) & (dst >= 0)
        offsets = (torch.arange(B, device=x_vis.device) * M).view(B, 1)
        batched = torch.stack([(src + offsets)[keep], (dst + offsets)[keep]])
        h = x_mm.reshape(B * M, D)
        for layer in self.mm_layers:
            h = layer(h, batched)
        return h.view(B, M, D)

    def multimodal(self, x_mm: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        """MM-ATM over B copies of the class graph: (B, C, D) -> (B, C, D)."""
        B, C, D = x_mm.shape
        offsets = (torch.arange(B, device=x_mm.device) * C).view(B, 1, 1)
        batched = (edge_index.unsqueeze(0) + offsets).transpose(0, 1).reshape(2, -1)
        h = x_mm.reshape(B * C, D)
        for layer in self.mm_layers:
            h = layer(h, batched)
        return h.view(B, C, D)
