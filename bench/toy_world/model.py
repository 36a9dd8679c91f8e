"""A tiny text-conditional diffusion model with the structure of Stable Diffusion that matters here.

Token-embedding table -> small causal transformer text encoder (CLIP-like: BOS/EOS padding, final
LayerNorm) -> per-token hidden states -> a small UNet whose transformer blocks read them through
cross-attention (`attn2`, the layers ESD-x/UCE edit; `attn1` is self-attention). The UNet predicts
eps for pixel-space 16 x 16 RGB images on a DDPM linear schedule (T = 1000). Module names follow
diffusers (`attn1`, `attn2.to_k`, ...), so "ESD-u = every UNet parameter outside attn2" reads the same.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import world


@dataclass(frozen=True)
class ModelConfig:
    text_dim: int = 64
    text_layers: int = 2
    text_heads: int = 4
    channels: tuple[int, int] = (48, 64)
    time_dim: int = 128
    heads: int = 4
    # Design 2: the text encoder is a fixed random network, never trained with the UNet (SD's CLIP is trained
    # elsewhere and frozen), with token embeddings of std `token_std`; at std 1 unrelated words get nearly
    # orthogonal token states, so the word and its context words are not near each other by construction.
    train_text_encoder: bool = True
    token_std: float = 0.02  # CLIP's init scale


class TextEncoder(nn.Module):
    """Token ids (B, L) or token vectors (B, L, D) -> per-token hidden states (B, L, D)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(len(world.VOCAB), cfg.text_dim)
        nn.init.normal_(self.token_embedding.weight, std=cfg.token_std)
        self.position_embedding = nn.Parameter(torch.randn(world.SEQ_LEN, cfg.text_dim) * 0.01)
        layer = nn.TransformerEncoderLayer(cfg.text_dim, cfg.text_heads, 4 * cfg.text_dim, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, cfg.text_layers, enable_nested_tensor=False)
        self.final_layer_norm = nn.LayerNorm(cfg.text_dim)
        mask = torch.triu(torch.full((world.SEQ_LEN, world.SEQ_LEN), float("-inf")), diagonal=1)
        self.register_buffer("causal_mask", mask, persistent=False)  # CLIP's text encoder is causal

    def embed(self, ids: torch.Tensor, vectors: torch.Tensor | None = None) -> torch.Tensor:
        """Token vectors (B, L, D); each `<concept>` position takes the next row of `vectors` (N, D),
        the way a textual-inversion token replaces its embedding-table row."""
        e = self.token_embedding(ids)
        slots = ids == world.TOKEN_ID[world.PLACEHOLDER]
        if slots.any():
            if vectors is None:
                raise ValueError("prompt contains <concept> but no concept vectors were given")
            per_row = slots.sum(1)
            if not bool((per_row == vectors.shape[0]).all() | (per_row == 0).all()):
                raise ValueError(f"each <concept> prompt needs {vectors.shape[0]} placeholder tokens")
            e = e.clone()
            e[slots] = vectors.to(e.dtype).repeat(int(slots.any(1).sum()), 1)
        return e

    def forward(self, ids: torch.Tensor, vectors: torch.Tensor | None = None) -> torch.Tensor:
        h = self.embed(ids, vectors) + self.position_embedding
        return self.final_layer_norm(self.layers(h, mask=self.causal_mask, is_causal=True))


class Attention(nn.Module):
    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        q, k, v = (t.view(b, -1, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        return self.to_out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


class TransformerBlock(nn.Module):
    """SD's BasicTransformerBlock: self-attention (attn1), cross-attention to text (attn2), MLP."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.norm_in = nn.GroupNorm(8, dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn1 = Attention(dim, dim, heads)
        self.attn2 = Attention(dim, context_dim, heads)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        h = self.norm_in(x).flatten(2).transpose(1, 2)
        n1 = self.norm1(h)
        h = h + self.attn1(n1, n1)
        h = h + self.attn2(self.norm2(h), context)
        h = h + self.ff(self.norm3(h))
        return x + h.transpose(1, 2).reshape(b, c, hgt, wid)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, time_dim: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.time = nn.Linear(time_dim, cout)
        self.norm2, self.conv2 = nn.GroupNorm(8, cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.time(temb)[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps t (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class UNet(nn.Module):
    """eps_theta(x_t (B, 3, 16, 16), t (B,) int in [0, T), context (B, L, D)) -> (B, 3, 16, 16).

    The image is first folded losslessly into an 8 x 8 x 12 "latent" (pixel unshuffle), playing the
    role of SD's VAE latent at a fraction of the CPU cost; the UNet works at 8 x 8 and 4 x 4."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        c0, c1 = cfg.channels
        td, cd, nh = cfg.time_dim, cfg.text_dim, cfg.heads
        self.time_mlp = nn.Sequential(nn.Linear(td, td), nn.SiLU(), nn.Linear(td, td))
        self.conv_in = nn.Conv2d(12, c0, 3, padding=1)
        self.down0, self.down0_tf = ResBlock(c0, c0, td), TransformerBlock(c0, cd, nh)
        self.pool0 = nn.Conv2d(c0, c0, 3, stride=2, padding=1)
        self.down1, self.down1_tf = ResBlock(c0, c1, td), TransformerBlock(c1, cd, nh)
        self.mid1, self.mid_tf, self.mid2 = ResBlock(c1, c1, td), TransformerBlock(c1, cd, nh), ResBlock(c1, c1, td)
        self.up1, self.up1_tf = ResBlock(2 * c1, c1, td), TransformerBlock(c1, cd, nh)
        self.up0, self.up0_tf = ResBlock(c1 + c0, c0, td), TransformerBlock(c0, cd, nh)
        self.norm_out, self.conv_out = nn.GroupNorm(8, c0), nn.Conv2d(c0, 12, 3, padding=1)
        self.time_dim = td

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        temb = self.time_mlp(timestep_embedding(t, self.time_dim))
        z = F.pixel_unshuffle(x, 2)
        h0 = self.down0_tf(self.down0(self.conv_in(z), temb), context)  # 8 x 8
        h1 = self.down1_tf(self.down1(self.pool0(h0), temb), context)  # 4 x 4
        h = self.mid2(self.mid_tf(self.mid1(h1, temb), context), temb)
        h = self.up1_tf(self.up1(torch.cat([h, h1], 1), temb), context)
        h = F.interpolate(h, scale_factor=2, mode="nearest")
        h = self.up0_tf(self.up0(torch.cat([h, h0], 1), temb), context)
        return F.pixel_shuffle(self.conv_out(F.silu(self.norm_out(h))), 2)


class ToyDiffusion(nn.Module):
    """Text encoder + UNet + the DDPM linear noise schedule (betas 1e-4 .. 0.02, T = 1000)."""

    T = 1000

    def __init__(self, cfg: ModelConfig = ModelConfig()):
        super().__init__()
        self.cfg = cfg
        self.text_encoder = TextEncoder(cfg)
        self.unet = UNet(cfg)
        betas = torch.linspace(1e-4, 0.02, self.T, dtype=torch.float64)
        self.register_buffer("alphas_cumprod", torch.cumprod(1 - betas, 0).float(), persistent=False)

    def encode(self, prompts: list[str], vectors: torch.Tensor | None = None) -> torch.Tensor:
        """Per-token text conditioning (B, L, D) for `prompts`; `<concept>` takes `vectors` (N, D)."""
        ids = world.tokenize(prompts).to(self.alphas_cumprod.device)
        return self.text_encoder(ids, vectors)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """q(x_t | x_0): sqrt(abar_t) x0 + sqrt(1 - abar_t) noise; shapes (B, 3, H, W), t (B,)."""
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def config_dict(self) -> dict:
        return asdict(self.cfg)
