"""Latents for stage 2 and after: the autoencoder's latent statistics (its scale/shift), every image's latent and its
mirror's encoded once and cached in the run folder, and the batches the loop draws from them."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..autoencoder import Autoencoder
from ..checkpoint import sha256_file
from ..data import ImageDataset
from ..tensorfile import read_mapped, write_mapped
from .loop import Distributed


@torch.inference_mode()
def measure_latent_statistics(autoencoder: Autoencoder, dataset: ImageDataset, device, batch: int = 256,
                              progress: bool = True) -> Autoencoder:
    """Set shift = per-channel mean and scale = 1 / std of the raw latents over the data (LDM sec. 4.3.2)."""
    n, total, total_sq = 0, 0.0, 0.0
    for start in tqdm(range(0, len(dataset), batch), desc="latent statistics", unit="batch", leave=False,
                      disable=not progress):
        x, _ = dataset.batch(torch.arange(start, min(start + batch, len(dataset))))
        z = autoencoder.posterior(x.to(device)).mode().double()
        total = total + z.sum(dim=(0, 2, 3))
        total_sq = total_sq + z.square().sum(dim=(0, 2, 3))
        n += z.shape[0] * z.shape[2] * z.shape[3]
    mean = total / n
    # The variance around the per-channel means, pooled over channels: one scale keeps channel ratios intact.
    var = (total_sq / n - mean.square()).mean()
    config = dataclasses.replace(autoencoder.config, scaling_factor=float(1 / var.sqrt()),
                                 shift_factor=tuple(float(m) for m in mean))
    measured = Autoencoder(config).to(device)
    measured.load_state_dict(autoencoder.state_dict())
    return measured.eval()


@torch.inference_mode()
def encode_dataset(autoencoder: Autoencoder, dataset: ImageDataset, device, batch: int = 256,
                   progress: bool = True, out: np.ndarray | None = None) -> torch.Tensor | np.ndarray:
    """Latents of every image and of its mirror image: (N, 2, C, h, w) float32, flip index 1 = mirrored; written
    into `out` (a memory-mapped file's view) batch by batch if given, so they are never all in memory."""
    parts = []
    # A progress bar from the first batch: encoding a large folder takes minutes on a CPU.
    for start in tqdm(range(0, len(dataset), batch), desc="encoding latents", unit="batch", disable=not progress):
        idx = torch.arange(start, min(start + batch, len(dataset)))
        x, _ = dataset.batch(idx)
        x = x.to(device)
        latents = torch.stack([autoencoder.encode(x), autoencoder.encode(x.flip(-1))], 1).float().cpu()
        if out is None:
            parts.append(latents)
        else:
            out[start:start + len(idx)] = latents.numpy()
    return torch.cat(parts) if out is None else out


def latent_batches(latents: torch.Tensor, dataset: ImageDataset):
    """`Recipe.batch` for the training loop over cached latents (N, 2, C, h, w): each image's latent, or its mirror's."""
    def batch(indices, flips):
        return latents[indices, flips.long()], None if dataset.labels is None else dataset.labels[indices]
    return batch


def cached_latents(autoencoder: Autoencoder, dataset: ImageDataset, cache_dir: Path, key: str,
                   dist_: Distributed) -> torch.Tensor:
    """Encode the data set once (rank 0) and keep it in the run's cache folder; every rank then loads it.

    The file is named by the autoencoder's weights and by what the images are (`ImageDataset.content_key`, the
    decoded pixels): replacing an image, or the autoencoder, encodes again. A damaged file is encoded again with a
    warning."""
    ae_folder = Path(key)
    weights = next((p for p in (ae_folder / "model.safetensors", ae_folder / "diffusion_pytorch_model.safetensors")
                    if p.is_file()), None)
    tag = sha256_file(weights)[:16] if weights else "unknown"
    path = cache_dir / f"latents-{tag}-{dataset.content_key[:16]}-{len(dataset)}.safetensors"

    side = dataset.resolution // autoencoder.downsample_factor
    shape = (len(dataset), 2, autoencoder.latent_channels, side, side)

    def usable() -> bool:
        try:
            latents = read_mapped(path)[0]["latents"]
        except Exception as e:  # any damage: truncated, not safetensors, no such key
            warnings.warn(f"{path}: ignoring a damaged latent cache ({type(e).__name__}); encoding again", stacklevel=3)
            return False
        if tuple(latents.shape) != shape:
            warnings.warn(f"{path}: ignoring a latent cache of shape {tuple(latents.shape)}; encoding again",
                          stacklevel=3)
            return False
        return True

    if dist_.main and not (path.is_file() and usable()):
        cache_dir.mkdir(parents=True, exist_ok=True)
        write_mapped(path, {"latents": (torch.float32, shape)},
                     lambda views: encode_dataset(autoencoder, dataset, dist_.device, out=views["latents"]))
    dist_.barrier()
    return read_mapped(path)[0]["latents"]  # memory-mapped: each rank reads the rows its batches touch


