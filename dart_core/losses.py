r"""DART's training objective (paper Eq. 1, Eq. 4, App. C.1). Labels are int in {1, -1, 0 (unknown)}.

.. math::
    \mathcal{L} = \mathcal{L}_{clsf} + \gamma_{wps}\,\mathcal{L}_{wps} + \gamma_{pen}\,\mathcal{L}_{penalty}
    \qquad \text{(Eq. 1)}

:math:`\mathcal{L}_{clsf}`: :func:`ranking_loss` (per image, the paper's) and :func:`class_ranking_loss`
(per class, our addition); :math:`\mathcal{L}_{wps}`: :func:`wps_loss` (Eq. 4 / C.11);
:math:`\mathcal{L}_{penalty}`: :func:`penalty_loss`. :func:`loss_terms` assembles them from a model
output and a DARTConfig; the choices where the paper is silent are in docs/model.md.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def pairwise_hinge(scores: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor,
                   margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The pairwise hinge of each row and its number of violating pairs:

    .. math::
        h_n = \sum_{i \in \mathcal{N}_n} \sum_{j \in \mathcal{P}_n} \max(0,\, m + s_{n,i} - s_{n,j}),
        \qquad v_n = \big|\{(i, j) : m + s_{n,i} - s_{n,j} > 0\}\big|

    :math:`\mathcal{P}_n`, :math:`\mathcal{N}_n` the positives and negatives of row :math:`n`.
    Without the (N, M, M) pair tensor and without a data-dependent shape (no host sync): per row
    the negatives' scores are sorted once, and each positive's violators (s_i > s_j - margin) are a
    suffix found by searchsorted, whose sum is a suffix sum — O(N·M log M), exact.

    Args:
        scores (Tensor): :math:`s`, one row per ranking.
        pos (Tensor): bool, True where the entry is a positive.
        neg (Tensor): bool, True where the entry is a negative (neither: takes no part).
        margin (float): :math:`m`.

    Shapes:
        - **input:** scores, pos, neg :math:`(N, M)`
        - **output:** :math:`(h, v)`, each :math:`(N,)`
    """
    M = scores.shape[1]
    # non-negatives sit below every threshold s_j - margin, so no suffix ever includes them
    floor = scores.detach().min() - abs(margin) - 1.0
    neg_sorted, _ = torch.where(neg, scores, floor).sort(dim=1)  # ascending, (N, M)
    suffix = torch.cat([neg_sorted.flip(1).cumsum(1).flip(1), torch.zeros_like(scores[:, :1])], dim=1)  # (N, M+1)
    threshold = (scores - margin).detach().contiguous()
    first = torch.searchsorted(neg_sorted.detach().contiguous(), threshold, right=True)  # (N, M)
    count = (M - first).to(scores.dtype) * pos  # violators of each positive j
    hinge = (count * (margin - scores) + suffix.gather(1, first) * pos).sum(1)
    return hinge, count.sum(1)


def ranking_loss(scores: torch.Tensor, labels: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    r"""Pairwise hinge ranking loss per image (:math:`\mathcal{L}_{clsf}` of Eq. 1, following MKT):

    .. math::
        \mathcal{L}_{rank} = \frac{1}{B} \sum_{b=1}^{B} \frac{1}{\max(1, v_b)}
        \sum_{i: y_{b,i} = -1} \; \sum_{j: y_{b,j} = 1} \max(0,\, m + s_{b,i} - s_{b,j})

    :math:`v_b` the number of violating pairs of image :math:`b` (the term is 0 when none).
    Unknown labels (0) take no part.

    Args:
        scores (Tensor): :math:`s`, the class scores of each image.
        labels (Tensor): :math:`y \in \{1, -1, 0\}`.
        margin (float): :math:`m` (default 1).

    Shapes:
        - **input:** scores, labels :math:`(B, C)`
        - **output:** scalar
    """
    hinge, violating = pairwise_hinge(scores, labels == 1, labels == -1, margin)
    return (hinge / violating.clamp(min=1)).mean()


def class_ranking_loss(scores: torch.Tensor, labels: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    r"""The same pairwise hinge across images instead of across classes (our addition to
    :math:`\mathcal{L}_{clsf}`, docs/model.md): it ranks each class's images, which is what mAP measures.

    .. math::
        \mathcal{L}_{rank\_class} = \frac{1}{|\mathcal{C}'|} \sum_{c \in \mathcal{C}'}
        \frac{1}{\max(1, v_c)} \sum_{i: y_{i,c} = -1} \; \sum_{j: y_{j,c} = 1}
        \max(0,\, m + s_{i,c} - s_{j,c})

    :math:`\mathcal{C}'` the classes with both a positive and a negative in the batch,
    :math:`v_c` the number of violating pairs of class :math:`c`. Unknown labels take no part.

    Args:
        scores (Tensor): :math:`s`, the class scores of each image.
        labels (Tensor): :math:`y \in \{1, -1, 0\}`.
        margin (float): :math:`m` (default 1).

    Shapes:
        - **input:** scores, labels :math:`(B, C)`
        - **output:** scalar
    """
    pos, neg = labels.t() == 1, labels.t() == -1
    hinge, violating = pairwise_hinge(scores.t(), pos, neg, margin)
    valid = (pos.any(1) & neg.any(1)).to(scores.dtype)  # a mask, not an index: no host sync
    return (hinge / violating.clamp(min=1) * valid).sum() / valid.sum().clamp(min=1)


def responsibilities(patch_logits: torch.Tensor, resp_scale: float = 1.0) -> torch.Tensor:
    r"""The E-step responsibilities, detached: Ẑ (C.3) from S̃, Ẑ* (C.4) from S*.

    .. math::
        \hat{z}_{b,i,c} = \operatorname{softmax}_{i}\big(\rho \cdot S_{b,i,c}\big)

    Args:
        patch_logits (Tensor): :math:`S`, scores already scaled by :math:`\tau`.
        resp_scale (float): :math:`\rho = \tau_{wps} / \tau` when the temperature differs from the
            score scale (default 1).

    Shapes:
        - **input:** :math:`(B, P, C)`
        - **output:** :math:`(B, P, C)`, summing to 1 over the patches (dim 1)
    """
    return torch.softmax(resp_scale * patch_logits.detach(), dim=1)


def wps_loss(patch_logits: torch.Tensor, prior_logits: torch.Tensor, labels: torch.Tensor,
             lam: float, k_hard: int = 16, resp_scale: float = 1.0, reduction: str = "sum") -> torch.Tensor:
    r"""Weakly supervised Patch Selecting loss (Eq. 4 / C.11).

    .. math::
        \ell_{b,c} =
        \begin{cases}
        -\sum_{i=1}^{P} \big(\lambda \hat{z}^{*}_{b,i,c} + (1-\lambda)\,\hat{z}_{b,i,c}\big)
            \log \sigma(\tilde{S}_{b,i,c}) & y_{b,c} = 1 \quad \text{(C.5, C.8)} \\
        -\sum_{j \in \mathrm{TopK}_j(\mathrm{sg}[\tilde{S}_{b,j,c}])} \log \sigma(-\tilde{S}_{b,j,c})
            & y_{b,c} = -1 \quad \text{(C.9-C.10)} \\
        0 & y_{b,c} = 0
        \end{cases}

    .. math::
        \mathcal{L}_{wps} = \frac{1}{B} \sum_{b,c} \ell_{b,c} \quad (\text{"sum", Eq. 4 as written})
        \qquad \text{or} \qquad
        \frac{\sum_{b,c} \ell'_{b,c}}{|\{(b, c) : y_{b,c} \neq 0\}|} \quad (\text{"mean"})

    with :math:`\hat{z} = \operatorname{softmax}_i(\rho\,\tilde{S})` (C.3) and
    :math:`\hat{z}^{*} = \operatorname{softmax}_i(\rho\,S^{*})` (C.4), both detached
    (:func:`responsibilities`), and :math:`\ell'` equal to :math:`\ell` except that a negative's K
    hard patches are averaged (divided by K) — one unit per known (image, class) pair
    (docs/model.md). The hard negatives are chosen without gradient.

    Args:
        patch_logits (Tensor): :math:`\tilde{S}`, the refined patches' scores, scaled by
            :math:`\tau` (CLIP's score scale).
        prior_logits (Tensor): :math:`S^{*}`, the frozen patches' scores, scaled likewise.
        labels (Tensor): :math:`y \in \{1, -1, 0\}`.
        lam (float): :math:`\lambda`, the weight of the prior (1 → 0 over training, App. A).
        k_hard (int): K, the hard-negative patches per negative class (at most P).
        resp_scale (float): :math:`\rho`, multiplies the logits inside the two softmaxes only:
            :math:`\tau_{wps} / \tau` when the responsibilities' temperature differs from the score
            scale (``DARTConfig.wps_tau``).
        reduction (str): ``"sum"`` or ``"mean"``, as above.

    Shapes:
        - **input:** patch_logits, prior_logits :math:`(B, P, C)`; labels :math:`(B, C)`
        - **output:** scalar
    """
    B, P, C = patch_logits.shape
    if labels.shape != (B, C):
        raise ValueError(f"labels {tuple(labels.shape)} do not match scores (B={B}, C={C})")
    pos = (labels == 1).to(patch_logits.dtype)  # (B, C)
    neg = (labels == -1).to(patch_logits.dtype)
    with torch.no_grad():
        z = responsibilities(patch_logits, resp_scale)  # Ẑ (C.3)
        z_prior = responsibilities(prior_logits, resp_scale)  # Ẑ* (C.4)
        z_smooth = lam * z_prior + (1.0 - lam) * z  # Ẑ' (C.5)
    pos_term = -(z_smooth * F.logsigmoid(patch_logits)).sum(dim=1)  # (B, C)   (C.8)
    k = min(k_hard, P)
    hard_idx = patch_logits.detach().topk(k, dim=1).indices  # sg[S̃] top-K  (C.10)
    hard = patch_logits.gather(1, hard_idx)
    neg_term = -F.logsigmoid(-hard).sum(dim=1)  # (B, C)   (C.9-C.10)
    if reduction == "mean":  # one unit per known (image, class) pair: its responsibilities sum to 1,
        # its hard negatives are averaged
        per_pair = pos_term * pos + neg_term * neg / k
        return per_pair.sum() / (pos + neg).sum().clamp(min=1)
    return ((pos_term * pos + neg_term * neg).sum(dim=1)).mean()


def penalty_loss(delta: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
    r""":math:`\mathcal{L}_{penalty} = \lVert\Delta\tilde{\mathbf{x}}\rVert_1` (Eq. 1), as a mean:

    .. math::
        \mathcal{L}_{penalty} = \operatorname{mean}\,\lvert\Delta\tilde{\mathbf{x}}\rvert
        \qquad \text{or, with a reference,} \qquad
        \frac{1}{BP}\sum_{b,i} \frac{\lVert\Delta\tilde{\mathbf{x}}_{b,i}\rVert_1}
        {\max(10^{-6}, \lVert\mathbf{x}_{orig,\,b,i}\rVert_1)}

    the second the refinement's size relative to the feature it refines (``penalty="relative"``).

    Args:
        delta (Tensor): :math:`\Delta\tilde{\mathbf{x}}`, the ARM's residual.
        reference (Tensor, optional): :math:`\mathbf{x}_{orig}`, the frozen patch features.

    Shapes:
        - **input:** delta, reference :math:`(B, P, D)`
        - **output:** scalar
    """
    if reference is None:
        return delta.abs().mean()
    return (delta.abs().sum(-1) / reference.abs().sum(-1).clamp(min=1e-6)).mean()


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_batch(t: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of `t`, in rank order, with gradients flowing back to each rank's own rows
    (a no-op in one process). Terms that compare images (per-class ranking, the per-class WPS
    threshold) thus see the global batch under DDP, as one process with the whole batch would."""
    if _world() == 1:
        return t
    import torch.distributed as dist
    import torch.distributed.nn.functional as dist_nn

    if t.requires_grad:
        out = torch.cat(dist_nn.all_gather(t), dim=0)
        # the backward sends each rank its rows' gradient with an all-to-all that reads the memory
        # as laid out: a transposed (non-contiguous) gradient would arrive scrambled
        out.register_hook(lambda g: g.contiguous())
        return out
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=0)


def loss_terms(out, labels: torch.Tensor, lam: float, cfg) -> dict[str, tuple[float, torch.Tensor]]:
    r"""The terms of Eq. 1 as {name: (weight, unweighted value)}:

    .. math::
        \mathcal{L} = w_{img}\,\mathcal{L}_{rank} + w_{cls}\,\mathcal{L}_{rank\_class}
        + \gamma_{pen}\,\mathcal{L}_{penalty} + \gamma_{wps}\,\mathcal{L}_{wps}

    ``rank`` / ``rank_class`` (:math:`\mathcal{L}_{clsf}`) on the scores as ``cfg.rank_on`` says;
    ``penalty`` and ``wps`` only with the ARM (``wps`` only with ``cfg.use_wps``). For WPS the
    sigmoid sees :math:`\beta\cos` (``cfg.wps_sigmoid_scale``, default the score scale), shifted by
    the per-class threshold :math:`\theta_c` (the global batch's mean best-patch prior score) with
    ``wps_threshold="class"``; the softmaxes see :math:`\tau_{wps}\cos`. A ranking term whose
    weight is 0 is left out.

    Args:
        out (DARTOutput): the model's output (logits, patch/prior logits, delta, extras["scale"]).
        labels (Tensor): :math:`y \in \{1, -1, 0\}`, :math:`(B, C)`.
        lam (float): WPS's :math:`\lambda` at this step.
        cfg (DARTConfig): weights and the choices above.

    Shapes:
        - **output:** {name: (float weight, scalar Tensor)}
    """
    s = out.extras["scale"]
    scores = out.logits
    if cfg.rank_on == "cos":
        scores = scores / s
    elif cfg.rank_on == "normalized":
        scores = F.normalize(scores, dim=1)
    terms = {}
    if cfg.rank_image_weight:
        terms["rank"] = (cfg.rank_image_weight, ranking_loss(scores, labels, cfg.ranking_margin))
    if cfg.rank_class_weight:
        terms["rank_class"] = (cfg.rank_class_weight,
                               class_ranking_loss(gather_batch(scores), gather_batch(labels), cfg.ranking_margin))
    if cfg.use_arm:
        ref = out.extras.get("x_orig") if cfg.penalty == "relative" else None
        terms["penalty"] = (cfg.gamma_penalty, penalty_loss(out.delta, ref))
        if cfg.use_wps:
            tau = cfg.wps_tau or s
            beta = cfg.wps_sigmoid_scale or s  # the sigmoid sees beta·cos, the softmax tau·cos
            k = cfg.patches_to_keep(out.patch_logits.shape[1], cfg.wps_hard_share)
            sl, pl = out.patch_logits * (beta / s), out.prior_logits * (beta / s)
            if cfg.wps_threshold == "class":
                theta = gather_batch(pl.detach().amax(dim=1)).mean(dim=0)  # (C,) over the global batch
                sl, pl = sl - theta, pl - theta  # softmax over patches is unchanged by the shift
            terms["wps"] = (cfg.gamma_wps, wps_loss(sl, pl, labels, lam, k, tau / beta, cfg.wps_reduction))
    return terms


def weighted_total(terms: dict[str, tuple[float, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ weight × term over `loss_terms`, and the unweighted terms then the total as one detached
    fp32 vector on the device (read it when needed: no host sync here)."""
    loss = sum(w * t for w, t in terms.values())
    stats = torch.stack([t.detach().float() for _, t in terms.values()] + [loss.detach().float()])
    return loss, stats


def weighted_sum(terms: dict[str, tuple[float, torch.Tensor]]) -> tuple[torch.Tensor, dict[str, float]]:
    """Σ weight × term over `loss_terms`, and each unweighted term (and the total) as floats."""
    loss, stats = weighted_total(terms)
    return loss, dict(zip([*terms, "total"], stats.tolist()))


def total_loss(out, labels: torch.Tensor, lam: float, cfg) -> tuple[torch.Tensor, dict[str, float]]:
    r"""Eq. 1, :math:`\mathcal{L} = \mathcal{L}_{clsf} + \gamma_{wps}\,\mathcal{L}_{wps}
    + \gamma_{pen}\,\mathcal{L}_{penalty}` (:func:`loss_terms` summed); returns the loss and each
    unweighted term (and the total) as floats."""
    return weighted_sum(loss_terms(out, labels, lam, cfg))
