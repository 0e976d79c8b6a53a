"""The denoising U-Net of DDPM (Ho et al. 2020, appendix B) with the refinements of improved DDPM and
ADM (Nichol & Dhariwal 2021; Dhariwal & Nichol 2021): multi-head attention, scale-shift noise
conditioning, class embeddings with a null class for classifier-free guidance (Ho & Salimans 2022).

F(x, noise_labels, class_labels) -> tensor. It knows nothing of schedules: what the noise labels mean
(a DDPM timestep, EDM's ln(sigma) / 4) is the Denoiser's business.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .checkpoint import Pretrained
from .diffusers_format import unet_config_to_diffusers, unet_fields_from_diffusers
from .errors import (MAX_SIZE, EncdiffError, check_bool, check_field, check_int, check_number, check_tuple, is_flag,
                     is_positive_int)
from .layers import (CHANNELS_LAST, Downsample, GroupNorm, Level, MidBlock, NoiseEmbedding, ResnetBlock, SelfAttention,
                     Upsample, norm_silu, pad_to_multiple, run_block, sinusoidal_embedding, zero_init)


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 3  # channels of x (image or latent)
    out_channels: int = 3  # channels of the prediction
    sample_size: int = 32  # training resolution of x in pixels/latent cells (informational)
    block_out_channels: tuple[int, ...] = (128, 256, 256, 256)  # channels per level; each level after the first halves H, W
    attention_levels: tuple[bool, ...] = (False, True, False, False)  # self-attention after each ResNet block at these levels
    layers_per_block: int = 2  # ResNet blocks per level on the way down (one more on the way up)
    attention_head_dim: int | None = None  # channels per attention head; None: a single head
    mid_attention: bool = True  # self-attention in the mid block
    mid_attention_norm: bool = True  # GroupNorm before the mid attention (diffusers omits it with scale_shift)
    norm_num_groups: int = 32  # GroupNorm groups; must divide every channel count
    norm_eps: float = 1e-6  # GroupNorm epsilon
    emb_channels: int | None = None  # noise-embedding width; None: 4 * block_out_channels[0]
    scale_shift: bool = False  # embedding as scale-and-shift after norm2 (ADM) instead of added before it
    flip_sin_to_cos: bool = False  # sinusoidal features ordered [cos, sin] instead of [sin, cos]
    freq_shift: float = 1.0  # frequencies exp(-ln(10000) * i / (dim/2 - freq_shift)); DDPM used 1
    downsample_padding: int = 1  # 1: symmetric padding; 0: LDM's asymmetric (0, 1, 0, 1) pad
    dropout: float = 0.0  # dropout inside every ResNet block
    num_classes: int = 0  # class-conditional when > 0: labels 0 .. num_classes - 1
    null_class: bool = True  # with classes: label num_classes means "no class" (classifier-free guidance)

    def __post_init__(self):
        check_tuple(self.block_out_channels, "block_out_channels", None, is_positive_int)
        check_tuple(self.attention_levels, "attention_levels", len(self.block_out_channels), is_flag)
        for name in ("in_channels", "out_channels", "layers_per_block", "norm_num_groups", "sample_size"):
            check_int(getattr(self, name), name, maximum=MAX_SIZE)
        check_field(all(c % self.norm_num_groups == 0 for c in self.block_out_channels), "norm_num_groups",
                    self.norm_num_groups, f"a divisor of every block_out_channels value {self.block_out_channels}")
        for name in ("mid_attention", "mid_attention_norm", "scale_shift", "flip_sin_to_cos", "null_class"):
            check_bool(getattr(self, name), name)
        if self.attention_head_dim is not None:
            check_int(self.attention_head_dim, "attention_head_dim", maximum=MAX_SIZE)
            attended = [c for c, a in zip(self.block_out_channels, self.attention_levels) if a]
            attended += [self.block_out_channels[-1]] if self.mid_attention else []
            check_field(all(c % self.attention_head_dim == 0 for c in attended), "attention_head_dim",
                        self.attention_head_dim, "a divisor of the channels of every attention level")
        if self.emb_channels is not None:
            check_int(self.emb_channels, "emb_channels", maximum=MAX_SIZE)
        check_number(self.norm_eps, "norm_eps", positive=True)
        check_number(self.freq_shift, "freq_shift")
        check_field(self.freq_shift < self.block_out_channels[0] // 2, "freq_shift", self.freq_shift,
                    f"less than half of block_out_channels[0] ({self.block_out_channels[0] // 2})")
        check_int(self.num_classes, "num_classes", minimum=0, maximum=MAX_SIZE)
        check_field(self.downsample_padding in (0, 1), "downsample_padding", self.downsample_padding, "0 or 1")
        check_number(self.dropout, "dropout")
        check_field(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "a probability in [0, 1)")

    @property
    def class_embeddings(self) -> int:
        """Rows of the class-embedding table: the classes, plus the null class if any."""
        return self.num_classes + (1 if self.num_classes and self.null_class else 0)


class UNet(Pretrained, nn.Module):
    config_class = UNetConfig
    diffusers_class_name = "UNet2DModel"
    fields_from_diffusers = staticmethod(unet_fields_from_diffusers)
    diffusers_config = staticmethod(unet_config_to_diffusers)

    def __init__(self, config: UNetConfig):
        super().__init__()
        c = config
        self.config = config
        ch0 = c.block_out_channels[0]
        emb_channels = c.emb_channels or 4 * ch0
        block = dict(emb_channels=emb_channels, scale_shift=c.scale_shift, groups=c.norm_num_groups, eps=c.norm_eps,
                     dropout=c.dropout)
        attention = dict(head_dim=c.attention_head_dim, groups=c.norm_num_groups, eps=c.norm_eps)

        self.time_embedding = NoiseEmbedding(ch0, emb_channels)
        self.class_embedding = nn.Embedding(c.class_embeddings, emb_channels) if c.num_classes else None
        self.conv_in = nn.Conv2d(c.in_channels, ch0, 3, padding=1)

        self.down_blocks = nn.ModuleList()
        channels = ch0
        skip_channels = [ch0]
        for i, (out_channels, attn) in enumerate(zip(c.block_out_channels, c.attention_levels)):
            resnets = [ResnetBlock(channels if j == 0 else out_channels, out_channels, **block)
                       for j in range(c.layers_per_block)]
            attentions = [SelfAttention(out_channels, **attention) for _ in resnets] if attn else []
            skip_channels += [out_channels] * len(resnets)
            last = i == len(c.block_out_channels) - 1
            downsample = None if last else Downsample(out_channels, padding=c.downsample_padding)
            skip_channels += [] if last else [out_channels]
            self.down_blocks.append(Level(resnets, attentions, downsample=downsample))
            channels = out_channels

        self.mid_block = MidBlock(channels, attention=c.mid_attention, attention_norm=c.mid_attention_norm,
                                  head_dim=c.attention_head_dim, **block)

        self.up_blocks = nn.ModuleList()
        levels = list(zip(c.block_out_channels, c.attention_levels))[::-1]
        for i, (out_channels, attn) in enumerate(levels):
            resnets = [ResnetBlock((channels if j == 0 else out_channels) + skip_channels.pop(), out_channels, **block)
                       for j in range(c.layers_per_block + 1)]
            attentions = [SelfAttention(out_channels, **attention) for _ in resnets] if attn else []
            last = i == len(levels) - 1
            self.up_blocks.append(Level(resnets, attentions, upsample=None if last else Upsample(out_channels)))
            channels = out_channels

        self.conv_norm_out = GroupNorm(c.norm_num_groups, channels, eps=c.norm_eps)
        self.conv_out = zero_init(nn.Conv2d(channels, c.out_channels, 3, padding=1))
        self.gradient_checkpointing = False

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.gradient_checkpointing = enabled
        self.mid_block.gradient_checkpointing = enabled

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor | float,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        B = x.shape[0]
        c = self.config
        noise_labels = torch.as_tensor(noise_labels, device=x.device).reshape(-1).expand(B)
        features = sinusoidal_embedding(noise_labels, c.block_out_channels[0], flip_sin_to_cos=c.flip_sin_to_cos,
                                        freq_shift=c.freq_shift)
        emb = self.time_embedding(features.to(x.dtype))  # B, emb_channels
        if self.class_embedding is not None:
            if class_labels is None:
                if not (c.null_class and c.num_classes):
                    raise EncdiffError("class_labels is None, but this class-conditional U-Net has no null class")
                class_labels = torch.full((B,), c.num_classes, device=x.device, dtype=torch.long)
            emb = emb + self.class_embedding(class_labels).to(emb.dtype)
        elif class_labels is not None:
            raise EncdiffError("class_labels given, but this U-Net is unconditional (num_classes = 0)")

        ckpt = self.gradient_checkpointing
        H, W = x.shape[-2:]
        h = self.conv_in(pad_to_multiple(x, 2 ** (len(c.block_out_channels) - 1)).contiguous(memory_format=CHANNELS_LAST))
        skips = [h]
        for level in self.down_blocks:
            for j, resnet in enumerate(level.resnets):
                h = run_block(resnet, h, emb, checkpointing=ckpt)
                if level.attentions:
                    h = run_block(level.attentions[j], h, checkpointing=ckpt)
                skips.append(h)
            if level.resample is not None:
                h = level.resample(h)  # B, C, H/2, W/2
                skips.append(h)
        h = self.mid_block(h, emb)
        for level in self.up_blocks:
            for j, resnet in enumerate(level.resnets):
                h = run_block(resnet, torch.cat([h, skips.pop()], dim=1), emb, checkpointing=ckpt)
                if level.attentions:
                    h = run_block(level.attentions[j], h, checkpointing=ckpt)
            if level.resample is not None:
                h = level.resample(h)  # B, C, 2H, 2W
        return self.conv_out(norm_silu(self.conv_norm_out, h))[..., :H, :W]
