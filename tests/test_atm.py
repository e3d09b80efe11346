"""The ATM's dense GATv2 (atm.gatv2_dense over a NeighbourTable) against a hand computation and
against PyG's GATv2Conv over the same edge list: forward and gradients."""
import math
import warnings

import pytest
import torch

from dart_core.atm import ATM, NeighbourTable, gatv2_dense

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", category=FutureWarning)
    from torch_geometric.nn import GATv2Conv


def test_gatv2_dense_hand_computed():
    """1 head, Θ_l = Θ_r = I, a = (1, -1), no bias. Node 0 <- {0, 1}, node 1 <- {1, 2}, node 2 has no
    in-edges.  x0 = (1, 0), x1 = (0, 1), x2 = (-1, 1).
    node 0: scores aᵀLReLU(x0+x0) = 2, aᵀLReLU(x1+x0) = 0  -> α = (e²/(e²+1), 1/(e²+1))
    node 1: aᵀLReLU(x1+x1) = -2, aᵀLReLU((-1, 2)) = -0.2 - 2 = -2.2 -> α = (1/(1+e^-0.2), ...)
    node 2: no neighbours -> the bias (0), as in PyG."""
    conv = GATv2Conv(2, 2, heads=1, add_self_loops=False)
    with torch.no_grad():
        conv.lin_l.weight.copy_(torch.eye(2)), conv.lin_l.bias.zero_()
        conv.lin_r.weight.copy_(torch.eye(2)), conv.lin_r.bias.zero_()
        conv.att.copy_(torch.tensor([[[1.0, -1.0]]]))
        conv.bias.zero_()
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 1.0]])
    edges = torch.tensor([[0, 1, 1, 2], [0, 0, 1, 1]])  # source -> target
    graph = NeighbourTable.from_edge_index(edges, 3)
    assert graph.index.tolist() == [[0, 1], [1, 2], [0, 0]]
    assert graph.mask.tolist() == [[True, True], [True, True], [False, False]]
    a0 = math.exp(2) / (math.exp(2) + 1)
    a1 = 1 / (1 + math.exp(-0.2))
    expected = torch.tensor([[a0, 1 - a0], [-(1 - a1), 1.0], [0.0, 0.0]])
    with torch.no_grad():
        assert torch.allclose(gatv2_dense(conv, x, graph), expected, atol=1e-6)
        assert torch.allclose(conv(x, edges), expected, atol=1e-6)


def random_graph(C: int, seed: int) -> torch.Tensor:
    """Uneven in-degrees, a duplicate edge, a node without in-edges, self-loops on the rest."""
    g = torch.Generator().manual_seed(seed)
    src, dst = [], []
    for c in range(C - 1):
        n = int(torch.randint(0, 5, (1,), generator=g))
        src += torch.randint(0, C, (n,), generator=g).tolist() + [c]
        dst += [c] * (n + 1)
    src.append(1), dst.append(0)  # 1 -> 0 may now appear twice: PyG's softmax counts it twice
    return torch.tensor([src, dst])


@pytest.mark.parametrize("chunk", [None, 7])
def test_gatv2_dense_matches_pyg_forward_and_gradients(chunk, monkeypatch):
    if chunk:  # several chunks per call, the last one partial
        monkeypatch.setitem(__import__("dart_core.atm").atm.CHUNK_ELEMENTS, "cpu", chunk * 5 * 16)
    torch.manual_seed(0)
    C, D = 23, 16
    conv = GATv2Conv(D, D // 4, heads=4, add_self_loops=False)
    with torch.no_grad():
        conv.att.normal_(0, 1.0), conv.bias.normal_(0, 0.1)
    edges = random_graph(C, seed=3)
    graph = NeighbourTable.from_edge_index(edges, C)
    assert graph.index.shape[1] == 5 and not graph.mask[C - 1].any()
    x = torch.randn(C, D, requires_grad=True)
    ref = conv(x, edges)
    (ref * torch.arange(D)).sum().backward()
    ref_grads = [x.grad.clone()] + [p.grad.clone() for p in conv.parameters()]
    x.grad = None
    conv.zero_grad()
    out = gatv2_dense(conv, x, graph)
    (out * torch.arange(D)).sum().backward()
    assert torch.allclose(out, ref, atol=1e-5)
    for got, want in zip([x.grad] + [p.grad for p in conv.parameters()], ref_grads):
        assert torch.allclose(got, want, atol=1e-4)


def random_atm(dim: int, heads: int, std: float) -> ATM:
    """An ATM whose every weight (zero-initialised ones included) is drawn, so each path computes."""
    atm = ATM(dim, heads=heads)
    with torch.no_grad():
        for p in atm.parameters():
            p.normal_(0, std)
    return atm


def test_mm_atm_batched_and_restricted_tables_match_pyg_edge_lists():
    """MM-ATM over B copies of the graph, and over each image's candidate subgraph, equal PyG's
    GATv2Conv over the corresponding (offset, filtered) edge lists."""
    torch.manual_seed(1)
    B, C, D, M = 3, 11, 8, 4
    atm = random_atm(D, heads=2, std=0.3)
    edges = random_graph(C, seed=5)
    graph = NeighbourTable.from_edge_index(edges, C)
    x_vis, h_txt = torch.randn(B, C, D), torch.randn(C, D)
    with torch.no_grad():
        got = atm.multimodal(atm.fuse(x_vis, h_txt), graph)
        h = atm.fuse(x_vis, h_txt).reshape(B * C, D)
        batched = torch.cat([edges + b * C for b in range(B)], 1)
        for layer in atm.mm_layers:
            h = h + layer.gamma * layer.act(layer.conv(h, batched))
        assert torch.allclose(got, h.view(B, C, D), atol=1e-5)

        cand = torch.stack([torch.randperm(C)[:M] for _ in range(B)])
        got = atm.multimodal_candidates(x_vis, h_txt, graph, cand)
        local = {(b, int(c)): b * M + m for b in range(B) for m, c in enumerate(cand[b])}
        sub = torch.tensor([[local[b, int(s)], local[b, int(d)]] for b in range(B) for s, d in edges.T
                            if (b, int(s)) in local and (b, int(d)) in local]).T
        h = atm.fuse(x_vis.gather(1, cand.unsqueeze(-1).expand(B, M, D)), h_txt[cand]).reshape(B * M, D)
        for layer in atm.mm_layers:
            h = h + layer.gamma * layer.act(layer.conv(h, sub))
        assert torch.allclose(got, h.view(B, M, D), atol=1e-5)


def saved_for_backward(fn) -> int:
    """Elements of the distinct storages autograd keeps for backward while `fn` runs."""
    sizes = {}

    def pack(t):
        sizes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes() // t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(sizes.values())


def test_mm_atm_training_memory_grows_with_rows_not_edges(monkeypatch):
    """Checkpointed chunks: the fusion + 2 MM-ATM layers keep ~14 per-row tensors for backward
    (the docs' memory formula), not the (rows x 13 neighbours) per-edge tensors; the gradients
    are those of the plain computation."""
    import dart_core.atm as atm_module

    torch.manual_seed(0)
    B, C, D, N = 4, 200, 64, 12
    atm = random_atm(D, heads=4, std=0.1)
    edges = torch.cat([torch.stack([torch.randint(0, C, (C * N,)), torch.arange(C).repeat_interleave(N)]),
                       torch.arange(C).repeat(2, 1)], 1)
    graph = NeighbourTable.from_edge_index(edges, C)
    x, h_txt = torch.randn(B, C, D, requires_grad=True), torch.randn(C, D)
    rows_x_dim, rows_x_edges_x_dim = B * C * D, B * C * (N + 1) * D

    def run():
        return atm.multimodal(atm.fuse(x, h_txt), graph)

    monkeypatch.setitem(atm_module.CHUNK_ELEMENTS, "cpu", 64 * (N + 1) * D)  # several chunks
    kept = saved_for_backward(run)
    assert kept < 16 * rows_x_dim, kept / rows_x_dim
    run().square().sum().backward()
    grad = x.grad.clone()
    x.grad = None
    monkeypatch.setattr(atm_module, "checkpoint", lambda fn, *args, **kw: fn(*args))  # keep everything
    plain = saved_for_backward(run)
    assert plain > 4 * rows_x_edges_x_dim and plain > 3 * kept, (plain / rows_x_dim, kept / rows_x_dim)
    run().square().sum().backward()
    assert torch.allclose(x.grad, grad, atol=1e-6)
