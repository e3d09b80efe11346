"""DART's training objective (paper Eq. 1, Eq. 4, App. C.1). Labels are int in {1, -1, 0 (unknown)}."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def ranking_loss(scores: torch.Tensor, labels: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """Pairwise hinge ranking loss (L_clsf of Eq. 1, following MKT).

    Per image: sum over (negative i, positive j) of relu(margin + s_i - s_j), divided by the number
    of violating pairs (0 when none); mean over all images. Unknown labels take no part."""
    neg = (labels == -1).to(scores.dtype)
    # Gather each image's positives into a padded (B, Pmax) block: images carry few positives, so
    # (B, C, Pmax) stays small where a (B, C, C) pair matrix would not at Open Images' 7k classes.
    is_pos = labels == 1
    n_pos = is_pos.sum(dim=1)
    p_max = max(int(n_pos.max()) if n_pos.numel() else 0, 1)
    order = torch.argsort(is_pos.to(torch.int8), dim=1, descending=True, stable=True)[:, :p_max]
    pos_scores = scores.gather(1, order)  # (B, Pmax)
    pos_valid = (torch.arange(p_max, device=scores.device).unsqueeze(0) < n_pos.unsqueeze(1)).to(scores.dtype)
    diff = margin + scores.unsqueeze(2) - pos_scores.unsqueeze(1)  # [b, i, j] = m + s_i - s_j
    pair = neg.unsqueeze(2) * pos_valid.unsqueeze(1)
    hinge = F.relu(diff) * pair
    violating = ((diff > 0).to(scores.dtype) * pair).sum(dim=(1, 2))
    per_image = hinge.sum(dim=(1, 2)) / violating.clamp(min=1)
    return per_image.mean()


def class_ranking_loss(scores: torch.Tensor, labels: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """The same pairwise hinge across images instead of across classes: for each class, the sum over
    (negative image i, positive image j) of relu(margin + s_i - s_j) divided by the number of
    violating pairs (0 when none); mean over the classes that have both a positive and a negative in
    the batch. It ranks each class's images, which is what mAP measures.

    Computed without the (C, B, B) pair tensor: per class the negatives' scores are sorted once, and
    each positive's violators (s_i > s_j - margin) are a suffix found by searchsorted, whose sum is a
    suffix sum — O(C·B log B) memory-light, exact (tested against the pairwise form)."""
    s = scores.t()  # (C, B)
    pos, neg = labels.t() == 1, labels.t() == -1
    n_neg, n_pos = neg.sum(1), pos.sum(1)
    # non-negatives sit below every threshold s_j - margin, so no suffix ever includes them
    floor = s.detach().min() - abs(margin) - 1.0
    neg_sorted, _ = torch.where(neg, s, floor).sort(dim=1)  # ascending, (C, B)
    suffix = torch.cat([neg_sorted.flip(1).cumsum(1).flip(1), torch.zeros_like(s[:, :1])], dim=1)  # (C, B+1)
    threshold = (s - margin).detach().contiguous()
    first = torch.searchsorted(neg_sorted.detach().contiguous(), threshold, right=True)  # (C, B)
    count = (s.shape[1] - first).to(s.dtype) * pos  # violators of each positive j
    hinge = (count * (margin - s) + suffix.gather(1, first) * pos).sum(1)
    violating = count.sum(1)
    valid = (n_pos > 0) & (n_neg > 0)
    per_class = hinge / violating.clamp(min=1)
    return per_class[valid].sum() / valid.sum().clamp(min=1)


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


def weighted_sum(terms: dict[str, tuple[float, torch.Tensor]]) -> tuple[torch.Tensor, dict[str, float]]:
    """Σ weight × term over `loss_terms`, and each unweighted term (and the total) as floats."""
    loss = sum(w * t for w, t in terms.values())
    parts = {name: float(t.detach()) for name, (_, t) in terms.items()}
    parts["total"] = float(loss.detach())
    return loss, parts


def total_loss(out, labels: torch.Tensor, lam: float, cfg) -> tuple[torch.Tensor, dict[str, float]]:
    """Eq. 1: L = L_clsf + γ_wps·L_wps + γ_pen·L_penalty; returns the loss and each unweighted term
    (and the total) as floats."""
    return weighted_sum(loss_terms(out, labels, lam, cfg))
