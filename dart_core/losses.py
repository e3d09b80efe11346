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


def responsibilities(patch_logits: torch.Tensor, resp_scale: float = 1.0) -> torch.Tensor:
    """softmax over the patches (dim 1) of resp_scale × the scaled scores: Ẑ (C.3) from S̃, Ẑ* (C.4)
    from S*. resp_scale = τ_wps / τ when the temperature differs from the score scale."""
    return torch.softmax(resp_scale * patch_logits.detach(), dim=1)


def wps_loss(patch_logits: torch.Tensor, prior_logits: torch.Tensor, labels: torch.Tensor,
             lam: float, k_hard: int = 16, resp_scale: float = 1.0) -> torch.Tensor:
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
    return ((pos_term * pos + neg_term * neg).sum(dim=1)).mean()


def penalty_loss(delta: torch.Tensor) -> torch.Tensor:
    """L_penalty = ||Δx̃||₁ as a mean absolute value (Eq. 1; DESIGN.md)."""
    return delta.abs().mean()


def total_loss(out, labels: torch.Tensor, lam: float, cfg) -> tuple[torch.Tensor, dict[str, float]]:
    """Eq. 1: L = L_rank + γ_wps·L_wps + γ_pen·L_penalty. `out` is a DARTOutput, `cfg` a DARTConfig."""
    rank = ranking_loss(out.logits, labels, cfg.ranking_margin)
    loss = rank
    parts = {"rank": float(rank.detach())}
    if cfg.use_arm:
        pen = penalty_loss(out.delta)
        loss = loss + cfg.gamma_penalty * pen
        parts["penalty"] = float(pen.detach())
        if cfg.use_wps:
            resp_scale = cfg.wps_tau / out.extras["scale"] if cfg.wps_tau else 1.0
            wps = wps_loss(out.patch_logits, out.prior_logits, labels, lam, cfg.wps_k_hard, resp_scale)
            loss = loss + cfg.gamma_wps * wps
            parts["wps"] = float(wps.detach())
    parts["total"] = float(loss.detach())
    return loss, parts
