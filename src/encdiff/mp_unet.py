"""The magnitude-preserving U-Net of EDM2 (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
Diffusion Models"), config E of its Table 1, adapted to encdiff's small latents.

Every layer keeps the expected magnitude of its activations, so nothing has to be learned to undo drift:
- MP convolutions with weight normalisation (sec. 2.3, eq. 4) and *forced* weight normalisation (sec. 2.4): each
  output channel's weights are kept at unit norm (`normalize_weights_` after every optimizer step) and scaled by
  1/sqrt(fan-in) in the forward pass, so with unit-variance inputs the outputs have unit variance;
- MP-SiLU, silu(x) / 0.596 (sec. 2.5): unit variance out for unit-variance Gaussian in;
- MP sum and concatenation (sec. 2.5, eqs. 5-6): a weighted sum lerp(a, b, t) / sqrt((1 - t)^2 + t^2) and a
  concatenation rescaled per part, so skip connections and residual branches do not grow the magnitude;
- no biases and no GroupNorm (sec. 2.2): pixel normalisation of the encoder's activations instead, cosine attention
  (queries and keys normalised per pixel, sec. 2.2), and a learned gain at the embedding and the output, initialised
  to 0 so the network starts as the identity-free zero function F = 0, D = c_skip x;
- the noise level enters as random Fourier features of c_noise = ln(sigma)/4 (MP-Fourier, sec. 2.5) and a class
  as a one-hot vector (a zero vector for the null class of classifier-free guidance);
- a small head predicts the log-variance u(sigma) of the loss at each noise level (sec. 2.6, eq. 8): training
  weighs the loss by exp(-u) and adds u, learning the per-sigma weighting instead of fixing it.

Adapted for 8x8 latents: the levels and attention placement follow `block_out_channels` and `attention_levels`
(EDM2 attends at 16x16 and 8x8 of a 64x64 latent; here the small levels), and the decoder's first block attends
as EDM2's does. The inverse-square-root learning rate that config E pairs with it is `lr_schedule = "inv_sqrt"`
in the trainer. Not a diffusers `UNet2DModel`: export to diffusers refuses it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import Pretrained
from .errors import (MAX_SIZE, EncdiffError, check_bool, check_field, check_int, check_number, check_tuple, is_flag,
                     is_positive_int)
from .layers import pad_to_multiple


@dataclass(frozen=True)
class MPUNetConfig:
    in_channels: int = 3  # channels of x (image or latent)
    out_channels: int = 3  # channels of the prediction
    sample_size: int = 32  # training resolution of x in pixels/latent cells (informational)
    block_out_channels: tuple[int, ...] = (64, 128, 128)  # channels per level; each level after the first halves H, W
    attention_levels: tuple[bool, ...] = (False, True, True)  # cosine self-attention in the blocks of these levels
    layers_per_block: int = 2  # blocks per level on the way down (one more on the way up), EDM2's num_blocks
    channels_per_head: int = 64  # attention head width (EDM2: 64)
    emb_channels: int | None = None  # embedding width; None: max(block_out_channels) (EDM2)
    noise_channels: int | None = None  # Fourier features of the noise level; None: block_out_channels[0] (EDM2)
    res_balance: float = 0.3  # t of the MP sum of a block's residual branch (EDM2: 0.3)
    attn_balance: float = 0.3  # t of the MP sum of the attention branch (EDM2: 0.3)
    label_balance: float = 0.5  # t of the MP sum of the noise and class embeddings (EDM2: 0.5)
    concat_balance: float = 0.5  # t of the MP concatenation of skip connections (EDM2: 0.5)
    clip_act: float = 256.0  # activations clipped to +-this after every block (EDM2, against rare fp16 overflow)
    dropout: float = 0.0  # dropout in every block's residual branch
    logvar_channels: int = 128  # Fourier features of the uncertainty head u(sigma) (EDM2: 128); 0: no head
    num_classes: int = 0  # class-conditional when > 0: labels 0 .. num_classes - 1
    null_class: bool = True  # with classes: label num_classes means "no class" (a zero one-hot vector)

    def __post_init__(self):
        check_tuple(self.block_out_channels, "block_out_channels", None, is_positive_int)
        check_tuple(self.attention_levels, "attention_levels", len(self.block_out_channels), is_flag)
        for name in ("in_channels", "out_channels", "layers_per_block", "sample_size", "channels_per_head"):
            check_int(getattr(self, name), name, maximum=MAX_SIZE)
        for name in ("emb_channels", "noise_channels"):
            if getattr(self, name) is not None:
                check_int(getattr(self, name), name, maximum=MAX_SIZE)
        check_int(self.logvar_channels, "logvar_channels", minimum=0, maximum=MAX_SIZE)
        attended = [c for c, a in zip(self.block_out_channels, self.attention_levels) if a] + [self.block_out_channels[-1]]
        check_field(all(c % self.channels_per_head == 0 for c in attended), "channels_per_head",
                    self.channels_per_head, "a divisor of the channels of every attention level")
        for name in ("res_balance", "attn_balance", "label_balance", "concat_balance"):
            check_number(getattr(self, name), name)
            check_field(0.0 <= getattr(self, name) <= 1.0, name, getattr(self, name), "a number in [0, 1]")
        check_number(self.clip_act, "clip_act", positive=True)
        check_number(self.dropout, "dropout")
        check_field(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "a probability in [0, 1)")
        check_int(self.num_classes, "num_classes", minimum=0, maximum=MAX_SIZE)
        check_bool(self.null_class, "null_class")
        check_field(self.sample_size % 2 ** (len(self.block_out_channels) - 1) == 0, "sample_size", self.sample_size,
                    f"divisible by 2^{len(self.block_out_channels) - 1} (one halving per level after the first)")


# -- magnitude-preserving operations (EDM2 sec. 2.5) -------------------------------------------------------------------
def normalize(x: torch.Tensor, dim=None, eps: float = 1e-4) -> torch.Tensor:
    """x scaled to unit RMS over `dim` (default: all but the first), i.e. to norm sqrt(numel over dim); float32 norm."""
    if dim is None:
        dim = list(range(1, x.ndim))
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    norm = torch.add(eps, norm, alpha=math.sqrt(norm.numel() / x.numel()))
    return x / norm.to(x.dtype)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """silu(x) / 0.596: unit variance out for x ~ N(0, 1) (EDM2 sec. 2.5)."""
    return F.silu(x) / 0.596


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """(1 - t) a + t b, divided by sqrt((1 - t)^2 + t^2): unit variance for independent unit-variance a, b (eq. 5)."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t**2)


def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """Concatenation with the parts weighted (1 - t) and t and the whole kept at unit variance (eq. 6)."""
    Na, Nb = a.shape[dim], b.shape[dim]
    C = math.sqrt((Na + Nb) / ((1 - t) ** 2 + t**2))
    return torch.cat([(C / math.sqrt(Na) * (1 - t)) * a, (C / math.sqrt(Nb) * t) * b], dim=dim)


def resample(x: torch.Tensor, mode: str) -> torch.Tensor:
    """2x down (2x2 box filter, stride 2) or up (its transpose, nearest-neighbour): unit gain either way."""
    if mode == "keep":
        return x
    if mode == "down":
        return F.avg_pool2d(x, 2)
    return F.interpolate(x, scale_factor=2, mode="nearest")


class MPFourier(nn.Module):
    """cos(2 pi (f x + phi)) sqrt(2) for random f ~ N(0, 1), phi ~ U[0, 1): unit-variance features of a scalar
    (EDM2 sec. 2.5). The frequencies and phases are buffers, saved with the weights."""

    def __init__(self, num_channels: int, bandwidth: float = 1.0, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", 2 * np.pi * torch.randn(num_channels, generator=g) * bandwidth)
        self.register_buffer("phases", 2 * np.pi * torch.rand(num_channels, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.to(torch.float32).ger(self.freqs.to(torch.float32)) + self.phases.to(torch.float32)
        return (y.cos() * math.sqrt(2)).to(x.dtype)


class MPConv(nn.Module):
    """A convolution (or, with kernel (), a linear layer) without bias, its weights normalised per output channel and
    scaled by gain / sqrt(fan-in) (EDM2 eq. 4): unit-variance outputs for unit-variance inputs at gain 1."""

    def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, ...]):
        super().__init__()
        self.out_channels = out_channels
        self.weight = nn.Parameter(normalize(torch.randn(out_channels, in_channels, *kernel)))

    def forward(self, x: torch.Tensor, gain: float | torch.Tensor = 1.0) -> torch.Tensor:
        w = normalize(self.weight.to(torch.float32))  # traditional weight normalisation: the gradient sees it
        w = (w * (gain / math.sqrt(w[0].numel()))).to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=w.shape[-1] // 2)

    @torch.no_grad()
    def normalize_weight_(self) -> None:
        """Forced weight normalisation (EDM2 sec. 2.4): project the stored weights back to unit norm per output
        channel, so that the effective learning rate does not decay as their norm grows."""
        self.weight.copy_(normalize(self.weight.to(torch.float32)).to(self.weight.dtype))


class MPBlock(nn.Module):
    """EDM2's encoder/decoder block (Fig. 21): optional 2x resampling, a residual branch of two 3x3 MP convolutions
    modulated by the embedding (c = 1 + gain * linear(emb)), an MP sum with the main branch, optional cosine
    attention, and clipping. Encoder blocks pixel-normalise their main branch (there are no norm layers)."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, flavor: str, resample_mode: str,
                 attention: bool, config: MPUNetConfig):
        super().__init__()
        self.flavor, self.resample_mode, self.out_channels = flavor, resample_mode, out_channels
        self.num_heads = out_channels // config.channels_per_head if attention else 0
        self.res_balance, self.attn_balance = config.res_balance, config.attn_balance
        self.clip_act, self.dropout = config.clip_act, config.dropout
        self.emb_gain = nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, (3, 3))
        self.emb_linear = MPConv(emb_channels, out_channels, ())
        self.conv_res1 = MPConv(out_channels, out_channels, (3, 3))
        self.conv_skip = MPConv(in_channels, out_channels, (1, 1)) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, (1, 1)) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, (1, 1)) if self.num_heads else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = resample(x, self.resample_mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel norm
        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * c[:, :, None, None].to(y.dtype))
        if self.training and self.dropout:
            y = F.dropout(y, p=self.dropout)
        y = self.conv_res1(y)
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)
        if self.num_heads:
            B, C, H, W = x.shape
            y = self.attn_qkv(x).reshape(B, self.num_heads, -1, 3, H * W)
            q, k, v = normalize(y, dim=2).unbind(3)  # cosine attention: per-pixel unit queries and keys
            w = torch.einsum("nhcq,nhck->nhqk", q, k / math.sqrt(q.shape[2])).softmax(dim=3)
            y = self.attn_proj(torch.einsum("nhqk,nhck->nhcq", w, v).reshape(B, C, H, W))
            x = mp_sum(x, y, t=self.attn_balance)
        return x.clip(-self.clip_act, self.clip_act)


class MPUNet(Pretrained, nn.Module):
    """F(x, noise_labels, class_labels) of EDM2 config E: see the module docstring. `return_logvar=True` also
    returns the uncertainty u(noise_labels) of shape (B,) for the training loss (EDM2 eq. 8)."""

    config_class = MPUNetConfig
    diffusers_class_name = None  # no diffusers equivalent

    def __init__(self, config: MPUNetConfig):
        super().__init__()
        c = self.config = config
        blocks = list(c.block_out_channels)
        cnoise = c.noise_channels or blocks[0]
        cemb = c.emb_channels or max(blocks)
        self.out_gain = nn.Parameter(torch.zeros([]))
        self.emb_fourier = MPFourier(cnoise, seed=0)
        self.emb_noise = MPConv(cnoise, cemb, ())
        self.emb_label = MPConv(c.num_classes, cemb, ()) if c.num_classes else None
        self.enc = nn.ModuleDict()
        cout = c.in_channels + 1  # a constant channel of ones lets the first convolution see the borders
        for level, (channels, attention) in enumerate(zip(blocks, c.attention_levels)):
            res = c.sample_size >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = MPConv(cout, channels, (3, 3))
                cout = channels
            else:
                self.enc[f"{res}x{res}_down"] = MPBlock(cout, cout, cemb, "enc", "down", False, c)
            for idx in range(c.layers_per_block):
                self.enc[f"{res}x{res}_block{idx}"] = MPBlock(cout, channels, cemb, "enc", "keep", attention, c)
                cout = channels
        skips = [block.out_channels for block in self.enc.values()]
        self.dec = nn.ModuleDict()
        for level, (channels, attention) in reversed(list(enumerate(zip(blocks, c.attention_levels)))):
            res = c.sample_size >> level
            if level == len(blocks) - 1:
                self.dec[f"{res}x{res}_in0"] = MPBlock(cout, cout, cemb, "dec", "keep", True, c)
                self.dec[f"{res}x{res}_in1"] = MPBlock(cout, cout, cemb, "dec", "keep", False, c)
            else:
                self.dec[f"{res}x{res}_up"] = MPBlock(cout, cout, cemb, "dec", "up", False, c)
            for idx in range(c.layers_per_block + 1):
                self.dec[f"{res}x{res}_block{idx}"] = MPBlock(cout + skips.pop(), channels, cemb, "dec", "keep",
                                                               attention, c)
                cout = channels
        self.out_conv = MPConv(cout, c.out_channels, (3, 3))
        if c.logvar_channels:
            self.logvar_fourier = MPFourier(c.logvar_channels, seed=1)
            self.logvar_linear = MPConv(c.logvar_channels, 1, ())

    def normalize_weights_(self) -> None:
        """Forced weight normalisation of every MP convolution: the trainer calls it after each optimizer step."""
        for module in self.modules():
            if isinstance(module, MPConv):
                module.normalize_weight_()

    def class_vectors(self, class_labels: torch.Tensor | None, B: int, device) -> torch.Tensor:
        """Indices -> one-hot rows scaled to unit RMS (EDM2: class_labels * sqrt(label_dim)); the null class (and
        None) is the zero vector, which the MP sum turns into "the noise embedding alone"."""
        c = self.config
        if class_labels is None:
            if not c.null_class:
                raise EncdiffError("class_labels is None, but this class-conditional U-Net has no null class")
            return torch.zeros(B, c.num_classes, device=device)
        one_hot = F.one_hot(class_labels.long(), c.num_classes + 1)[:, : c.num_classes].to(torch.float32)
        return one_hot * math.sqrt(c.num_classes)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor | float, class_labels: torch.Tensor | None = None,
                return_logvar: bool = False):
        B = x.shape[0]
        noise_labels = torch.as_tensor(noise_labels, device=x.device, dtype=torch.float32).reshape(-1).expand(B)
        emb = self.emb_noise(self.emb_fourier(noise_labels))
        if self.emb_label is not None:
            emb = mp_sum(emb, self.emb_label(self.class_vectors(class_labels, B, x.device).to(emb.dtype)),
                         t=self.config.label_balance)
        elif class_labels is not None:
            raise EncdiffError("class_labels given, but this U-Net is unconditional (num_classes = 0)")
        emb = mp_silu(emb).to(x.dtype)
        H, W = x.shape[-2:]
        # padded after the ones are added: the padding reads as outside the image (zeros in that channel too)
        h = pad_to_multiple(torch.cat([x, torch.ones_like(x[:, :1])], dim=1), 2 ** (len(self.config.block_out_channels) - 1))
        skips = []
        for name, block in self.enc.items():
            h = block(h) if name.endswith("_conv") else block(h, emb)
            skips.append(h)
        for name, block in self.dec.items():
            if "block" in name:
                h = mp_cat(h, skips.pop(), t=self.config.concat_balance)
            h = block(h, emb)
        out = self.out_conv(h, gain=self.out_gain)[..., :H, :W]
        if not return_logvar:
            return out
        if not self.config.logvar_channels:
            raise EncdiffError("this U-Net has no uncertainty head (logvar_channels = 0)")
        return out, self.logvar_linear(self.logvar_fourier(noise_labels)).reshape(-1)
