"""The frozen VLP backbone: an open_clip CLIP model whose weights never change (paper Sec. 3.1).

It exposes what DART needs: class text embeddings (prompt template configurable), the inputs and
outputs of the last `n_blocks` vision blocks (the ARM runs beside them), the patch tokens after
`ln_post` + visual projection, the global image feature, and `logit_scale`.

The main stream is computed by exactly the modules and operations of open_clip's own
`VisionTransformer.forward`, so `global_feature` is bit-identical to `model.encode_image` and
nothing DART attaches can change it.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

_CONFIG_DIR = Path(__file__).with_name("model_configs")
_registered = False


class BackboneError(ValueError):
    """A backbone that cannot be loaded or is not a ViT DART can attach to."""


def register_model_configs(extra_dir: str | Path | None = None) -> None:
    """Make the project's model configs (tiny test/demo CLIPs) known to open_clip by name."""
    global _registered
    import open_clip

    if not _registered:
        open_clip.add_model_config(_CONFIG_DIR)
        _registered = True
    if extra_dir is not None:
        open_clip.add_model_config(Path(extra_dir))


def patch_grid(model_name: str) -> tuple[int, int]:
    """The patch grid (rows, cols) of an open_clip ViT config, without building the model."""
    import open_clip

    register_model_configs()
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise BackboneError(f"unknown open_clip model {model_name!r}")
    v = cfg["vision_cfg"]
    size, patch = v.get("image_size", 224), v.get("patch_size", 16)
    size = (size, size) if isinstance(size, int) else tuple(size)
    return size[0] // patch, size[1] // patch


# ---- where the weights come from -----------------------------------------------------------------

_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
PROBE_TIMEOUT_S = 3.0


def is_weights_file(model_name: str, pretrained: str | None) -> bool:
    """Whether `pretrained` names a local weights file rather than an open_clip tag."""
    if not pretrained:
        return False
    if pretrained.endswith(_WEIGHT_SUFFIXES) or "/" in pretrained or os.sep in pretrained:
        return True
    import open_clip

    return Path(pretrained).is_file() and not open_clip.get_pretrained_cfg(model_name, pretrained)


_sha_memo: dict = {}


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (memoised per path, size and mtime)."""
    st = os.stat(path)
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _sha_memo:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _sha_memo[key] = h.hexdigest()
    return _sha_memo[key]


@contextlib.contextmanager
def quiet_random_init():
    """Drop open_clip's root-logger warning "No pretrained weights loaded ... initialized randomly"
    while building a model whose random initialisation is intended (pretraining from scratch,
    `--pretrained none`); any other log record passes."""
    def keep(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded for model")

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def _reachable(host: str, port: int, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when a TCP connection to host:port opens within `timeout` s (name lookup included,
    which has no timeout of its own, hence the thread); else the reason."""
    import socket
    import threading

    result: list = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(None)
        except OSError as e:
            result.append(f"{type(e).__name__}: {e}")

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return result[0] if result else f"no answer within {timeout:g} s"


def _proxy_for(url: str) -> tuple[str, int] | None:
    import urllib.request
    from urllib.parse import urlparse

    proxies = urllib.request.getproxies()
    u = urlparse(url)
    if urllib.request.proxy_bypass(u.hostname or ""):
        return None
    proxy = proxies.get(u.scheme) or proxies.get("all")
    if not proxy:
        return None
    pu = urlparse(proxy if "://" in proxy else f"http://{proxy}")
    return (pu.hostname, pu.port or (443 if pu.scheme == "https" else 80)) if pu.hostname else None


def check_downloadable(model_name: str, tag: str, cache_dir: str | None = None) -> None:
    """Before open_clip downloads the weights of a pretrained tag: if they are neither in the local
    cache nor reachable, raise one BackboneError at once (huggingface_hub would retry for about a
    minute before failing)."""
    import open_clip
    from urllib.parse import urlparse

    cfg = open_clip.get_pretrained_cfg(model_name, tag)
    if not cfg or "file" in cfg:
        return  # not a tag (open_clip names the problem), or weights already on disk
    hub_id = cfg.get("hf_hub", "")
    use_hub = bool(hub_id) and open_clip.pretrained.has_hf_hub()
    offline = False
    if use_hub:  # the file names open_clip asks the hub for, safetensors first
        from huggingface_hub import constants, try_to_load_from_cache

        repo, filename = os.path.split(hub_id)
        filename = filename or open_clip.pretrained.HF_WEIGHTS_NAME
        alternatives = getattr(open_clip.pretrained, "_get_safe_alternatives", lambda f: ())
        for name in (*alternatives(filename), filename):
            if isinstance(try_to_load_from_cache(repo, name, cache_dir=cache_dir), str):
                return
        where = constants.HF_HUB_CACHE if cache_dir is None else cache_dir
        url = f"{constants.ENDPOINT}/{repo}"
        offline = constants.HF_HUB_OFFLINE
    else:
        url = cfg.get("url", "")
        if not url:
            return
        where = cache_dir or os.path.expanduser("~/.cache/clip")
        if os.path.isfile(os.path.join(where, os.path.basename(url))):
            return
    u = urlparse(url)
    target = _proxy_for(url) or (u.hostname, u.port or (443 if u.scheme == "https" else 80))
    why = "HF_HUB_OFFLINE is set" if offline else _reachable(*target)
    if why is None:
        return
    raise BackboneError(
        f"cannot fetch the pretrained weights {model_name}/{tag}: they are not in the local cache ({where}) and "
        f"{target[0]} cannot be reached ({why}); download the checkpoint file on a connected machine and pass "
        f"--pretrained /path/to/file.pt")


@dataclass
class VisionFeatures:
    block_inputs: list[torch.Tensor]  # x_orig^{l-1} for the last n blocks, (B, 1+P, width) each
    block_outputs: list[torch.Tensor]  # x_orig^{l}   for the same blocks
    patch_features: torch.Tensor  # (B, P, D): ln_post + proj of the patch tokens (not normalised)
    global_feature: torch.Tensor  # (B, D): the CLIP image embedding (not normalised)
    grid: tuple[int, int]


class FrozenBackbone(nn.Module):
    def __init__(self, model_name: str = "ViT-B-16", pretrained: str | None = "openai",
                 prompt_template: str | list[str] = "a photo of a {}.", device: str | torch.device = "cpu",
                 cache_dir: str | None = None):
        super().__init__()
        import open_clip

        register_model_configs()
        if model_name not in open_clip.list_models():
            raise BackboneError(f"unknown open_clip model {model_name!r} (see open_clip.list_models())")
        # A weights file is kept by its absolute path (a checkpoint then loads from any working
        # directory) and its content hash (what a resumed run compares, not the path's spelling).
        self.pretrained_sha256: str | None = None
        if is_weights_file(model_name, pretrained):
            if not Path(pretrained).is_file():
                raise BackboneError(f"pretrained checkpoint {pretrained!r} not found")
            pretrained = str(Path(pretrained).resolve())
            self.pretrained_sha256 = file_sha256(pretrained)
        elif pretrained:
            check_downloadable(model_name, pretrained, cache_dir)
        try:
            with quiet_random_init() if not pretrained else contextlib.nullcontext():
                model, _, preprocess = open_clip.create_model_and_transforms(
                    model_name, pretrained=pretrained or None, device=device, cache_dir=cache_dir)
        except RuntimeError as e:  # open_clip's message for unknown tags / mismatched state dicts
            raise BackboneError(f"cannot load {model_name!r} with pretrained={pretrained!r}: {e}") from None
        self.model_name = model_name
        self.pretrained = pretrained
        self.clip = model.eval()
        self.clip.requires_grad_(False)
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.templates = [prompt_template] if isinstance(prompt_template, str) else list(prompt_template)
        for t in self.templates:
            if "{}" not in t:
                raise BackboneError(f"prompt template {t!r} has no '{{}}' for the class name")
        v = self.clip.visual
        if not hasattr(v, "transformer") or getattr(v, "attn_pool", None) is not None or v.pool_type != "tok":
            raise BackboneError(f"{model_name}: DART needs a ViT with a class token (pool_type 'tok', no attentional pool)")
        self.width = v.transformer.width
        self.heads = v.transformer.resblocks[0].attn.num_heads
        self.embed_dim = v.output_dim
        self.n_layers = len(v.transformer.resblocks)

    # The backbone never trains, whatever the caller does with .train().
    def train(self, mode: bool = True):
        super().train(False)
        return self

    @property
    def blocks(self) -> nn.ModuleList:
        return self.clip.visual.transformer.resblocks

    @property
    def logit_scale(self) -> float:
        """exp of CLIP's learned temperature: the fixed score scale and the WPS τ (App. A)."""
        return float(self.clip.logit_scale.exp())

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.clip.visual.grid_size)

    @torch.no_grad()
    def text_embeddings(self, names: list[str], batch_size: int = 256) -> torch.Tensor:
        """(C, D) L2-normalised; the mean over templates when several are given (then re-normalised)."""
        device = next(self.clip.parameters()).device
        out = []
        for start in range(0, len(names), batch_size):
            chunk = names[start:start + batch_size]
            emb = 0
            for t in self.templates:
                tokens = self.tokenizer([t.format(n) for n in chunk]).to(device)
                emb = emb + F.normalize(self.clip.encode_text(tokens).float(), dim=-1)
            out.append(F.normalize(emb, dim=-1))
        return torch.cat(out)

    @torch.no_grad()
    def forward_features(self, images: torch.Tensor, n_blocks: int = 0) -> VisionFeatures:
        """Run the frozen vision tower once, keeping what the ARM needs from its last `n_blocks`:
        each kept block's input and output, class token + patches, (B, 1 + P, width).

        The blocks run through open_clip's public `Transformer.forward_intermediates`, asked for
        the outputs of blocks `depth - n_blocks - 1 .. depth - 1`: block i's input is block i-1's
        output, and the first block's input is the embedded image itself (the ARM may sit beside
        every block). Not `VisionTransformer.forward_intermediates`: that one splits the class token
        off each intermediate, which the ARM attends over, so each would be concatenated back (one
        more copy per block). The embedding and pooling around the blocks are open_clip's own
        `_embeds` / `_pool`, the calls its forward makes; tests/test_model.py compares this path
        with `encode_image` bit for bit, and tests/test_backbone_features.py with a plain loop over
        the blocks."""
        v = self.clip.visual
        if images.shape[-2:] != tuple(v.image_size):
            raise BackboneError(f"images are {tuple(images.shape[-2:])}, the backbone expects {tuple(v.image_size)}")
        embedded = v._embeds(images)
        first_kept = self.n_layers - n_blocks
        if n_blocks == 0:
            x, ins, outs = v.transformer(embedded), [], []
        else:
            taken = list(range(max(first_kept - 1, 0), self.n_layers))
            x, features = v.transformer.forward_intermediates(embedded, indices=taken)
            outs = features[-n_blocks:]
            ins = [embedded if first_kept == 0 else features[0]] + outs[:-1]
        pooled, _ = v._pool(x)
        global_feature = pooled @ v.proj if v.proj is not None else pooled
        patches = v.ln_post(x[:, 1:])
        if v.proj is not None:
            patches = patches @ v.proj
        return VisionFeatures(ins, outs, patches, global_feature, self.grid_size)
