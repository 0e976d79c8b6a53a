"""Latents for stage 2 and after: the autoencoder's latent statistics (its scale/shift), every image's latent and its
mirror's encoded once and cached in the run folder (and, for the light decoder, the full decoder's images of them),
and the batches the loop draws from them."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..autoencoder import Autoencoder
from ..buckets import format_shape
from ..checkpoint import sha256_file
from ..data import ImageDataset
from ..images import to_uint8, to_unit
from ..tensorfile import read_mapped, write_mapped
from .loop import Distributed


def bucket_batches(dataset: ImageDataset, batch: int):
    """(bucket, indices) of consecutive batches of at most `batch` images, bucket by bucket, in file order within
    each: how the whole set is read once (statistics, encoding)."""
    for bucket in range(len(dataset.parts)):
        members = dataset.bucket_indices(bucket)
        for start in range(0, len(members), batch):
            yield bucket, members[start:start + batch]


def total_batches(dataset: ImageDataset, batch: int) -> int:
    return sum(-(-len(part) // batch) for part in dataset.parts)


@torch.inference_mode()
def measure_latent_statistics(autoencoder: Autoencoder, dataset: ImageDataset, device, batch: int = 256,
                              progress: bool = True) -> Autoencoder:
    """Set shift = per-channel mean and scale = 1 / std of the raw latents over the data (LDM sec. 4.3.2)."""
    n, total, total_sq = 0, 0.0, 0.0
    for _, idx in tqdm(bucket_batches(dataset, batch), total=total_batches(dataset, batch), desc="latent statistics",
                       unit="batch", leave=False, disable=not progress):
        x, _ = dataset.batch(idx)
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
                   progress: bool = True, out: list | None = None) -> list:
    """Latents of every image and of its mirror image, one (N_b, 2, C, h, w) float32 array per bucket (flip index 1
    = mirrored), rows as the bucket's images; written into `out` (memory-mapped views, one per bucket) batch by
    batch if given, so they are never all in memory."""
    parts: list[list[torch.Tensor]] = [[] for _ in dataset.parts]
    # A progress bar from the first batch: encoding a large folder takes minutes on a CPU.
    for bucket, idx in tqdm(bucket_batches(dataset, batch), total=total_batches(dataset, batch),
                            desc="encoding latents", unit="batch", disable=not progress):
        x, _ = dataset.batch(idx)
        x = x.to(device)
        latents = torch.stack([autoencoder.encode(x), autoencoder.encode(x.flip(-1))], 1).float().cpu()
        if out is None:
            parts[bucket].append(latents)
        else:
            rows = dataset.rows_of(idx)[1]
            out[bucket][int(rows[0]):int(rows[0]) + len(idx)] = latents.numpy()
    return [torch.cat(p) for p in parts] if out is None else out


def latent_batches(latents: list[torch.Tensor], dataset: ImageDataset):
    """`Recipe.batch` for the training loop over cached latents, (N_b, 2, C, h, w) per bucket: each image's latent,
    or its mirror's."""
    def batch(indices, flips):
        bucket, rows = dataset.rows_of(indices)
        # the flags come on the data generator's device (CUDA on a GPU), the cached latents are on the CPU
        return latents[bucket][rows, flips.cpu().long()], None if dataset.labels is None else dataset.labels[indices]
    return batch


def image_and_latent_batches(latents: list[torch.Tensor], decoded: list[torch.Tensor] | None, dataset: ImageDataset):
    """`Recipe.batch` for a stage that learns to decode (the light decoder): ((images, latents, full decodings),
    labels), each image mirrored where its flag says and read with its mirror's latent and decoding (an empty
    tensor for the decodings where there are none)."""
    read_latents = latent_batches(latents, dataset)
    read_decoded = None if decoded is None else latent_batches(decoded, dataset)  # stored as the latents are

    def batch(indices, flips):
        x, labels = dataset.batch(indices, flips)
        teacher = torch.empty(0) if read_decoded is None else to_unit(read_decoded(indices, flips)[0])
        return (x, read_latents(indices, flips)[0], teacher), labels
    return batch


@torch.inference_mode()
def decode_latents(autoencoder: Autoencoder, latents: list[torch.Tensor], device, out: list, batch: int = 256,
                   progress: bool = True) -> list:
    """The autoencoder's decoding of every cached latent (both mirrors) as uint8 images, the pixels a generator
    would write from them, into `out` (memory-mapped (N_b, 2, C, H, W) views, one per bucket) batch by batch."""
    total = sum(-(-len(part) // batch) for part in latents)
    bar = tqdm(total=total, desc="decoding latents", unit="batch", disable=not progress)
    for part, view in zip(latents, out):
        for start in range(0, len(part), batch):
            z = part[start:start + batch].to(device)
            images = autoencoder.decode(z.flatten(0, 1))
            view[start:start + len(z)] = to_uint8(images).unflatten(0, (len(z), 2)).numpy()
            bar.update()
    bar.close()
    return out


def latent_key(dataset: ImageDataset, bucket: int) -> str:
    """The tensor name of a bucket's latents in the cache file ("latents" for a set of one shape, as before buckets)."""
    return f"latents.{format_shape(dataset.shapes[bucket])}" if dataset.bucketed else "latents"


def _cached(path: Path, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, what: str,
            fill, dist_: Distributed) -> list[torch.Tensor]:
    """The tensors `shapes` of the cache file `path`, written once by rank 0 with `fill(views)` where the file is
    missing, damaged or of other shapes (said in a warning), then memory-mapped on every rank."""
    def usable() -> bool:
        try:
            tensors = read_mapped(path)[0]
            found = {name: tuple(tensors[name].shape) for name in shapes}
        except Exception as e:  # any damage: truncated, not safetensors, no such key
            warnings.warn(f"{path}: ignoring a damaged {what} cache ({type(e).__name__}); computing it again",
                          stacklevel=4)
            return False
        if found != shapes:
            warnings.warn(f"{path}: ignoring a {what} cache of shapes {found}; computing it again", stacklevel=4)
            return False
        return True

    if dist_.main and not (path.is_file() and usable()):
        path.parent.mkdir(parents=True, exist_ok=True)
        write_mapped(path, {name: (dtype, shape) for name, shape in shapes.items()},
                     lambda views: fill([views[name] for name in shapes]))
    dist_.barrier()
    tensors = read_mapped(path)[0]
    return [tensors[name] for name in shapes]  # memory-mapped: each rank reads the rows its batches touch


def _weights_tag(key: str) -> str:
    ae_folder = Path(key)
    weights = next((p for p in (ae_folder / "model.safetensors", ae_folder / "diffusion_pytorch_model.safetensors")
                    if p.is_file()), None)
    return sha256_file(weights)[:16] if weights else "unknown"


def cached_decodings(autoencoder: Autoencoder, latents: list[torch.Tensor], dataset: ImageDataset, cache_dir: Path,
                     key: str, dist_: Distributed) -> list[torch.Tensor]:
    """The autoencoder's uint8 decoding of every cached latent (`decode_latents`), cached beside the latents under the
    same naming: what a stage that learns from the full decoder (the light decoder's teacher term) reads instead of
    running it at every step."""
    path = cache_dir / f"decoded-{_weights_tag(key)}-{dataset.content_key[:16]}-{len(dataset)}.safetensors"
    shapes = {latent_key(dataset, b): (len(part), 2, autoencoder.config.in_channels, h, w)
              for b, (part, (h, w)) in enumerate(zip(dataset.parts, dataset.shapes))}
    return _cached(path, shapes, torch.uint8, "decoded-latent",
                   lambda views: decode_latents(autoencoder, latents, dist_.device, views), dist_)


def cached_latents(autoencoder: Autoencoder, dataset: ImageDataset, cache_dir: Path, key: str,
                   dist_: Distributed) -> list[torch.Tensor]:
    """Encode the data set once (rank 0) and keep it in the run's cache folder; every rank then loads it: one
    tensor per bucket.

    The file is named by the autoencoder's weights and by what the images are (`ImageDataset.content_key`, the
    decoded pixels and buckets): replacing an image, or the autoencoder, encodes again. A damaged file is encoded
    again with a warning."""
    path = cache_dir / f"latents-{_weights_tag(key)}-{dataset.content_key[:16]}-{len(dataset)}.safetensors"
    f = autoencoder.downsample_factor
    shapes = {latent_key(dataset, b): (len(part), 2, autoencoder.latent_channels, h // f, w // f)
              for b, (part, (h, w)) in enumerate(zip(dataset.parts, dataset.shapes))}
    return _cached(path, shapes, torch.float32, "latent",
                   lambda views: encode_dataset(autoencoder, dataset, dist_.device, out=views), dist_)
