"""DART = frozen backbone + ARM + top-K class-attentive aggregation + ATM (paper Fig. 2, Sec. 3.1).

Scores: S̃(i,c) = s·cos(x̃ⁱ, t_c), S*(i,c) = s·cos(x_origⁱ, t_c), ŷ_c = s·cos(h_mm^(c), t_c),
with s = the backbone's logit_scale.exp(), fixed.
Class-attentive feature: x_vis^(c) = g + α ⊙ p_c, g the L2-normalised global image feature, p_c the
L2-normalised mean of the top-K refined patches by S̃(·,c), α a learnt weight that starts at zero:
with the ATM's residual branches also at zero, an untrained DART scores exactly as the frozen VLP
(docs/model.md explains the choices where the paper is silent).
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field, replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from dart_core.arm import ARM
from dart_core.atm import ATM, NeighbourTable
from dart_core.backbone import FrozenBackbone


@dataclass
class DARTConfig:
    backbone: str = "ViT-B-16"
    pretrained: Optional[str] = "openai"
    prompt_template: str = "a photo of a {}."
    # ARM (Sec. 3.2, App. A)
    use_arm: bool = True
    arm_layers: int = 1
    lora_r: int = 32
    lora_alpha: int = 128
    arm_ffn_hidden: Optional[int] = None  # default: backbone width
    # aggregation (Sec. 3.1, App. D.2 Fig. 7c): K = round(share × patches), at least 1 — the paper's
    # K = 16 of ViT-B/16's 14×14 = 196 patches, as a share that means the same on any grid.
    top_k_share: float = 16 / 196
    # x_vis^(c) = g + α ⊙ p_c (g, p_c normalised): α weighs the top-K patch evidence, one weight per
    # dimension ("vector") or one in all ("scalar"); it starts at zero, so an untrained DART
    # scores exactly as the frozen VLP (docs/model.md).
    patch_gate: str = "vector"
    # ATM (Sec. 3.4, App. A/C)
    use_atm: bool = True
    atm_layers: int = 2
    gat_heads: int = 4
    # Inference only: run fusion + MM-ATM on each image's top-M classes by the pre-ATM score
    # (0 = every class, exact). Bounds the cost at large vocabularies; see README / benchmark.
    mm_candidates: int = 0
    # L_clsf (Eq. 1): w_image × the per-image pairwise ranking (MKT's; serves F1@K) + w_class × the
    # same hinge across the batch's images per class (serves mAP), on the scores s·cos ("logits"),
    # on cosines ("cos") or on each image's L2-normalised score vector ("normalized", as MKT).
    rank_image_weight: float = 1.0
    rank_class_weight: float = 1.0
    rank_on: str = "logits"
    ranking_margin: float = 1.0
    # L_wps (Eq. 4)
    use_wps: bool = True
    gamma_wps: float = 5.0
    # τ of the responsibilities Ẑ, Ẑ* (C.3-C.4). App. A: "the learned temperature value of the
    # pre-trained CLIP", fixed: 100. None = the backbone's own logit scale (the world's VLP: 14).
    wps_tau: Optional[float] = 100.0
    wps_hard_share: float = 16 / 196  # hard negatives per class, as a share of the patches (K=16 of 196)
    # log σ(·) sees β·cos − θ_c: β = the score scale (None) or a number; θ_c ("class") the batch's
    # mean best-patch prior score of class c, so that σ = 1/2 sits between present and absent
    # instead of at cos = 0, which every CLIP-like patch exceeds ("none": Eq. 4 as written).
    wps_sigmoid_scale: Optional[float] = None
    wps_threshold: str = "class"
    wps_reduction: str = "mean"  # one unit per known (image, class) pair; "sum" = Eq. 4 as written
    # L_penalty (Eq. 1): "relative" ||Δx̃||₁ / ||x_orig||₁ per patch (dimensionless, the same meaning
    # on any backbone) or "mean" |Δx̃|
    penalty: str = "relative"
    gamma_penalty: float = 1.0

    CHOICES = {"patch_gate": ("vector", "scalar"), "rank_on": ("logits", "cos", "normalized"),
               "wps_threshold": ("class", "none"), "wps_reduction": ("mean", "sum"),
               "penalty": ("relative", "mean")}

    def __post_init__(self):
        for name, allowed in self.CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"DART config {name}={getattr(self, name)!r}: choose one of {', '.join(allowed)}")
        for name in ("top_k_share", "wps_hard_share"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"DART config {name}={getattr(self, name)!r}: a share of the patches, in (0, 1]")

    def patches_to_keep(self, n_patches: int, share: float) -> int:
        return max(1, min(n_patches, round(share * n_patches)))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DARTConfig":
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown DART config keys: {sorted(unknown)}")
        return cls(**d)


@dataclass
class DARTOutput:
    logits: torch.Tensor  # (B, C) final scores ŷ
    patch_logits: torch.Tensor  # (B, P, C) S̃
    prior_logits: torch.Tensor  # (B, P, C) S* (no gradient)
    delta: torch.Tensor  # (B, P, D) Δx̃ (zeros without ARM)
    topk: torch.Tensor  # (B, C, K) indices of the selected patches per class
    zero_shot: torch.Tensor  # (B, C) the frozen VLP's own score s·cos(global, t_c)
    extras: dict = field(default_factory=dict)


class DART(nn.Module):
    def __init__(self, cfg: DARTConfig, backbone: FrozenBackbone | None = None, device: str = "cpu"):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone or FrozenBackbone(cfg.backbone, cfg.pretrained, cfg.prompt_template, device=device)
        if getattr(self.backbone, "pretrained_sha256", None) and cfg.pretrained != self.backbone.pretrained:
            # a weights file: the config (and so the checkpoint) names it by its absolute path
            self.cfg = cfg = replace(cfg, pretrained=self.backbone.pretrained)
        D = self.backbone.embed_dim
        self.arm = ARM(self.backbone, cfg.arm_layers, cfg.lora_r, cfg.lora_alpha, cfg.arm_ffn_hidden) if cfg.use_arm else None
        self.atm = ATM(D, cfg.gat_heads, cfg.atm_layers) if cfg.use_atm else None
        self.patch_gate = nn.Parameter(torch.zeros(1 if cfg.patch_gate == "scalar" else D))  # α, starts at 0
        self.scale = self.backbone.logit_scale
        self.register_buffer("text", torch.zeros(0, D), persistent=False)
        self.register_buffer("edge_index", torch.zeros(2, 0, dtype=torch.long), persistent=False)
        # the same graph as the ATM consumes it: each class's in-edges as a dense table (atm.py)
        self.register_buffer("graph_index", torch.zeros(0, 1, dtype=torch.long), persistent=False)
        self.register_buffer("graph_mask", torch.zeros(0, 1, dtype=torch.bool), persistent=False)
        self.class_names: list[str] = []
        self.mm_candidates = cfg.mm_candidates
        self.to(device)

    # ---- vocabulary ---------------------------------------------------------
    def set_classes(self, names: list[str], edge_index: torch.Tensor | None = None,
                    text: torch.Tensor | None = None) -> None:
        """Point the model at a vocabulary (any size, seen or unseen): text embeddings t_c from the
        frozen text tower and the CRG's edge_index (self-loops only when None). No retraining."""
        device = self.text.device
        t = text if text is not None else self.backbone.text_embeddings(list(names))
        C = len(names)
        if edge_index is None:
            edge_index = torch.arange(C).repeat(2, 1)
        if edge_index.numel() and int(edge_index.max()) >= C:
            raise ValueError(f"edge_index refers to class {int(edge_index.max())} but there are {C} classes")
        self.text = F.normalize(t.to(device).float(), dim=-1)
        self.edge_index = edge_index.to(device)
        self.graph_index, self.graph_mask = NeighbourTable.from_edge_index(self.edge_index, C)
        self.class_names = list(names)

    # ---- parameters ---------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v.detach().cpu() for k, v in self.state_dict().items() if k in names}

    def parameter_counts(self) -> dict[str, int]:
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        # The ARM's frozen q/k/v/out copies duplicate backbone weights; count them apart.
        frozen_copies = sum(p.numel() for n, p in self.named_parameters()
                            if not p.requires_grad and n.startswith("arm."))
        vision = sum(p.numel() for p in self.backbone.clip.visual.parameters())
        return {"total": total, "trainable": trainable, "frozen_backbone": total - trainable - frozen_copies,
                "arm_frozen_copies": frozen_copies, "vision_tower": vision,
                "arm": sum(p.numel() for p in self.arm.parameters() if p.requires_grad) if self.arm else 0,
                "atm": sum(p.numel() for p in self.atm.parameters()) if self.atm else 0}

    def backbone_fingerprint(self) -> str:
        """A short hash of the frozen weights: a checkpoint only loads onto the backbone it was trained on."""
        h = hashlib.sha256()
        v = self.backbone.clip.visual
        for t in (v.proj, v.class_embedding, self.backbone.clip.text_projection):
            if t is not None:
                h.update(t.detach().float().cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    @property
    def graph(self) -> NeighbourTable:
        return NeighbourTable(self.graph_index, self.graph_mask)

    # ---- forward ------------------------------------------------------------
    def _text_atm(self) -> torch.Tensor:
        """Text-ATM output h_txt: it depends on the vocabulary and the weights, not on the images,
        so without gradients it is computed once and reused until the text, the graph or a Text-ATM
        weight changes (every in-place update bumps a tensor's version counter)."""
        if torch.is_grad_enabled():
            return self.atm.text(self.text, self.graph)
        key = (self.text.data_ptr(), self.text._version, self.graph_index.data_ptr(), self.graph_index._version,
               tuple(p._version for p in self.atm.text_layers.parameters()))
        cached = getattr(self, "_h_txt_cache", None)
        if cached is None or cached[0] != key:
            cached = (key, self.atm.text(self.text, self.graph))
            self._h_txt_cache = cached
        return cached[1]

    def select_patches(self, patch_logits: torch.Tensor) -> torch.Tensor:
        """(B, C, K): each class's top-K patches by S̃ (chosen without gradient), K a share of the grid."""
        K = self.cfg.patches_to_keep(patch_logits.shape[1], self.cfg.top_k_share)
        return patch_logits.detach().topk(K, dim=1).indices.transpose(1, 2)

    def class_attentive(self, x_ref_n: torch.Tensor, g: torch.Tensor, topk: torch.Tensor) -> torch.Tensor:
        """x_vis^(c) = g + α·p_c, (B, C, D): p_c the normalised mean of class c's top-K refined patches
        (normalised features x_ref_n (B, P, D)), g the normalised global feature (B, D), α the learnt
        weight of the patch evidence (zero at init, so DART starts as the frozen VLP)."""
        B, P, _ = x_ref_n.shape
        K = topk.shape[2]
        # mean of the selected patches as a (B, C, P) averaging matrix times (B, P, D): never
        # materialises the (B, C, K, D) gather.
        weights = torch.zeros(B, topk.shape[1], P, device=x_ref_n.device, dtype=x_ref_n.dtype)
        weights.scatter_(2, topk, 1.0 / K)
        p_c = F.normalize(torch.bmm(weights, x_ref_n), dim=-1)
        return g.unsqueeze(1) + self.patch_gate * p_c

    def forward(self, images: torch.Tensor, with_priors: bool = True) -> DARTOutput:
        if self.text.shape[0] == 0:
            raise RuntimeError("call set_classes() before scoring")
        n_blocks = self.cfg.arm_layers if self.arm is not None else 0
        # The frozen backbone and the ARM's transformer layers run under the caller's autocast
        # (bf16 on a GPU); everything after them runs in fp32: in bf16, scores at scale 100 come in
        # steps of 0.125 (ties, coarse thresholds and top-K) and the ATM's softmaxes lose precision.
        feats = self.backbone.forward_features(images, n_blocks)
        delta = self.arm(feats) if self.arm is not None else None
        with torch.autocast(images.device.type, enabled=False):
            return self._head(feats, delta, with_priors)

    def _head(self, feats, delta: torch.Tensor | None, with_priors: bool) -> DARTOutput:
        """Scores from the backbone's features and the ARM's refinement, in fp32."""
        x_orig = feats.patch_features.float()
        t = self.text
        s = self.scale
        if delta is not None:
            delta = delta.float()
            x_ref = x_orig + delta  # x̃ = x_orig + Δx̃
        else:
            delta = torch.zeros_like(x_orig)
            x_ref = x_orig
        x_ref_n = F.normalize(x_ref, dim=-1)
        patch_logits = s * x_ref_n @ t.T  # S̃ (B, P, C)
        with torch.no_grad():
            prior = s * F.normalize(x_orig, dim=-1) @ t.T if with_priors else patch_logits.detach()  # S*
            g = F.normalize(feats.global_feature.float(), dim=-1)
            zero_shot = s * g @ t.T
        topk = self.select_patches(patch_logits)
        x_vis = self.class_attentive(x_ref_n, g, topk)
        M = self.mm_candidates if not self.training else 0
        if self.atm is not None and 0 < M < t.shape[0]:
            h_txt = self._text_atm()
            # classes outside an image's top-M keep their pre-ATM score s·cos(x_vis, t_c)
            logits = s * torch.einsum("bcd,cd->bc", F.normalize(x_vis, dim=-1), t)
            cand = logits.topk(M, dim=1).indices
            h = self.atm.multimodal_candidates(x_vis, h_txt, self.graph, cand)
            cand_logits = s * (F.normalize(h, dim=-1) * t[cand]).sum(-1)
            logits = logits.scatter(1, cand, cand_logits)
        else:
            if self.atm is not None:
                h_txt = self._text_atm()
                h = self.atm.multimodal(self.atm.fuse(x_vis, h_txt), self.graph)
            else:
                h = x_vis
            logits = s * torch.einsum("bcd,cd->bc", F.normalize(h, dim=-1), t)  # ŷ_c = s·cos(h^(c), t_c)
        return DARTOutput(logits, patch_logits, prior, delta, topk, zero_shot, {"scale": float(s), "x_orig": x_orig})
