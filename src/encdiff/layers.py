"""Building blocks shared by the autoencoder and the U-Net (Ho et al. 2020, "Denoising Diffusion
Probabilistic Models"; Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion").

Attribute names follow diffusers (`norm1`, `conv1`, `time_emb_proj`, `to_q`, `downsamplers.0.conv`, ...)
so that a state dict moves between the two libraries without any renaming.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


# Activations run channels_last: oneDNN (CPU) and cuDNN convolutions are fastest in NHWC, and the
# attention's (B, HW, C) view of an NHWC map needs no copy.
CHANNELS_LAST = torch.channels_last
# CPU attention over at most this many pixels runs in float32 under bf16 autocast: PyTorch's bf16 kernel is 2-3.5x
# slower than the float32 one there (batch 200, 4 heads of 32: 1.2 vs 0.65 ms at 16 pixels, 0.82 vs 0.26 at 4, the
# casts included), and the 4x4 and 2x2 levels of a latent U-Net are exactly such maps. At 8x8 bf16 is the faster.
SHORT_ATTENTION = 16


def zero_init(module: nn.Module) -> nn.Module:
    """Zero a layer's weights and bias so the residual branch it ends starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def run_block(block: nn.Module, *args: torch.Tensor | None, checkpointing: bool = False) -> torch.Tensor:
    """Call `block`, recomputing its activations in the backward pass when `checkpointing` is on."""
    if checkpointing and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zeros below and to the right of (B, C, H, W) up to H and W divisible by `multiple`: a U-Net halves its map
    once per level and adds the skips back, so it takes only such shapes (an aspect-ratio bucket's latents need not
    be). The network crops its output back to (H, W); a shape already divisible is left as it is."""
    H, W = x.shape[-2:]
    bottom, right = -H % multiple, -W % multiple
    return F.pad(x, (0, right, 0, bottom)) if bottom or right else x


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm (same parameters, same state dict) that normalises a bf16 channels_last map in the contiguous
    layout on the CPU. PyTorch's bf16 channels_last GroupNorm kernel is slow there: measured at batch 200 on the 8x8
    latents' 64-channel level, 6.1 ms against 0.6 ms for the copy to NCHW, the contiguous kernel and the copy back
    (the layout the convolutions around it run fastest in), and 3-4x slower at every level of the U-Net; in training
    (a convolution and this norm, forward and backward, batch 64-256 at 8-32 px) the route is 1.2-1.7x faster. In
    float32 the channels_last kernel is the faster one at the small levels, so float32 maps go to it unchanged.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.dtype != torch.bfloat16 or x.dim() != 4 or x.is_contiguous():
            return super().forward(x)
        out = F.group_norm(x.contiguous(), self.num_groups, self.weight, self.bias, self.eps)
        return out.contiguous(memory_format=CHANNELS_LAST)


def norm_silu(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """SiLU(GroupNorm(x)); in place when no graph is recorded, saving a full-size allocation."""
    h = norm(x)
    return F.silu(h, inplace=not torch.is_grad_enabled())


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice with a residual; a noise embedding enters between the convs."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        emb_channels: int | None = None,
        scale_shift: bool = False,
        groups: int = 32,
        eps: float = 1e-6,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.scale_shift = scale_shift
        self.norm1 = GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        # Scale-and-shift ("adaptive group norm", Dhariwal & Nichol 2021) needs two vectors per channel.
        self.time_emb_proj = (
            nn.Linear(emb_channels, out_channels * (2 if scale_shift else 1)) if emb_channels else None
        )
        self.norm2 = GroupNorm(groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(norm_silu(self.norm1, x))
        # In-place adds below are safe under autograd: a conv's backward never reads its output.
        if self.time_emb_proj is None:
            h = norm_silu(self.norm2, h)
        else:
            e = self.time_emb_proj(F.silu(emb))[:, :, None, None]  # B, C or 2C, 1, 1
            if self.scale_shift:
                scale, shift = e.chunk(2, dim=1)
                h = F.silu(torch.addcmul(shift, self.norm2(h), 1 + scale))
            else:
                h = norm_silu(self.norm2, h.add_(e))
        h = self.conv2(self.dropout(h))
        return h.add_(x if self.conv_shortcut is None else self.conv_shortcut(x))


class SelfAttention(nn.Module):
    """Multi-head self-attention over the pixels of a feature map, with a residual."""

    def __init__(self, channels: int, *, head_dim: int | None = None, groups: int | None = 32, eps: float = 1e-6):
        super().__init__()
        self.heads = channels // head_dim if head_dim else 1
        # diffusers' UNet2DModel leaves the mid-block attention un-normalised with scale-shift blocks.
        self.group_norm = GroupNorm(groups, channels, eps=eps) if groups else None
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([zero_init(nn.Linear(channels, channels))])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = x if self.group_norm is None else self.group_norm(x)
        h = h.flatten(2).transpose(1, 2)  # B, HW, C (a view when x is channels_last)
        # One matmul for q, k and v: the same arithmetic as three, with a third of the calls.
        weight = torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight])
        bias = torch.cat([self.to_q.bias, self.to_k.bias, self.to_v.bias])
        qkv = F.linear(h, weight, bias).view(B, H * W, 3, self.heads, C // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each B, heads, HW, C / heads
        if q.device.type == "cpu" and q.dtype == torch.bfloat16 and H * W <= SHORT_ATTENTION:
            h = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
        else:
            h = F.scaled_dot_product_attention(q, k, v)
        h = self.to_out[0](h.transpose(1, 2).reshape(B, H * W, C))
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class Downsample(nn.Module):
    """Strided 3x3 conv halving H and W; padding 0 means the asymmetric (0, 1, 0, 1) pad of LDM."""

    def __init__(self, channels: int, *, padding: int = 1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour doubling of H and W followed by a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """ResNet, optional self-attention, ResNet at the lowest resolution."""

    def __init__(self, channels: int, *, attention: bool, attention_norm: bool = True, head_dim: int | None = None,
                 emb_channels: int | None = None, scale_shift: bool = False, groups: int = 32, eps: float = 1e-6,
                 dropout: float = 0.0):
        super().__init__()
        resnet = dict(emb_channels=emb_channels, scale_shift=scale_shift, groups=groups, eps=eps, dropout=dropout)
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, **resnet), ResnetBlock(channels, channels, **resnet)])
        self.attentions = nn.ModuleList(
            [SelfAttention(channels, head_dim=head_dim, groups=groups if attention_norm else None, eps=eps)]
            if attention else []
        )
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        ckpt = self.gradient_checkpointing
        x = run_block(self.resnets[0], x, emb, checkpointing=ckpt)
        for attention in self.attentions:
            x = run_block(attention, x, checkpointing=ckpt)
        return run_block(self.resnets[1], x, emb, checkpointing=ckpt)


class Level(nn.Module):
    """The blocks of one resolution level: `resnets`, matching `attentions` (or none) and an optional
    resampler. The caller runs them, so the U-Net's skip connections stay visible in its forward."""

    def __init__(self, resnets: list[ResnetBlock], attentions: list[SelfAttention],
                 downsample: Downsample | None = None, upsample: Upsample | None = None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions)
        if downsample is not None:
            self.downsamplers = nn.ModuleList([downsample])
        if upsample is not None:
            self.upsamplers = nn.ModuleList([upsample])

    @property
    def resample(self) -> nn.Module | None:
        samplers = getattr(self, "downsamplers", None) or getattr(self, "upsamplers", None)
        return samplers[0] if samplers else None


def sinusoidal_embedding(noise_labels: torch.Tensor, dim: int, *, flip_sin_to_cos: bool = True,
                         freq_shift: float = 0.0, max_period: float = 10000.0) -> torch.Tensor:
    """Transformer-style sinusoidal features of the noise labels (Vaswani et al. 2017, section 3.5)."""
    half = dim // 2
    # Frequencies from 1 down to 1/max_period, geometrically spaced; float32 whatever the model dtype.
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=noise_labels.device)
    freqs = torch.exp(exponent / (half - freq_shift))
    args = noise_labels.float()[:, None] * freqs[None, :]  # B, half
    emb = torch.cat([torch.cos(args), torch.sin(args)] if flip_sin_to_cos else [torch.sin(args), torch.cos(args)], 1)
    return F.pad(emb, (0, dim % 2))


class NoiseEmbedding(nn.Module):
    """The MLP that turns sinusoidal noise-level features into the embedding every ResNet block sees."""

    def __init__(self, in_channels: int, emb_channels: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, emb_channels)
        self.linear_2 = nn.Linear(emb_channels, emb_channels)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(features)))
