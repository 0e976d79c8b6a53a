"""diffusers' config format for our models: the translation tables and converters, in both directions.

Module names equal diffusers' keys (layers.py), so weights move unchanged and only config.json differs; this file
is all the difference. The converters read diffusers' fields into plain dicts of ours and write ours back; the model
classes hook them into `Pretrained`, and this file imports no model file. A diffusers field or value encdiff cannot
represent is refused, naming it, rather than approximated.
"""

from __future__ import annotations

from typing import Any

from .errors import (MAX_SIZE, EncdiffError, check_field, check_int, check_number, check_tuple, is_finite_number,
                     is_positive_int)


def refuse_unsupported(values: dict[str, Any], supported: dict[str, Any], where: str) -> dict[str, Any]:
    """Take diffusers config fields, with defaults; an unknown field is refused, never ignored.
    Keys starting with "_" are bookkeeping (diffusers' own `_class_name`, ours `_encdiff_*`)."""
    values = {k: v for k, v in values.items() if not k.startswith("_")}
    unknown = sorted(set(values) - set(supported))
    if unknown:
        raise EncdiffError(f"{where} field {unknown[0]!r} = {values[unknown[0]]!r} is not supported by encdiff")
    return {**supported, **values}


def block_attention(types: Any, field: str, known: dict[str, bool]) -> list[bool]:
    """diffusers block type names -> attention on/off per level; an unknown name is refused."""
    check_field(isinstance(types, (list, tuple)) and len(types) > 0, field, types, "a non-empty list of block types")
    for t in types:
        check_field(t in known, field, types, f"block types among {sorted(known)}")
    return [known[t] for t in types]


# diffusers' AutoencoderKL config <-> ours
AUTOENCODER_DEFAULTS: dict[str, Any] = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
    block_out_channels=(64,), layers_per_block=1, act_fn="silu", latent_channels=4, norm_num_groups=32,
    sample_size=32, scaling_factor=0.18215, shift_factor=None, latents_mean=None, latents_std=None,
    force_upcast=True, use_quant_conv=True, use_post_quant_conv=True, mid_block_add_attention=True,
)


def autoencoder_fields_from_diffusers(values: dict[str, Any]) -> dict[str, Any]:
    """diffusers' AutoencoderKL config -> the fields of our AutoencoderConfig (a plain dict: this module knows no
    model file, so the model files can import it)."""
    v = refuse_unsupported(values, AUTOENCODER_DEFAULTS, "AutoencoderKL config")
    down = block_attention(v["down_block_types"], "down_block_types",
                           {"DownEncoderBlock2D": False, "AttnDownEncoderBlock2D": True})
    up = block_attention(v["up_block_types"], "up_block_types",
                         {"UpDecoderBlock2D": False, "AttnUpDecoderBlock2D": True})
    check_field(v["act_fn"] == "silu", "act_fn", v["act_fn"], '"silu"')
    check_tuple(v["block_out_channels"], "block_out_channels", None, is_positive_int)
    levels = len(v["block_out_channels"])
    check_field(len(down) == levels, "down_block_types", v["down_block_types"], f"{levels} entries, one per level")
    check_field(up == down[::-1], "up_block_types", v["up_block_types"],
                "the mirror of down_block_types (attention at the same levels)")
    check_int(v["latent_channels"], "latent_channels", maximum=MAX_SIZE)
    check_number(v["scaling_factor"], "scaling_factor", positive=True)
    channels, shift, scale = v["latent_channels"], v["shift_factor"], v["scaling_factor"]
    if v["latents_mean"] is not None or v["latents_std"] is not None:
        # Per-channel statistics (as SDXL-style pipelines use them): (z - mean) * scale / std.
        check_field(shift is None, "shift_factor", shift, "null when latents_mean is given")
        if v["latents_mean"] is not None:
            check_tuple(v["latents_mean"], "latents_mean", channels, is_finite_number)
        std = v["latents_std"] or [1.0] * channels
        check_tuple(std, "latents_std", channels, lambda s: is_finite_number(s) and s > 0)
        check_field(len(set(std)) == 1, "latents_std", v["latents_std"], "one value repeated (a per-channel "
                    "scale is not supported)")
        scale = scale / std[0]
        shift = tuple(v["latents_mean"]) if v["latents_mean"] is not None else None
    elif shift is not None:
        check_number(shift, "shift_factor")
        shift = (float(shift),) * channels
    sample_size = v["sample_size"]
    if isinstance(sample_size, (list, tuple)):
        sample_size = sample_size[0]
    return dict(
        in_channels=v["in_channels"], out_channels=v["out_channels"],
        block_out_channels=tuple(v["block_out_channels"]), attention_levels=tuple(down),
        layers_per_block=v["layers_per_block"], latent_channels=v["latent_channels"],
        norm_num_groups=v["norm_num_groups"], mid_attention=v["mid_block_add_attention"],
        use_quant_conv=v["use_quant_conv"], use_post_quant_conv=v["use_post_quant_conv"],
        scaling_factor=float(scale), shift_factor=shift, sample_size=sample_size,
    )


def autoencoder_config_to_diffusers(config) -> dict[str, Any]:
    """Our AutoencoderConfig -> diffusers' AutoencoderKL config fields."""
    shift, mean = None, None
    if config.shift_factor is not None and len(set(config.shift_factor)) == 1:
        shift = config.shift_factor[0]
    elif config.shift_factor is not None:
        mean = list(config.shift_factor)
    return dict(
        in_channels=config.in_channels, out_channels=config.out_channels,
        down_block_types=["AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in config.attention_levels],
        up_block_types=["AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in config.attention_levels[::-1]],
        block_out_channels=list(config.block_out_channels), layers_per_block=config.layers_per_block,
        act_fn="silu", latent_channels=config.latent_channels, norm_num_groups=config.norm_num_groups,
        sample_size=config.sample_size, scaling_factor=config.scaling_factor, shift_factor=shift,
        latents_mean=mean, latents_std=None if mean is None else [1.0] * config.latent_channels,
        force_upcast=True, use_quant_conv=config.use_quant_conv, use_post_quant_conv=config.use_post_quant_conv,
        mid_block_add_attention=config.mid_attention,
    )


# diffusers' UNet2DModel config <-> ours
UNET_DEFAULTS: dict[str, Any] = dict(
    sample_size=None, in_channels=3, out_channels=3, center_input_sample=False, time_embedding_type="positional",
    time_embedding_dim=None, freq_shift=0, flip_sin_to_cos=True,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    mid_block_type="UNetMidBlock2D",
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(224, 448, 672, 896), layers_per_block=2, mid_block_scale_factor=1, downsample_padding=1,
    downsample_type="conv", upsample_type="conv", dropout=0.0, act_fn="silu", attention_head_dim=8,
    norm_num_groups=32, attn_norm_num_groups=None, norm_eps=1e-5, resnet_time_scale_shift="default",
    add_attention=True, class_embed_type=None, num_class_embeds=None, num_train_timesteps=None,
)


def unet_fields_from_diffusers(values: dict[str, Any]) -> dict[str, Any]:
    """diffusers' UNet2DModel config -> the fields of our UNetConfig (a plain dict)."""
    v = refuse_unsupported(values, UNET_DEFAULTS, "UNet2DModel config")
    fixed = dict(center_input_sample=False, time_embedding_type="positional", mid_block_type="UNetMidBlock2D",
                 mid_block_scale_factor=1, downsample_type="conv", upsample_type="conv", act_fn="silu",
                 class_embed_type=None)
    for field, value in fixed.items():
        check_field(v[field] == value, field, v[field], f"{value!r} (the only value encdiff supports)")
    check_field(v["resnet_time_scale_shift"] in ("default", "scale_shift"), "resnet_time_scale_shift",
                v["resnet_time_scale_shift"], '"default" or "scale_shift"')
    check_field(v["attn_norm_num_groups"] in (None, v["norm_num_groups"]), "attn_norm_num_groups",
                v["attn_norm_num_groups"], f"null or equal to norm_num_groups ({v['norm_num_groups']})")
    down = block_attention(v["down_block_types"], "down_block_types", {"DownBlock2D": False, "AttnDownBlock2D": True})
    up = block_attention(v["up_block_types"], "up_block_types", {"UpBlock2D": False, "AttnUpBlock2D": True})
    check_tuple(v["block_out_channels"], "block_out_channels", None, is_positive_int)
    levels = len(v["block_out_channels"])
    check_field(len(down) == levels, "down_block_types", v["down_block_types"], f"{levels} entries, one per level")
    check_field(up == down[::-1], "up_block_types", v["up_block_types"],
                "the mirror of down_block_types (attention at the same levels)")
    scale_shift = v["resnet_time_scale_shift"] == "scale_shift"
    sample_size = v["sample_size"]
    if isinstance(sample_size, (list, tuple)):
        sample_size = sample_size[0]
    classes = v["num_class_embeds"] or 0
    check_int(classes, "num_class_embeds", minimum=0)
    fields = dict(
        in_channels=v["in_channels"], out_channels=v["out_channels"], sample_size=sample_size or 32,
        block_out_channels=tuple(v["block_out_channels"]), attention_levels=tuple(down),
        layers_per_block=v["layers_per_block"], attention_head_dim=v["attention_head_dim"],
        mid_attention=v["add_attention"],
        # diffusers' mid block normalises its attention only for "default" blocks, unless told the groups.
        mid_attention_norm=not scale_shift or v["attn_norm_num_groups"] is not None,
        norm_num_groups=v["norm_num_groups"], norm_eps=v["norm_eps"], emb_channels=v["time_embedding_dim"],
        scale_shift=scale_shift, flip_sin_to_cos=v["flip_sin_to_cos"], freq_shift=v["freq_shift"],
        downsample_padding=v["downsample_padding"], dropout=v["dropout"],
        # A diffusers table has no reserved row unless we wrote it: then its last row is the null class.
        num_classes=classes - 1 if classes and values.get("_encdiff_null_class") else classes,
    )
    if classes:  # otherwise the config's own default
        fields["null_class"] = bool(values.get("_encdiff_null_class"))
    return fields


def unet_config_to_diffusers(config) -> dict[str, Any]:
    """Our UNetConfig -> diffusers' UNet2DModel config fields."""
    if not (config.mid_attention_norm or config.scale_shift):
        raise EncdiffError("mid_attention_norm = False needs scale_shift = True to be expressed in diffusers' format")
    return dict(
        _encdiff_null_class=bool(config.num_classes and config.null_class),
        sample_size=config.sample_size, in_channels=config.in_channels, out_channels=config.out_channels,
        center_input_sample=False, time_embedding_type="positional", time_embedding_dim=config.emb_channels,
        freq_shift=config.freq_shift, flip_sin_to_cos=config.flip_sin_to_cos,
        down_block_types=["AttnDownBlock2D" if a else "DownBlock2D" for a in config.attention_levels],
        mid_block_type="UNetMidBlock2D",
        up_block_types=["AttnUpBlock2D" if a else "UpBlock2D" for a in config.attention_levels[::-1]],
        block_out_channels=list(config.block_out_channels), layers_per_block=config.layers_per_block,
        mid_block_scale_factor=1, downsample_padding=config.downsample_padding, downsample_type="conv",
        upsample_type="conv", dropout=config.dropout, act_fn="silu", attention_head_dim=config.attention_head_dim,
        norm_num_groups=config.norm_num_groups,
        attn_norm_num_groups=config.norm_num_groups if config.scale_shift and config.mid_attention_norm else None,
        norm_eps=config.norm_eps, resnet_time_scale_shift="scale_shift" if config.scale_shift else "default",
        add_attention=config.mid_attention, class_embed_type=None,
        num_class_embeds=config.class_embeddings or None, num_train_timesteps=None,
    )



