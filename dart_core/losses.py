"""DART's training objective (paper Eq. 1, Eq. 4, App. C.1). Labels are int in {1, -1, 0 (unknown)}."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def pairwise_hinge(scores: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor,
                   margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of `scores` (N, M): Σ over (negative i, positive j) of relu(margin + s_i - s_j),
    and the number of violating pairs (margin + s_i - s_j > 0); `pos`, `neg` bool masks (N, M).

    Without the (N, M, M) pair tensor and without a data-dependent shape (no host sync): per row
    the negatives' scores are sorted once, and each positive's violators (s_i > s_j - margin) are a
    suffix found by searchsorted, whose sum is a suffix sum — O(N·M log M), exact."""
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
    """Pairwise hinge ranking loss (L_clsf of Eq. 1, following MKT).

    Per image: sum over (negative i, positive j) of relu(margin + s_i - s_j), divided by the number
    of violating pairs (0 when none); mean over all images. Unknown labels take no part.
    scores, labels (B, C) -> scalar."""
    hinge, violating = pairwise_hinge(scores, labels == 1, labels == -1, margin)
    return (hinge / violating.clamp(min=1)).mean()


def class_ranking_loss(scores: torch.Tensor, labels: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """The same pairwise hinge across images instead of across classes: for each class, the sum over
    (negative image i, positive image j) of relu(margin + s_i - s_j) divided by the number of
    violating pairs (0 when none); mean over the classes that have both a positive and a negative in
    the batch. It ranks each class's images, which is what mAP measures. scores, labels (B, C)."""
    pos, neg = labels.t() == 1, labels.t() == -1
    hinge, violating = pairwise_hinge(scores.t(), pos, neg, margin)
    valid = (pos.any(1) & neg.any(1)).to(scores.dtype)  # a mask, not an index: no host sync
    return (hinge / violating.clamp(min=1) * valid).sum() / valid.sum().clamp(min=1)


def responsibilities(patch_logits: torch.Tensor, resp_scale: float = 1.0) -> torch.Tensor:
    """softmax over the patches (dim 1) of resp_scale × the scaled scores: Ẑ (C.3) from S̃, Ẑ* (C.4)
    from S*. resp_scale = τ_wps / τ when the temperature differs from the score scale."""
    return torch.softmax(resp_scale * patch_logits.detach(), dim=1)


def wps_loss(patch_logits: torch.Tensor, prior_logits: torch.Tensor, labels: torch.Tensor,
             lam: float, k_hard: int = 16, resp_scale: float = 1.0, reduction: str = "sum") -> torch.Tensor:
    """Weakly supervised Patch Selecting loss (Eq. 4 / C.11).

    patch_logits S̃ (B,P,C) and prior_logits S* (B,P,C) are already scaled by τ = CLIP's scale.
    Positive classes: -Σ_i (λ z*_i + (1-λ) z_i) log σ(S̃_i), with z = softmax_i(S̃) detached (the
    E-step responsibilities, C.3) and z* = softmax_i(S*) (C.4). Negative classes: -Σ over the k_hard
    patches with the largest S̃ (chosen without gradient, C.10) of log σ(-S̃_j). Unknown: nothing.
    Summed over classes and patches, averaged over the batch. `resp_scale` multiplies the logits
    inside the two softmaxes only: τ_wps / τ when the responsibilities' temperature differs from the
    score scale (DARTConfig.wps_tau)."""
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
    """L_penalty = ||Δx̃||₁ (Eq. 1): the mean absolute value, or, with `reference` (x_orig), each
    patch's ||Δx̃||₁ / ||x_orig||₁ averaged — the refinement's size relative to the feature it refines."""
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
    """The terms of Eq. 1 as {name: (weight, unweighted value)}; `out` is a DARTOutput, `cfg` a
    DARTConfig. L_clsf is the per-image ranking ("rank") and/or the per-class one ("rank_class")."""
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
    """Eq. 1: L = L_clsf + γ_wps·L_wps + γ_pen·L_penalty; returns the loss and each unweighted term
    (and the total) as floats."""
    return weighted_sum(loss_terms(out, labels, lam, cfg))
