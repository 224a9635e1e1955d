"""CLIP for stage 3 and evaluation: a pretrained open_clip model (online), or a domain CLIP fitted offline.

No CLIP weights ship in any pip package, so offline the project fits a *domain CLIP* on the training
split: open_clip's ``HFTextEncoder`` (mean pooling) around the BERT-family text encoder in use, and an
image tower on the ImageNet-pretrained shift-tolerant AlexNet/VGG that ``stlpips-pytorch`` ships (the
perceptual network's backbone). Both backbones stay frozen; only the projection heads and the logit
scale are fitted, with ``open_clip.loss.ClipLoss``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from tqdm.auto import tqdm

from pokediff.errors import PokediffError
from pokediff.fileio import atomic_write

logger = logging.getLogger(__name__)

DOMAIN_CLIP_DIRNAME = "domain_clip"
METRICS_FILE = "retrieval_metrics.json"
CLIP_SOURCES = ("auto", "pretrained", "domain")
IMAGE_BACKBONES = ("alex", "vgg")


class ClipUnavailableError(PokediffError, RuntimeError):
    """Neither the requested pretrained open_clip weights nor a domain CLIP can be loaded."""


class DomainClipTooWeakError(PokediffError, RuntimeError):
    """The fitted domain CLIP does not retrieve val captions clearly better than chance."""


def hub_offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    return bool(constants.HF_HUB_OFFLINE) or env in ("1", "true", "yes", "on")


# ------------------------------------------------------------------------------ pretrained open_clip
def pretrained_clip_weights(model_name: str, pretrained: str) -> str | None:
    """Local file of ``model_name``/``pretrained`` weights if already on disk (a path or the HF cache), else None."""
    import open_clip
    from huggingface_hub import try_to_load_from_cache

    if pretrained and Path(pretrained).expanduser().is_file():
        return str(Path(pretrained).expanduser())
    if model_name not in open_clip.list_models():
        raise ValueError(f"clip.model '{model_name}' is not an open_clip model; see open_clip.list_models()")
    cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        raise ValueError(f"clip.pretrained '{pretrained}' is not a tag of open_clip '{model_name}'; known tags: {tags}")
    hub = cfg.get("hf_hub", "")
    if hub:
        # open_clip writes 'org/name/' (default file names) or 'org/name/file'
        parts = hub.split("/")
        repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        for name in names:
            cached = try_to_load_from_cache(repo_id, name)
            if isinstance(cached, str):
                return cached
    url = cfg.get("url", "")
    if url:
        local = Path("~/.cache/clip").expanduser() / os.path.basename(url)
        if local.is_file():
            return str(local)
    return None


def load_pretrained_clip(model_name: str, pretrained: str, device="cpu"):
    """(model, tokenizer) of an open_clip model; offline, missing weights fail at once with a clear error."""
    import open_clip

    local = pretrained_clip_weights(model_name, pretrained)
    if local is None and hub_offline():
        raise ClipUnavailableError(
            f"open_clip weights {model_name}/{pretrained} are not in the local cache and HF_HUB_OFFLINE=1; "
            "download them online once, or use clip.source=domain (a domain CLIP fitted on the training split)"
        )
    try:
        # require_pretrained: never fall back to a randomly initialised CLIP
        source = local if Path(pretrained).expanduser().is_file() else pretrained
        model = open_clip.create_model(model_name, pretrained=source, require_pretrained=True, weights_only=True)
    except Exception as err:  # open_clip raises bare RuntimeErrors for every download problem
        raise ClipUnavailableError(f"could not load open_clip {model_name}/{pretrained}: {err}") from err
    return model.to(device).eval(), open_clip.get_tokenizer(model_name)


# ---------------------------------------------------------------------------------------- domain CLIP
def _stlpips_backbone(net: str) -> nn.Module:
    from pokediff.models.perceptual import PerceptualLoss

    # The ST-LPIPS package ships the complete ImageNet-pretrained trunk (lpips downloads its trunk).
    return PerceptualLoss(backend="stlpips", net=net).net


class FeatureStandardizer(nn.Module):
    """(x - mean) / std with statistics of the training features, kept as buffers (saved with the model).

    Frozen-trunk features share a large common direction (sentence embeddings sit in a narrow cone), which
    a freshly initialised head cannot see past; centring them makes the pairs separable from step one.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    @torch.no_grad()
    def fit(self, features: torch.Tensor) -> None:
        self.mean.copy_(features.mean(dim=0))
        self.std.copy_(features.std(dim=0).clamp_min(1e-4) if features.shape[0] > 1 else torch.ones_like(self.std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def projection_head(in_dim: int, hidden_dim: int, out_dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        FeatureStandardizer(in_dim),
        nn.Linear(in_dim, hidden_dim),
        nn.GELU(),
        nn.Dropout(dropout),
        nn.Linear(hidden_dim, out_dim),
    )


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Differentiable Gaussian blur of (B, C, H, W) ``images``, kernel 2*ceil(3 sigma)+1, reflected borders."""
    from torchvision.transforms.functional import gaussian_blur as tv_blur

    size = 2 * math.ceil(3 * sigma) + 1
    return tv_blur(images, [size, size], [sigma, sigma])


class DomainImageTower(nn.Module):
    """Frozen ST-LPIPS trunk -> per-layer spatial mean and max -> trainable MLP projection."""

    def __init__(
        self, backbone: str, image_size: int, embed_dim: int, hidden_dim: int, dropout: float, blur_sigma: float = 0.0
    ):
        super().__init__()
        if backbone not in IMAGE_BACKBONES:
            raise ValueError(f"clip.domain_image_backbone must be one of {IMAGE_BACKBONES}, got '{backbone}'")
        lpips_net = _stlpips_backbone(backbone)
        self.scaling_layer = lpips_net.scaling_layer
        self.trunk = lpips_net.net
        self.trunk.requires_grad_(False)
        self.image_size, self.blur_sigma = image_size, blur_sigma
        feature_dim = 2 * sum(lpips_net.chns)
        self.proj = projection_head(feature_dim, hidden_dim, embed_dim, dropout)

    def backbone_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, feature_dim); differentiable w.r.t. the pixels."""
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W) in [-1, 1], got shape {tuple(pixel_values.shape)}")
        if self.blur_sigma > 0:
            pixel_values = gaussian_blur(pixel_values, self.blur_sigma)
        x = F.interpolate(
            pixel_values, size=(self.image_size, self.image_size), mode="bilinear", antialias=True, align_corners=False
        )
        feats = self.trunk(self.scaling_layer(x))
        pooled = [torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1) for f in feats]
        return torch.cat(pooled, dim=1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.proj(self.backbone_features(pixel_values))


class DomainCLIP(ModelMixin, ConfigMixin):
    """A small CLIP for one domain: open_clip ``HFTextEncoder`` text tower + ST-LPIPS image tower."""

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        text_config: dict,
        embed_dim: int = 256,
        image_backbone: str = "alex",
        image_size: int = 128,
        hidden_dim: int = 512,
        dropout: float = 0.1,
        max_text_length: int = 32,
        init_logit_scale: float = math.log(1 / 0.07),
        blur_sigma: float = 0.0,  # folders fitted before this key read sharp images
    ):
        super().__init__()
        from open_clip.hf_model import HFTextEncoder
        from transformers import AutoConfig

        text_config = dict(text_config)
        hf_config = AutoConfig.for_model(text_config.pop("model_type"), **text_config)
        self.text = HFTextEncoder(
            None, output_dim=embed_dim, config=hf_config, pooler_type="mean_pooler", proj_type="linear"
        )
        self.text.transformer.requires_grad_(False)
        # the same standardised MLP head as the image tower, in place of HFTextEncoder's bare projection
        self.text.proj = projection_head(hf_config.hidden_size, hidden_dim, embed_dim, dropout)
        self.visual = DomainImageTower(image_backbone, image_size, embed_dim, hidden_dim, dropout, blur_sigma)
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))

    def train(self, mode: bool = True):
        # frozen trunks stay in eval mode (no dropout) while the heads train
        super().train(mode)
        self.text.transformer.eval()
        self.visual.trunk.eval()
        return self

    def fit_feature_stats(self, image_backbone_features: torch.Tensor, text_backbone_features: torch.Tensor):
        """Set both heads' standardisers from training-set trunk features."""
        self.visual.proj[0].fit(image_backbone_features)
        self.text.proj[0].fit(text_backbone_features)

    def head_parameters(self) -> list[nn.Parameter]:
        return [*self.text.proj.parameters(), *self.visual.proj.parameters(), self.logit_scale]

    def text_backbone_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.text.transformer(input_ids=input_ids, attention_mask=attention_mask)
        return self.text.pooler(out, attention_mask)

    def encode_text(self, input_ids, attention_mask, normalize: bool = True) -> torch.Tensor:
        features = self.text.proj(self.text_backbone_features(input_ids, attention_mask))
        return F.normalize(features, dim=-1) if normalize else features

    def encode_image(self, pixel_values: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """``pixel_values`` (B, 3, H, W) in [-1, 1]."""
        features = self.visual(pixel_values)
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, pixel_values, input_ids, attention_mask) -> dict:
        # the dict open_clip's CLIP.forward returns, so ClipLoss(**out) works
        return {
            "image_features": self.encode_image(pixel_values),
            "text_features": self.encode_text(input_ids, attention_mask),
            "logit_scale": self.logit_scale.exp(),
        }


def _text_config_dict(hf_config) -> dict:
    data = hf_config.to_dict()
    for key in ("_name_or_path", "architectures", "transformers_version", "torch_dtype", "dtype"):
        data.pop(key, None)
    return data


def build_domain_clip(text_encoder_name: str, clip_cfg, max_text_length: int = 32):
    """(DomainCLIP with pretrained frozen towers and fresh heads, tokenizer)."""
    from pokediff.models.text import load_text_encoder

    tokenizer, text_model = load_text_encoder(text_encoder_name)
    if text_model.config.model_type not in _hf_arches():
        raise ValueError(
            f"text encoder '{text_encoder_name}' (model_type '{text_model.config.model_type}') is not a "
            f"family open_clip's HFTextEncoder supports: {sorted(_hf_arches())}"
        )
    model = DomainCLIP(
        text_config=_text_config_dict(text_model.config),
        embed_dim=clip_cfg.domain_embed_dim,
        image_backbone=clip_cfg.domain_image_backbone,
        image_size=clip_cfg.domain_image_size,
        hidden_dim=clip_cfg.domain_hidden_dim,
        max_text_length=max_text_length,
        blur_sigma=clip_cfg.domain_blur_sigma,
    )
    model.text.transformer.load_state_dict(text_model.state_dict())
    return model.eval(), tokenizer


def _hf_arches() -> set:
    from open_clip.hf_configs import arch_dict

    return set(arch_dict)


def save_domain_clip(model: DomainCLIP, tokenizer, path, metrics: dict | None = None) -> Path:
    """``path/`` = config.json + safetensors weights + tokenizer/ (+ retrieval_metrics.json), written atomically."""
    path = Path(path)
    with atomic_write(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp / "tokenizer")
        if metrics is not None:
            (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    return path


def is_domain_clip_dir(path) -> bool:
    path = Path(path)
    return (path / "config.json").is_file() and (path / "tokenizer").is_dir() and any(path.glob("*.safetensors"))


def load_domain_clip(path, device="cpu"):
    """(DomainCLIP, tokenizer, metrics or None) from a folder written by ``save_domain_clip``."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not is_domain_clip_dir(path):
        raise FileNotFoundError(f"{path} is not a domain CLIP folder (needs config.json, *.safetensors, tokenizer/)")
    # low_cpu_mem_usage=False: the image tower's constructor loads its trunk for real, no meta tensors
    model = DomainCLIP.from_pretrained(path, low_cpu_mem_usage=False).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
    metrics_file = path / METRICS_FILE
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else None
    return model, tokenizer, metrics


# ------------------------------------------------------------------------------------ fit + evaluate
def retrieval_accuracy(image_features: torch.Tensor, text_features: torch.Tensor, ks=(1, 5), captions=None) -> dict:
    """Image->text retrieval: row i of each is a matching pair; top-k accuracy vs chance k/N. With ``captions``
    (row i's caption text), rows sharing a caption share one candidate: N is then the number of distinct ones."""
    n = image_features.shape[0]
    if n == 0 or text_features.shape[0] != n:
        raise ValueError(f"need matching non-empty image/text features, got {n} and {text_features.shape[0]}")
    captions = list(range(n)) if captions is None else list(captions)
    first_row: dict = {}  # each distinct caption's first row, in order of appearance: the candidates
    for i, caption in enumerate(captions):
        first_row.setdefault(caption, i)
    position = {caption: j for j, caption in enumerate(first_row)}
    candidates = list(first_row.values())
    target = torch.tensor([position[c] for c in captions])
    sims = image_features @ text_features[candidates].T
    # rank of the true caption = how many candidates score strictly higher
    true = sims.gather(1, target[:, None])
    rank = (sims > true).sum(dim=1)
    out = {"n": n, "candidates": len(candidates)}
    for k in ks:
        out[f"top{k}"] = (rank < k).float().mean().item()
        out[f"chance_top{k}"] = min(k, len(candidates)) / len(candidates)
    return out


@torch.no_grad()
def _cache_backbone_features(
    model: DomainCLIP, tokenizer, loader, max_text_length, flips: bool, device, captions: Optional[list] = None
):
    """Frozen-trunk features of every image (and its mirror image) and every caption of a loader (``captions``,
    one per row in the loader's order, instead of the dataset's where given)."""
    from pokediff.data import tokenize_captions

    image_feats, flip_feats, texts = [], [], []
    for batch in tqdm(loader, desc="domain CLIP: image features", leave=False):
        px = batch["pixel_values"].to(device)
        image_feats.append(model.visual.backbone_features(px).cpu())
        if flips:
            flip_feats.append(model.visual.backbone_features(px.flip(-1)).cpu())
        texts.extend(batch["text"])
    captions = texts if captions is None else list(captions)
    if len(captions) != len(texts):
        raise ValueError(f"{len(captions)} captions for {len(texts)} images")
    tokens = tokenize_captions(tokenizer, captions, max_text_length)  # once: one truncation warning
    text_feats = [
        model.text_backbone_features(
            tokens["input_ids"][i : i + 64].to(device), tokens["attention_mask"][i : i + 64].to(device)
        ).cpu()
        for i in range(0, len(captions), 64)
    ]
    return torch.cat(image_feats), torch.cat(flip_feats) if flips else None, torch.cat(text_feats)


def _head_embeddings(model: DomainCLIP, image_feats, text_feats):
    return (F.normalize(model.visual.proj(image_feats), dim=-1), F.normalize(model.text.proj(text_feats), dim=-1))


def fit_domain_clip(
    clip_cfg,
    data_cfg,
    text_encoder_name: str,
    output_dir=None,
    splits=None,
    device="cpu",
    seed: int = 0,
    captions: Optional[dict] = None,
    captions_name: str = "dataset",
):
    """Fit a domain CLIP's heads on the train split; val retrieval in the returned metrics.

    ``captions``: {"train": [...], "val": [...]}, one text per row, instead of the dataset's captions, recorded
    in the metrics as ``captions_name`` (e.g. stage 3's "visual" captions: the CLIP is then fitted on the very
    texts its reward tells apart, and retrieval counts rows sharing a caption as one candidate).

    Returns (model, tokenizer, metrics). Saved to ``output_dir`` when given. The frozen trunks run once
    per image (plus its mirror image, the only augmentation that keeps captions true), so fitting the
    heads over many epochs is cheap.
    """
    from open_clip.loss import ClipLoss

    from pokediff.data import SpriteDataset, collate_sprites, load_splits

    torch.manual_seed(seed)
    splits = splits if splits is not None else load_splits(data_cfg)
    for name in ("train", "val"):
        if len(splits[name]) < 2:
            raise ValueError(f"the domain CLIP needs at least 2 rows in the '{name}' split, got {len(splits[name])}")
    model, tokenizer = build_domain_clip(text_encoder_name, clip_cfg, data_cfg.max_text_length)
    model.to(device)

    def loader(split):
        # no random augmentation: features are cached once
        ds = SpriteDataset(splits[split], data_cfg, train=False)
        return torch.utils.data.DataLoader(
            ds, batch_size=32, shuffle=False, collate_fn=collate_sprites, num_workers=data_cfg.num_workers
        )

    captions = captions or {}
    train_img, train_flip, train_txt = _cache_backbone_features(
        model, tokenizer, loader("train"), data_cfg.max_text_length, True, device, captions.get("train")
    )
    val_img, _, val_txt = _cache_backbone_features(
        model, tokenizer, loader("val"), data_cfg.max_text_length, False, device, captions.get("val")
    )

    model.fit_feature_stats(torch.cat([train_img, train_flip]), train_txt)
    model.train()
    optimizer = torch.optim.AdamW(
        model.head_parameters(), lr=clip_cfg.domain_learning_rate, weight_decay=clip_cfg.domain_weight_decay
    )
    loss_fn = ClipLoss()
    n = train_img.shape[0]
    batch_size = min(clip_cfg.domain_batch_size, n)
    steps_per_epoch = max(1, n // batch_size)
    total = clip_cfg.domain_epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=clip_cfg.domain_learning_rate, total_steps=max(total, 2), pct_start=0.1
    )
    losses = []
    for _ in tqdm(range(clip_cfg.domain_epochs), desc="domain CLIP: fitting heads", leave=False):
        order = torch.randperm(n)
        for step in range(steps_per_epoch):
            idx = order[step * batch_size : (step + 1) * batch_size]
            flip = torch.rand(len(idx)) < 0.5
            img = torch.where(flip[:, None], train_flip[idx], train_img[idx]).to(device)
            image_emb, text_emb = _head_embeddings(model, img, train_txt[idx].to(device))
            loss = loss_fn(image_emb, text_emb, model.logit_scale.exp())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            with torch.no_grad():  # CLIP's clamp: temperature no sharper than 1/100
                model.logit_scale.clamp_(0, math.log(100))
            losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        val_image_emb, val_text_emb = _head_embeddings(model, val_img.to(device), val_txt.to(device))
        val_loss = loss_fn(val_image_emb, val_text_emb, model.logit_scale.exp()).item()
    metrics = retrieval_accuracy(val_image_emb.cpu(), val_text_emb.cpu(), captions=captions.get("val"))
    metrics.update(
        {
            "split": "val",
            "captions": captions_name,
            "val_clip_loss": val_loss,
            "train_loss_first": losses[0] if losses else None,
            "train_loss_last": float(sum(losses[-steps_per_epoch:]) / len(losses[-steps_per_epoch:]))
            if losses
            else None,
            "epochs": clip_cfg.domain_epochs,
            "text_encoder": text_encoder_name,
            "image_backbone": f"stlpips-{clip_cfg.domain_image_backbone}",
            "blur_sigma": clip_cfg.domain_blur_sigma,
        }
    )
    metrics["top1_over_chance"] = metrics["top1"] / metrics["chance_top1"]
    logger.info(
        "domain CLIP val retrieval (image->text among %d distinct %s captions): top1 %.3f (chance %.3f), top5 %.3f "
        "(chance %.3f)",
        metrics["candidates"],
        captions_name,
        metrics["top1"],
        metrics["chance_top1"],
        metrics["top5"],
        metrics["chance_top5"],
    )
    if output_dir is not None:
        save_domain_clip(model, tokenizer, output_dir, metrics)
    return model, tokenizer, metrics


def check_domain_clip(metrics: dict, min_top1_over_chance: float) -> None:
    """Raise ``DomainClipTooWeakError`` unless val top-1 beats chance by the configured factor (0 disables)."""
    if min_top1_over_chance <= 0:
        return
    if metrics["top1"] < min_top1_over_chance * metrics["chance_top1"]:
        raise DomainClipTooWeakError(
            f"the domain CLIP retrieves val captions at top-1 {metrics['top1']:.3f} (top-5 {metrics['top5']:.3f}) "
            f"among {metrics['n']}; chance is {metrics['chance_top1']:.3f} and clip.min_top1_over_chance="
            f"{min_top1_over_chance} asks for {min_top1_over_chance * metrics['chance_top1']:.3f}. Stage 3 would "
            "train against noise, so it stops: fit longer (clip.domain_epochs), use more data, or a pretrained "
            "open_clip (clip.source=pretrained, online)"
        )


# ------------------------------------------------------------------------------------------- scoring
class ClipScorer(nn.Module):
    """Common face of both CLIPs: unit image/text embeddings and CLIP score (cosine x 100).

    ``image_features`` is differentiable w.r.t. the pixels (stage 3 backpropagates through it).
    """

    name: str = "clip"

    def image_features(self, images_0_1: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def text_features(self, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def _check(images_0_1, texts):
        if images_0_1.dim() != 4 or images_0_1.shape[1] != 3:
            raise ValueError(f"images must be (N, 3, H, W) in [0, 1], got shape {tuple(images_0_1.shape)}")
        if isinstance(texts, str) or len(texts) != images_0_1.shape[0]:
            raise ValueError(
                f"need one text per image: {images_0_1.shape[0]} images, "
                f"{1 if isinstance(texts, str) else len(texts)} texts"
            )

    def score(self, images_0_1: torch.Tensor, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """(N,) CLIP score = 100 x cosine(image, its text)."""
        self._check(images_0_1, texts)
        out = []
        with torch.no_grad():
            txt = self.text_features(list(texts)).float()  # all at once: one truncation warning
            for i in range(0, len(texts), batch_size):
                img = self.image_features(images_0_1[i : i + batch_size].to(self.device)).float()
                out.append(100.0 * (img * txt[i : i + batch_size]).sum(dim=-1).cpu())
        return torch.cat(out)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def logit_scale(self) -> torch.Tensor:
        """The CLIP's learned inverse temperature (exp of its logit_scale)."""
        return self.model.logit_scale.exp().float()


class OpenClipScorer(ClipScorer):
    def __init__(self, model, tokenizer, model_name: str, pretrained: str):
        super().__init__()
        import open_clip

        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = f"open_clip:{model_name}/{pretrained}"
        pp = open_clip.get_model_preprocess_cfg(model)
        size = pp.get("size", 224)
        self.image_size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        self.register_buffer("mean", torch.tensor(pp.get("mean", (0.48145466, 0.4578275, 0.40821073))).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(pp.get("std", (0.26862954, 0.26130258, 0.27577711))).view(1, 3, 1, 1))

    def image_features(self, images_0_1):
        # differentiable version of open_clip's resize + normalise (sprites are square: no crop needed)
        x = F.interpolate(images_0_1, size=self.image_size, mode="bicubic", antialias=True, align_corners=False)
        x = (x.clamp(0, 1) - self.mean) / self.std
        return F.normalize(self.model.encode_image(x), dim=-1)

    def text_features(self, texts):
        tokens = self.tokenizer(list(texts)).to(self.device)
        return F.normalize(self.model.encode_text(tokens), dim=-1)


class DomainClipScorer(ClipScorer):
    def __init__(self, model: DomainCLIP, tokenizer, path: str = "<memory>", metrics: dict | None = None):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_text_length = model.config.max_text_length
        self.metrics = metrics
        self.path = path
        self.name = f"domain_clip:{path}"

    def image_features(self, images_0_1):
        return self.model.encode_image(images_0_1 * 2 - 1)

    def text_features(self, texts):
        from pokediff.data import tokenize_captions

        tokens = tokenize_captions(self.tokenizer, list(texts), self.max_text_length)
        return self.model.encode_text(tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device))


def find_domain_clip(model_dir) -> Path | None:
    """``model_dir/domain_clip``, ``model_dir`` itself, or the run folder's ``domain_clip`` beside a pipeline
    folder (``model_dir/../domain_clip``): the first that is a domain CLIP folder."""
    if model_dir is None:
        return None
    model_dir = Path(model_dir)
    for candidate in (model_dir / DOMAIN_CLIP_DIRNAME, model_dir, model_dir.parent / DOMAIN_CLIP_DIRNAME):
        if is_domain_clip_dir(candidate):
            return candidate
    return None


def load_clip_scorer(model_dir=None, clip_cfg=None, device="cpu", source: str | None = None) -> ClipScorer:
    """The CLIP to score with: pretrained open_clip when available, else the domain CLIP beside ``model_dir``.

    ``source`` (default ``clip_cfg.source`` or "auto"): "pretrained" / "domain" force one; "auto" tries
    pretrained first and says in the log why it fell back. Raises ``ClipUnavailableError`` naming both
    reasons when nothing can be loaded.
    """
    from pokediff.config import ClipConfig

    clip_cfg = clip_cfg or ClipConfig()
    source = source or getattr(clip_cfg, "source", "auto")
    if source not in CLIP_SOURCES:
        raise ValueError(f"clip.source must be one of {CLIP_SOURCES}, got '{source}'")
    reasons = []
    if source in ("auto", "pretrained"):
        try:
            model, tokenizer = load_pretrained_clip(clip_cfg.model, clip_cfg.pretrained, device)
            return OpenClipScorer(model, tokenizer, clip_cfg.model, clip_cfg.pretrained).to(device)
        except ClipUnavailableError as err:
            if source == "pretrained":
                raise
            reasons.append(str(err))
            logger.info("pretrained CLIP unavailable, looking for a domain CLIP: %s", err)
    found = find_domain_clip(model_dir)
    if found is not None:
        model, tokenizer, metrics = load_domain_clip(found, device)
        return DomainClipScorer(model, tokenizer, str(found), metrics).to(device)
    reasons.append(
        f"no domain CLIP at {model_dir}/{DOMAIN_CLIP_DIRNAME}, {model_dir} or {Path(model_dir).parent}/{DOMAIN_CLIP_DIRNAME}"
        if model_dir
        else "no model_dir given to look for a domain CLIP in"
    )
    raise ClipUnavailableError("no CLIP available for scoring: " + "; ".join(reasons))
