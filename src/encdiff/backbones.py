"""The denoising backbones a generator may hold, by name, and the one place a `unet/` folder's class is decided.

- "unet": the ADM-style U-Net (unet.py), weight-compatible with diffusers' UNet2DModel;
- "edm2": the magnitude-preserving U-Net of EDM2 config E (mp_unet.py), encdiff's own format only.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .checkpoint import CONFIG, read_json
from .errors import EncdiffError, lookup
from .mp_unet import MPUNet, MPUNetConfig
from .unet import UNet, UNetConfig

BACKBONES: dict[str, type] = {"unet": UNet, "edm2": MPUNet}
CONFIGS: dict[str, type] = {"unet": UNetConfig, "edm2": MPUNetConfig}
# The class names a model folder's config.json may carry, per backbone (ours, and diffusers' for the U-Net).
CLASS_NAMES = {"UNet": "unet", "UNet2DModel": "unet", "MPUNet": "edm2"}


def backbone_class(name: str) -> type:
    return lookup(BACKBONES, name, "backbone")


def backbone_name(model: torch.nn.Module) -> str:
    return next(name for name, cls in BACKBONES.items() if isinstance(model, cls))


def load_backbone(path: str | os.PathLike, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The backbone in a model folder, of the class its config.json names (each class then checks its own file)."""
    folder = Path(path)
    if not (folder / CONFIG).is_file():
        raise EncdiffError(f"{folder}: not a model folder (no {CONFIG})")
    raw = read_json(folder / CONFIG)
    name = raw.get("encdiff_class") or raw.get("_class_name")
    if name not in CLASS_NAMES:
        raise EncdiffError(f"{folder / CONFIG}: a {name!r} model, not a denoising backbone (expected one of "
                           f"{', '.join(CLASS_NAMES)})")
    return BACKBONES[CLASS_NAMES[name]].from_pretrained(folder, device=device)
