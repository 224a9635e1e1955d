"""ViTGAN (Lee et al., ICLR 2022): a Vision-Transformer generator and discriminator that train stably.

What makes a ViT discriminator usable in a GAN, all in :class:`ViTGANDiscriminator`:

- **L2-distance self-attention with tied query/key weights** (:class:`L2SelfAttention`). Dot-product
  attention is not Lipschitz (its Jacobian grows with the input norm); attention weights from
  ``-||q_i - q_j||^2`` with ``W_q = W_k`` are (Kim et al., 2021), see :func:`l2_attention_lipschitz_bound`.
- **Improved spectral normalisation** (:func:`improved_spectral_norm`): ``W * sigma(W_init) / sigma(W)``,
  spectral norm that keeps each layer's initial scale instead of forcing it to 1.
- **Overlapping patches**: the patch embedding sees ``patch_size + 2 * patch_overlap`` pixels per token,
  so D cannot overfit on the patch grid.

And in :class:`ViTGANGenerator`: the noise only enters through **self-modulated LayerNorm**
(:class:`SelfModulatedLayerNorm`, scale and shift predicted from the mapped noise ``w``) applied to a
sequence of learned position embeddings; each output token is decoded into its patch by an **implicit
neural representation**: Fourier features of the pixel coordinates inside the patch go through
SIREN-style (``sin``) layers whose weights the token modulates (StyleGAN2 modulation/demodulation).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm


def check_patch_grid(resolution: int, patch_size: int, dim: int, num_heads: int, who: str) -> int:
    """Patches per side; errors name the model and the bad sizes."""
    if patch_size < 1 or resolution % patch_size or resolution // patch_size < 2:
        raise ValueError(
            f"{who}: resolution {resolution} must be a multiple of model.patch_size {patch_size} with at least "
            "2 patches per side (e.g. 64 with patch 8, 32 with patch 4)"
        )
    if dim % num_heads:
        raise ValueError(f"{who}: width {dim} is not a multiple of model.num_heads {num_heads}")
    return resolution // patch_size


# ------------------------------------------------------------------------------- discriminator
class _ScaleBy(nn.Module):
    """A fixed factor on a parametrized weight (kept as a buffer, so it is saved with the weights)."""

    def __init__(self, factor: float):
        super().__init__()
        self.register_buffer("factor", torch.tensor(float(factor)))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.factor


def improved_spectral_norm(module: nn.Module) -> nn.Module:
    """ViTGAN's ISN on ``module.weight``: spectral norm (power iteration, as torch's) times the weight's
    spectral norm at initialisation. Plain spectral norm shrinks every ViT layer to norm 1, which slows D
    down too much; ISN keeps the Lipschitz constant bounded but at the initial scale."""
    sigma_init = torch.linalg.matrix_norm(module.weight.detach().flatten(1), ord=2)
    spectral_norm(module)
    parametrize.register_parametrization(module, "weight", _ScaleBy(sigma_init))
    return module


def _maybe_isn(module: nn.Module, enabled: bool) -> nn.Module:
    return improved_spectral_norm(module) if enabled else module


class L2SelfAttention(nn.Module):
    """Multi-head self-attention with weights ``softmax_j(-||x_i W_q - x_j W_q||^2 / sqrt(d_head))``: the
    query and key projections are one matrix (tied), which is what makes it Lipschitz."""

    def __init__(self, dim: int, num_heads: int, use_isn: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.query_key = _maybe_isn(nn.Linear(dim, dim, bias=False), use_isn)  # W_q = W_k
        self.value = _maybe_isn(nn.Linear(dim, dim, bias=False), use_isn)
        self.out = _maybe_isn(nn.Linear(dim, dim), use_isn)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.num_heads, d // self.num_heads).transpose(1, 2)  # (B, H, N, d_head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, v = self._heads(self.query_key(x)), self._heads(self.value(x))
        head_dim = d // self.num_heads
        # -||q_i - q_j||^2 = 2 q_i.q_j - ||q_j||^2 - ||q_i||^2; the last term is constant along the softmax
        # row (over j), so it is left out.
        logits = (2 * q @ q.transpose(-1, -2) - q.pow(2).sum(-1).unsqueeze(-2)) / math.sqrt(head_dim)
        attended = logits.softmax(dim=-1) @ v  # (B, H, N, d_head)
        return self.out(attended.transpose(1, 2).reshape(b, n, d))


def _lambert_w0(x: float) -> float:
    """Principal branch of Lambert's W for x >= 0 (Newton's method)."""
    w = math.log1p(x)
    for _ in range(50):
        w -= (w * math.exp(w) - x) / (math.exp(w) * (w + 1))
    return w


def l2_attention_lipschitz_bound(attention: L2SelfAttention, num_tokens: int) -> float:
    """Kim et al. (2021), Theorem 3.2: an upper bound on the Lipschitz constant of ``attention`` as a map of
    the whole (N, D) token matrix in the Frobenius norm (the output bias aside)::

        sqrt(N) / sqrt(D/H) * (4 W0(N/e) + 1) * sqrt(sum_h ||W_q^h||^2 ||W_v^h||^2) * ||W_o||

    with spectral norms of the current (spectrally normalised) weights. Dot-product attention has no such
    bound; this is what the tests check numerically."""
    heads, dim = attention.num_heads, attention.out.weight.shape[0]
    head_dim = dim // heads
    with torch.no_grad():
        w_q = attention.query_key.weight.view(heads, head_dim, dim)  # rows = one head's outputs
        w_v = attention.value.weight.view(heads, head_dim, dim)
        per_head = torch.linalg.matrix_norm(w_q, ord=2) ** 2 * torch.linalg.matrix_norm(w_v, ord=2) ** 2
        w_o = torch.linalg.matrix_norm(attention.out.weight, ord=2)
    softmax_factor = 4 * _lambert_w0(num_tokens / math.e) + 1
    return float(math.sqrt(num_tokens) / math.sqrt(head_dim) * softmax_factor * per_head.sum().sqrt() * w_o)


class _DiscriminatorBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: int, use_isn: bool):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = L2SelfAttention(dim, num_heads, use_isn)
        self.mlp = nn.Sequential(
            _maybe_isn(nn.Linear(dim, dim * mlp_ratio), use_isn),
            nn.GELU(),
            _maybe_isn(nn.Linear(dim * mlp_ratio, dim), use_isn),
        )

    def forward(self, x):
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTGANDiscriminator(ModelMixin, ConfigMixin):
    is_conditional = False

    @register_to_config
    def __init__(
        self,
        resolution=64,
        patch_size=8,
        patch_overlap=2,
        dim=128,
        depth=4,
        num_heads=4,
        mlp_ratio=2,
        spectral_norm=True,
    ):
        super().__init__()
        grid = check_patch_grid(resolution, patch_size, dim, num_heads, "ViTGANDiscriminator")
        # overlapping patches: a (P + 2o)-pixel window every P pixels
        self.patch_embedding = _maybe_isn(
            nn.Conv2d(3, dim, patch_size + 2 * patch_overlap, stride=patch_size, padding=patch_overlap),
            spectral_norm,
        )
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.position_embedding = nn.Parameter(torch.randn(1, grid * grid + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(_DiscriminatorBlock(dim, num_heads, mlp_ratio, spectral_norm) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = _maybe_isn(nn.Linear(dim, 1), spectral_norm)

    def forward(self, x, class_labels=None, return_features=False):
        if x.shape[-2:] != (self.config.resolution, self.config.resolution):
            raise ValueError(
                f"ViTGANDiscriminator: images are {tuple(x.shape[-2:])} but the model works at "
                f"{self.config.resolution}px"
            )
        tokens = self.patch_embedding(x).flatten(2).transpose(1, 2)  # (B, N, D)
        tokens = torch.cat([self.class_token.expand(x.shape[0], -1, -1), tokens], dim=1) + self.position_embedding
        for block in self.blocks:
            tokens = block(tokens)
        features = self.norm(tokens[:, 0])
        logits = self.head(features).flatten()
        return (logits, features) if return_features else logits


# ----------------------------------------------------------------------------------- generator
class SelfModulatedLayerNorm(nn.Module):
    """SLN(h, w) = (1 + gamma(w)) * LayerNorm(h) + beta(w): the noise modulates every normalisation."""

    def __init__(self, dim: int, style_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.affine = nn.Linear(style_dim, 2 * dim)

    def forward(self, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        scale, shift = self.affine(w).unsqueeze(1).chunk(2, dim=-1)
        return self.norm(h) * (1 + scale) + shift


class _GeneratorBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm1, self.norm2 = SelfModulatedLayerNorm(dim, dim), SelfModulatedLayerNorm(dim, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * mlp_ratio), nn.GELU(), nn.Linear(dim * mlp_ratio, dim))

    def forward(self, h, w):
        b, n, d = h.shape
        q, k, v = self.qkv(self.norm1(h, w)).view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        h = h + self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))
        return h + self.mlp(self.norm2(h, w))


class ModulatedLinear(nn.Module):
    """StyleGAN2's modulated layer with one style per token: the weight is scaled per input feature by the
    token's style and (with ``demodulate``) renormalised per output feature. Features are kept
    channels-first, (..., features, pixels), so each token's pixels are one matrix product."""

    def __init__(self, in_features: int, out_features: int, style_dim: int, demodulate: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / math.sqrt(in_features))
        self.bias = nn.Parameter(torch.zeros(out_features, 1))
        self.style = nn.Linear(style_dim, in_features)
        nn.init.ones_(self.style.bias)  # starts as the plain layer
        self.demodulate = demodulate

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        """x: (B, N, in, M) pixel features per token, or (in, M) shared by all; style: (B, N, style_dim)
        -> (B, N, out, M)."""
        weight = self.weight * self.style(style).unsqueeze(-2)  # (B, N, out, in)
        if self.demodulate:
            weight = weight * torch.rsqrt(weight.pow(2).sum(-1, keepdim=True) + 1e-8)
        return torch.matmul(weight, x) + self.bias


class ViTGANGenerator(ModelMixin, ConfigMixin):
    is_conditional = False

    @register_to_config
    def __init__(
        self,
        resolution=64,
        latent_dim=128,
        patch_size=8,
        dim=128,
        depth=4,
        num_heads=4,
        mlp_ratio=2,
        decoder_channels=64,
        fourier_bands=4,
    ):
        super().__init__()
        grid = check_patch_grid(resolution, patch_size, dim, num_heads, "ViTGANGenerator")
        self.mapping = nn.Sequential(  # z -> w, the style every SLN reads
            nn.Linear(latent_dim, dim),
            nn.LeakyReLU(0.2),
            nn.Linear(dim, dim),
            nn.LeakyReLU(0.2),
        )
        self.position_embedding = nn.Parameter(torch.randn(1, grid * grid, dim))  # the input sequence
        self.blocks = nn.ModuleList(_GeneratorBlock(dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = SelfModulatedLayerNorm(dim, dim)
        # implicit patch decoder: Fourier features of the pixel coordinates inside a patch ...
        coords = torch.linspace(-1, 1, patch_size)
        yy, xx = torch.meshgrid(coords, coords, indexing="ij")
        angles = torch.stack([xx, yy], dim=-1).reshape(-1, 2, 1) * (math.pi * 2.0 ** torch.arange(fourier_bands))
        self.register_buffer(
            "fourier_features",
            torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(1).t().contiguous(),
            persistent=False,
        )  # (4 * bands, P*P)
        # ... through sin layers modulated by the token (SIREN-style)
        self.decoder = nn.ModuleList(
            [
                ModulatedLinear(4 * fourier_bands, decoder_channels, dim),
                ModulatedLinear(decoder_channels, decoder_channels, dim),
            ]
        )
        self.to_rgb = ModulatedLinear(decoder_channels, 3, dim, demodulate=False)

    def forward(self, z: torch.Tensor, class_labels=None) -> torch.Tensor:
        b, grid, p = z.shape[0], self.config.resolution // self.config.patch_size, self.config.patch_size
        w = self.mapping(z.view(b, -1))
        h = self.position_embedding.expand(b, -1, -1)
        for block in self.blocks:
            h = block(h, w)
        tokens = self.norm(h, w)  # (B, N, D): one style per patch
        pixels = self.fourier_features  # (F, P*P), the same for every token
        for layer in self.decoder:
            pixels = torch.sin(layer(pixels, tokens))  # (B, N, C, P*P)
        rgb = torch.tanh(self.to_rgb(pixels, tokens))  # (B, N, 3, P*P)
        # (B, gy, gx, 3, py, px) -> (B, 3, gy*py, gx*px)
        rgb = rgb.view(b, grid, grid, 3, p, p).permute(0, 3, 1, 4, 2, 5)
        return rgb.reshape(b, 3, grid * p, grid * p)
