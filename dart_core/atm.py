"""Adaptive Transfer Module (paper Sec. 3.4, Eq. 5, App. C.2-C.3).

GATv2 message passing over the Class Relationship Graph, in two stages:
  Text-ATM : h_0 = t_c, 2 GATv2 layers -> h_txt
  fusion   : x_mm = FNN([x_vis || h_txt])
  MM-ATM   : h_0 = x_mm, 2 GATv2 layers over each image's copy of the class graph -> h_mm

Each layer: multi-head GATv2 (heads concatenated, C.15), ELU (σ_GAT of C.14), residual (Eq. 5 / C.16).
Choices where the paper is silent (docs/model.md): a LayerScale on each residual branch and a
residual FNN whose last layer starts at zero (x_mm = x_vis + FNN(...)), both zero at init, so an
untrained ATM is the identity and training starts from the VLP's own zero-shot scores exactly.

The attention runs over a dense neighbour table (every class's in-edges padded to the largest
in-degree) instead of PyG's scatter over an edge list: the CRG gives every class the same few
neighbours, so the table is nearly full, and at 7,586 classes the dense form is ~6x faster on CPU
(docs/model.md, `benchmarks/inference_overhead.py`). PyG's `GATv2Conv` holds the weights and is
the reference the dense form is tested against (tests/test_atm.py).
"""
from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

with warnings.catch_warnings():
    # torch_geometric applies torch.jit.script to a class at import time; torch 2.14 deprecates
    # that call with a FutureWarning we can do nothing about. Silenced for this import only.
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
    from torch_geometric.nn import GATv2Conv

# Per-edge working set of one chunk of the attention, in elements: on CPU a chunk that stays in
# cache (~4 MB) is 3-5x faster than one pass over all edges; on a GPU few large chunks are best.
CHUNK_ELEMENTS = {"cpu": 1 << 20}
DEFAULT_CHUNK_ELEMENTS = 1 << 27


class NeighbourTable(NamedTuple):
    """A class graph as a dense table: row r's in-edges come from rows `index[r, :]`, `mask[r, k]`
    False on padding. Rows are the nodes of whatever is being propagated: C classes (Text-ATM),
    B·C (image, class) pairs (MM-ATM) or B·M candidates (bounded MM-ATM)."""

    index: torch.Tensor  # (R, K) long
    mask: torch.Tensor   # (R, K) bool

    @classmethod
    def from_edge_index(cls, edge_index: torch.Tensor, num_nodes: int) -> "NeighbourTable":
        """(2, E) source -> target edges (duplicates count twice, as in PyG's softmax)."""
        src, dst = edge_index
        order = torch.argsort(dst, stable=True)
        src, dst = src[order], dst[order]
        degree = torch.bincount(dst, minlength=num_nodes)
        K = max(int(degree.max()) if degree.numel() else 0, 1)
        slot = torch.arange(dst.numel(), device=dst.device) - (torch.cumsum(degree, 0) - degree)[dst]
        index = torch.zeros(num_nodes, K, dtype=torch.long, device=dst.device)
        mask = torch.zeros(num_nodes, K, dtype=torch.bool, device=dst.device)
        index[dst, slot] = src
        mask[dst, slot] = True
        return cls(index, mask)

    def batched(self, copies: int) -> "NeighbourTable":
        """`copies` disjoint copies of the graph, copy b on rows b·R .. (b+1)·R - 1."""
        R = self.index.shape[0]
        offsets = (torch.arange(copies, device=self.index.device) * R).view(copies, 1, 1)
        return NeighbourTable((self.index + offsets).reshape(copies * R, -1), self.mask.repeat(copies, 1))

    def restricted(self, cand: torch.Tensor) -> "NeighbourTable":
        """Each image's subgraph on its candidate classes `cand` (B, M), on rows b·M + m: the
        edges between two candidates of the same image are kept, the others masked out."""
        B, M = cand.shape
        C = self.index.shape[0]
        local = torch.full((B, C), -1, dtype=torch.long, device=cand.device)
        local.scatter_(1, cand, torch.arange(M, device=cand.device).expand(B, M))
        src_local = local.gather(1, self.index[cand].reshape(B, -1)).view(B, M, -1)  # (B, M, K)
        mask = self.mask[cand] & (src_local >= 0)
        offsets = (torch.arange(B, device=cand.device) * M).view(B, 1, 1)
        return NeighbourTable((src_local.clamp(min=0) + offsets).reshape(B * M, -1), mask.reshape(B * M, -1))


def gatv2_dense(conv: GATv2Conv, x: torch.Tensor, graph: NeighbourTable) -> torch.Tensor:
    r"""PyG's GATv2Conv (concat heads, no edge features, no dropout) over a neighbour table:

    .. math::
        \mathbf{x}'_i = \big\Vert_{k=1}^{H} \sum_{j \in \mathcal{N}(i)} \alpha^{k}_{i,j}\,
        \mathbf{\Theta}^{k}_{l}\mathbf{x}_j + \mathbf{b}, \qquad
        \alpha^{k}_{i,j} = \operatorname{softmax}_{j}\big(\mathbf{a}^{k\top}
        \mathrm{LeakyReLU}(\mathbf{\Theta}^{k}_{l}\mathbf{x}_j + \mathbf{\Theta}^{k}_{r}\mathbf{x}_i)\big)

    :math:`\mathcal{N}(i)` = the sources ``graph.index[i, k]`` where ``graph.mask[i, k]``. A row
    without neighbours gets :math:`\mathbf{b}`, as in PyG.

    The per-edge tensors (R·K·D) exist one chunk of rows at a time. Under autograd each chunk is
    checkpointed: only the per-row x_l, x_r and the output are kept for backward, and a chunk's
    per-edge tensors are recomputed when its gradient is needed — so training memory grows with
    R·D, not R·K·D (docs/model.md, "Memory").

    Args:
        conv (GATv2Conv): holds :math:`\mathbf{\Theta}_l` (``lin_l``), :math:`\mathbf{\Theta}_r`
            (``lin_r``), :math:`\mathbf{a}` (``att``), :math:`\mathbf{b}` (``bias``), ``heads`` H,
            ``out_channels`` F and ``negative_slope``.
        x (Tensor): node features.
        graph (NeighbourTable): R rows, K neighbour slots each.

    Shapes:
        - **input:** x :math:`(R, D_{in})`, graph.index / graph.mask :math:`(R, K)`
        - **output:** :math:`(R, H \cdot F)`
    """
    H, Fh = conv.heads, conv.out_channels
    R, K = graph.index.shape
    x_l = conv.lin_l(x)  # Θ_l x_j, the message and the source half of the score, (R, H·F)
    x_r = conv.lin_r(x)  # Θ_r x_i, the target half
    # a as a block-diagonal (H·F, H) matrix: every head's score in one GEMM over the per-edge
    # tensor as it lies in memory, without the permuted copy an einsum over heads would make
    att = torch.block_diag(*conv.att.view(H, Fh, 1))
    budget = CHUNK_ELEMENTS.get(x.device.type, DEFAULT_CHUNK_ELEMENTS)
    chunk = max(1, budget // (K * H * Fh))
    recompute = torch.is_grad_enabled() and (x_l.requires_grad or att.requires_grad)
    out = []
    for r0 in range(0, R, chunk):
        rows = slice(r0, r0 + chunk)
        args = (x_l, x_r[rows], graph.index[rows], graph.mask[rows], att, H, conv.negative_slope)
        out.append(checkpoint(_attend, *args, use_reentrant=False) if recompute else _attend(*args))
    return torch.cat(out) + conv.bias


def _attend(x_l: torch.Tensor, x_r: torch.Tensor, idx: torch.Tensor, mask: torch.Tensor, att: torch.Tensor,
            H: int, negative_slope: float) -> torch.Tensor:
    """One chunk of gatv2_dense: n target rows x_r (n, H·F) with their K source rows of x_l."""
    n, K = idx.shape
    pad = ~mask.unsqueeze(-1)
    x_j = x_l.index_select(0, idx.reshape(-1)).view(n, K, -1)  # (n, K, H·F)
    e = F.leaky_relu_(x_j + x_r.unsqueeze(1), negative_slope)
    score = (e.view(n * K, -1) @ att).view(n, K, H)
    alpha = torch.softmax(score.masked_fill(pad, float("-inf")), dim=1).masked_fill(pad, 0.0)  # no-neighbour row: 0
    # Σ_k α_kh x_j[k, head h]: one (H, K) x (K, H·F) product per row gives every head's weights on
    # every head's features; the diagonal blocks are the messages (4x the FLOPs of the exact
    # contraction, but a plain bmm without permuting the per-edge tensor)
    mixed = torch.bmm(alpha.transpose(1, 2), x_j).view(n, H, H, -1)
    diagonal = torch.eye(H, dtype=torch.bool, device=x_l.device)
    return mixed[:, diagonal].reshape(n, -1)


class GATv2Residual(nn.Module):
    r"""One ATM layer (Eq. 5 / App. C.12-C.16): multi-head GATv2 over the class graph, heads
    concatenated, ELU, and a residual whose branch is scaled by a LayerScale :math:`\boldsymbol\gamma`:

    .. math::
        \mathbf{h}'_i = \mathbf{h}_i + \boldsymbol{\gamma} \odot \mathrm{ELU}\Big(
        \big\Vert_{k=1}^{H} \sum_{j \in \mathcal{N}(i)} \alpha^{k}_{i,j}\,
        \mathbf{\Theta}^{k}_{l}\mathbf{h}_j \;+\; \mathbf{b}\Big)

    with the GATv2 attention of each head :math:`k` (C.12-C.15)

    .. math::
        \alpha^{k}_{i,j} = \operatorname{softmax}_{j \in \mathcal{N}(i)}\Big(
        \mathbf{a}^{k\top}\,\mathrm{LeakyReLU}_{0.2}\big(\mathbf{\Theta}^{k}_{l}\mathbf{h}_j
        + \mathbf{\Theta}^{k}_{r}\mathbf{h}_i\big)\Big),

    :math:`\mathcal{N}(i)` the in-neighbours of class :math:`i` in the CRG, self-loop included (the
    graph carries it, so ``add_self_loops=False``). The weights live in PyG's ``GATv2Conv``
    (``conv``); :func:`gatv2_dense` computes it over a :class:`NeighbourTable`.
    Initialisation (:meth:`reset_parameters`): :math:`\boldsymbol\gamma` = ``layerscale_init`` (0:
    the layer starts as the identity, docs/model.md), ``conv`` PyG's default (glorot, zero bias).

    Args:
        dim (int): feature size D, in and out.
        heads (int): attention heads H; each has ``dim // heads`` channels (``dim`` must divide).
        layerscale_init (float): the initial value of every entry of :math:`\boldsymbol\gamma`.

    Shapes:
        - **input:** node features :math:`(R, D)`, graph :class:`NeighbourTable` with R rows
        - **output:** :math:`(R, D)`
    """

    def __init__(self, dim: int, heads: int = 4, layerscale_init: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"ATM dim {dim} is not divisible by gat_heads={heads}")
        # Edges already carry self-loops (CRG.edge_index), so GATv2Conv must not add them again.
        self.conv = GATv2Conv(dim, dim // heads, heads=heads, concat=True, add_self_loops=False)  # C.12-C.15
        self.act = nn.ELU()
        self.layerscale_init = layerscale_init
        self.gamma = nn.Parameter(torch.full((dim,), layerscale_init))
        # GATv2Conv drew its weights in its constructor: set only the fixed init here, so that a
        # seed gives the same initial weights as before reset_parameters existed
        self.reset_parameters(redraw=False)

    @torch.no_grad()
    def reset_parameters(self, redraw: bool = True) -> None:
        """γ back to `layerscale_init`; with `redraw`, GATv2Conv's weights drawn again (its own
        reset_parameters), else kept."""
        if redraw:
            self.conv.reset_parameters()
        self.gamma.fill_(self.layerscale_init)

    def forward(self, h: torch.Tensor, graph: NeighbourTable) -> torch.Tensor:
        return h + self.gamma * self.act(gatv2_dense(self.conv, h, graph))  # Eq. 5 / C.16


class ATM(nn.Module):
    r"""The Adaptive Transfer Module (Sec. 3.4, Eq. 5, App. C.2-C.3): graph attention over the Class
    Relationship Graph, first on the class texts, then on each image's class features.

    .. math::
        \mathbf{h}_{txt} = G^{txt}_{n} \circ \dots \circ G^{txt}_{1}(\mathbf{t})
        \qquad \text{(Text-ATM)}

    .. math::
        \mathbf{x}_{mm}^{(c)} = \mathbf{x}_{vis}^{(c)} + \mathbf{W}_{out}\,\mathrm{GELU}\big(
        \mathbf{W}_{vis}\mathbf{x}_{vis}^{(c)} + \mathbf{W}_{txt}\mathbf{h}_{txt}^{(c)} + \mathbf{b}\big)
        + \mathbf{b}_{out}
        \qquad \text{(fusion: FNN}([\mathbf{x}_{vis} \Vert \mathbf{h}_{txt}])\text{, residual)}

    .. math::
        \mathbf{h}_{mm} = G^{mm}_{n} \circ \dots \circ G^{mm}_{1}(\mathbf{x}_{mm})
        \qquad \text{(MM-ATM, one copy of the class graph per image)}

    each :math:`G` a :class:`GATv2Residual` (Eq. 5). :math:`[\mathbf{W}_{vis} \Vert \mathbf{W}_{txt}]`
    is the FNN's first linear on the concatenation, split in two halves (:meth:`fuse`). The caller
    scores :math:`\hat{y}_c = s \cdot \cos(\mathbf{h}_{mm}^{(c)}, \mathbf{t}_c)`
    (:class:`dart_core.model.DART`). The residual fusion and the zero start are our choices
    (docs/model.md, "Where the paper is silent").

    Initialisation (:meth:`reset_parameters`): :math:`\mathbf{W}_{out} = 0`, :math:`\mathbf{b}_{out} = 0`
    and every layer's LayerScale :math:`\boldsymbol\gamma = 0`, so an untrained ATM is the identity,
    :math:`\mathbf{h}_{mm} = \mathbf{x}_{vis}`, and DART starts from the VLP's zero-shot scores exactly;
    :math:`\mathbf{W}_{vis}`, :math:`\mathbf{W}_{txt}` and the GATv2 weights are random (torch's and
    PyG's defaults).

    Args:
        dim (int): the embedding size D of :math:`\mathbf{t}`, :math:`\mathbf{x}_{vis}` and every layer.
        heads (int): GATv2 attention heads per layer (App. A: 4).
        n_layers (int): GATv2 layers in the Text-ATM and again in the MM-ATM (App. A: 2).
        fnn_hidden (int, optional): the fusion FNN's hidden width (default: ``dim``).

    Shapes:
        - :meth:`text`: :math:`\mathbf{t}` :math:`(C, D)` :math:`\to` :math:`\mathbf{h}_{txt}` :math:`(C, D)`
        - :meth:`fuse`: :math:`\mathbf{x}_{vis}` :math:`(B, C, D)`, :math:`\mathbf{h}_{txt}`
          :math:`(C, D)` :math:`\to` :math:`\mathbf{x}_{mm}` :math:`(B, C, D)`
        - :meth:`multimodal`: :math:`(B, C, D) \to (B, C, D)`
        - :meth:`multimodal_candidates`: :math:`\mathbf{x}_{vis}` :math:`(B, C, D)`, candidates
          :math:`(B, M)` :math:`\to` :math:`(B, M, D)`
        - graphs: a :class:`NeighbourTable` over the C classes
    """

    def __init__(self, dim: int, heads: int = 4, n_layers: int = 2, fnn_hidden: int | None = None):
        super().__init__()
        self.text_layers = nn.ModuleList(GATv2Residual(dim, heads) for _ in range(n_layers))
        hidden = fnn_hidden or dim
        self.fnn_vis = nn.Linear(dim, hidden)  # FNN on the concatenation [x_vis || h_txt], with its
        self.fnn_txt = nn.Linear(dim, hidden, bias=False)  # first layer split in two halves
        self.fnn_out = nn.Linear(hidden, dim)
        self.act = nn.GELU()
        self.mm_layers = nn.ModuleList(GATv2Residual(dim, heads) for _ in range(n_layers))
        self.reset_parameters(redraw=False)  # fixed init only; as in GATv2Residual, keeps a seed's weights

    @torch.no_grad()
    def reset_parameters(self, redraw: bool = True) -> None:
        """Restore the documented initialisation, after which the ATM is the identity: the fusion
        FNN's last linear zero and every layer's LayerScale at its init (0). With `redraw`, the
        random weights (the FNN's first linear, the GATv2 weights) are drawn again; without, kept."""
        for layer in (*self.text_layers, *self.mm_layers):
            layer.reset_parameters(redraw)
        if redraw:
            self.fnn_vis.reset_parameters()
            self.fnn_txt.reset_parameters()
        nn.init.zeros_(self.fnn_out.weight)
        nn.init.zeros_(self.fnn_out.bias)

    def text(self, t: torch.Tensor, graph: NeighbourTable) -> torch.Tensor:
        """Text-ATM: (C, D) -> (C, D)."""
        h = t
        for layer in self.text_layers:
            h = layer(h, graph)
        return h

    def fuse(self, x_vis: torch.Tensor, h_txt: torch.Tensor) -> torch.Tensor:
        """x_mm = x_vis + FNN([x_vis || h_txt]); x_vis (B, C, D), h_txt (C, D).

        Splitting the first linear over the two halves of the concatenation is the same map and
        computes W_txt·h_txt once per class instead of once per (image, class)."""
        return x_vis + self.fnn_out(self.act(self.fnn_vis(x_vis) + self.fnn_txt(h_txt)))

    def multimodal_candidates(self, x_vis: torch.Tensor, h_txt: torch.Tensor, graph: NeighbourTable,
                              cand: torch.Tensor) -> torch.Tensor:
        """Fusion + MM-ATM restricted to each image's candidate classes `cand` (B, M): the CRG's
        edges between two candidates of the same image are kept, the others dropped.

        Bounds the (images x classes) graph at large vocabularies (7,586 classes): cost grows with
        M, not C. Returns h_mm for the candidates only, (B, M, D)."""
        B, C, D = x_vis.shape
        M = cand.shape[1]
        x_c = x_vis.gather(1, cand.unsqueeze(-1).expand(B, M, D))
        h = self.fuse(x_c, h_txt[cand]).reshape(B * M, D)  # h_txt[cand] is (B, M, D)
        sub = graph.restricted(cand)
        for layer in self.mm_layers:
            h = layer(h, sub)
        return h.view(B, M, D)

    def multimodal(self, x_mm: torch.Tensor, graph: NeighbourTable) -> torch.Tensor:
        """MM-ATM over B copies of the class graph: (B, C, D) -> (B, C, D)."""
        B, C, D = x_mm.shape
        batched = graph.batched(B)
        h = x_mm.reshape(B * C, D)
        for layer in self.mm_layers:
            h = layer(h, batched)
        return h.view(B, C, D)
