"""`dart crg show`: a picture of one class's neighbourhood, drawn like the paper's Fig. 9.

Fig. 9 conventions: the target class is orange, other classes blue; red edges carry information
from a neighbour into the target, grey edges run between the other classes; node size grows with
the number of adjacent nodes (within the drawn neighbourhood); edge width follows the edge weight
where the CRG has one (similarity scores, mean LLM strength), constant otherwise.
"""
from __future__ import annotations

from pathlib import Path

from dart_core.crg.graph import CRG, CRGError


def resolve_class(crg: CRG, query: str) -> str:
    """A class id from an id or a (case-insensitive) name; a clear error otherwise."""
    if query in crg.neighbors or query in crg.class_ids:
        return query
    by_name = {n.lower(): i for i, n in zip(crg.class_ids, crg.class_names)}
    if query.lower() in by_name:
        return by_name[query.lower()]
    import difflib

    close = difflib.get_close_matches(query.lower(), list(by_name), n=3)
    hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    raise CRGError(f"class {query!r} is not in the CRG{hint}")


def neighbourhood_graph(crg: CRG, class_id: str):
    """networkx DiGraph of the target, its neighbours, and the CRG edges among them (n -> class)."""
    import networkx as nx

    nodes = [class_id] + [n for n in crg.neighbors.get(class_id, []) if n != class_id]
    names = dict(zip(crg.class_ids, crg.class_names))
    g = nx.DiGraph()
    for n in nodes:
        g.add_node(n, label=names.get(n, n), target=(n == class_id))
    node_set = set(nodes)
    for dst in nodes:
        nbrs = crg.neighbors.get(dst, [])
        weights = crg.scores.get(dst, [])
        for k, src in enumerate(nbrs):
            # Fig. 9 draws information flowing *into* the target (red) and among the others (grey);
            # the target's own outgoing edges would only clutter the picture
            if src in node_set and src != dst and src != class_id:
                w = float(weights[k]) if k < len(weights) else 1.0
                g.add_edge(src, dst, weight=w, to_target=(dst == class_id))
    return g


def draw_neighbourhood(crg: CRG, query: str, out: str | Path, dpi: int = 150) -> dict:
    """Write a PNG of `query`'s neighbourhood; returns {"class", "neighbors", "edges", "path"}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import networkx as nx

    cid = resolve_class(crg, query)
    g = neighbourhood_graph(crg, cid)
    fig, ax = plt.subplots(figsize=(8, 8))
    pos = nx.shell_layout(g, nlist=[[cid], [n for n in g.nodes if n != cid]]) if g.number_of_nodes() > 1 \
        else {cid: (0.0, 0.0)}
    und = g.to_undirected()
    sizes = [300 + 250 * und.degree(n) for n in g.nodes]
    colors = ["#f28e2b" if g.nodes[n]["target"] else "#4e79a7" for n in g.nodes]
    weights = [d["weight"] for _, _, d in g.edges(data=True)]
    wmax = max(weights) if weights else 1.0
    other = [(u, v) for u, v, d in g.edges(data=True) if not d["to_target"]]
    to_t = [(u, v) for u, v, d in g.edges(data=True) if d["to_target"]]

    def widths(edges):
        return [0.8 + 3.2 * g.edges[e]["weight"] / wmax if wmax > 0 else 1.5 for e in edges]

    nx.draw_networkx_edges(g, pos, edgelist=other, edge_color="#9a9a9a", width=widths(other), ax=ax,
                           arrows=True, arrowsize=10, connectionstyle="arc3,rad=0.08", node_size=sizes)
    nx.draw_networkx_edges(g, pos, edgelist=to_t, edge_color="#d62728", width=widths(to_t), ax=ax,
                           arrows=True, arrowsize=14, node_size=sizes)
    nx.draw_networkx_nodes(g, pos, node_color=colors, node_size=sizes, ax=ax, edgecolors="white")
    nx.draw_networkx_labels(g, pos, labels={n: g.nodes[n]["label"] for n in g.nodes}, font_size=10, ax=ax)
    ax.set_title(f"CRG neighbourhood of '{g.nodes[cid]['label']}' (source: {crg.source}, "
                 f"{len(crg.neighbors.get(cid, []))} neighbours)")
    ax.axis("off")
    ax.margins(0.15)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return {"class": cid, "neighbors": list(crg.neighbors.get(cid, [])), "edges": g.number_of_edges(),
            "path": str(out)}
