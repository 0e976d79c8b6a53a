"""Evaluation: feature spaces, cached reference statistics, and the runs behind `encdiff eval` and the trainer's
evaluations (generators, autoencoders, image folders, likelihood), with their reports. The metrics' maths is in
metrics.py, the standard FID network in inception.py.

Features come from encdiff's CIFAR-10 ResNet (featurenet.py) by default, so the numbers are NOT comparable
to Inception FIDs in papers; compare your models with each other. With pytorch-fid's Inception weights
file, `inception.FIDInceptionV3` gives the standard Inception FID.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .buckets import format_shape, parse_shape, resolve_buckets
from .checkpoint import atomic_save_tensors, atomic_write_bytes, read_weights
from .data import ImageDataset
from .errors import EncdiffError, count
from .images import to_uint8, to_unit
from .metrics import (KID_SUBSET_SIZE, KID_SUBSETS, PR_K, bits_per_dim, frechet_distance, gaussian_stats, kid,
                      min_images_for_fid, precision_recall, psnr_from_mse, psnr_ssim)

# --- feature spaces ------------------------------------------------------------------------------------
def default_feature_net():
    from .featurenet import FeatureNet

    return FeatureNet.load()


def feature_net_identity(net: torch.nn.Module) -> str:
    """A hash of the net's class, config and weights: cached reference statistics are only reused with the same
    net (a config field such as `feature_scale` or `flip_average` changes the features as much as a weight)."""
    h = hashlib.sha256(type(net).__name__.encode())
    h.update(repr(getattr(net, "config", None)).encode())
    for key, value in sorted(net.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def images_identity(images: torch.Tensor) -> str:
    h = hashlib.sha256(str(tuple(images.shape)).encode())
    h.update(images.contiguous().numpy().tobytes())
    return h.hexdigest()


@torch.inference_mode()
def extract_features(net: torch.nn.Module, images: torch.Tensor | Iterable[torch.Tensor], batch_size: int = 250,
                     progress: bool = False, desc: str = "features") -> torch.Tensor:
    """uint8 images (N, C, H, W), or an iterable of uint8 batches -> float32 features (N, D).

    Features are computed in float32 (bf16 would move FID by more than the real-data floor's noise)."""
    net.eval()
    batches = (images[s:s + batch_size] for s in range(0, len(images), batch_size)) \
        if isinstance(images, torch.Tensor) else images
    total = len(images) if isinstance(images, torch.Tensor) else None
    out = []
    with tqdm(total=total, desc=desc, unit="img", disable=not progress) as bar:
        for batch in batches:
            if batch.dtype != torch.uint8:
                raise EncdiffError(f"images have dtype {batch.dtype}; expected uint8 (0..255)")
            x = to_unit(batch)
            out.append(net.features(x.contiguous(memory_format=torch.channels_last)).float().cpu())
            bar.update(len(batch))
    return torch.cat(out)


def check_count(n: int, minimum: int, what: str, where: str) -> None:
    if n < minimum:
        raise EncdiffError(f"{where}: {count(n, 'image')}, too few for {what}: it needs at least {minimum} "
                           f"(use more images; 10,000 or more is the usual size for FID)")


# --- reference statistics ------------------------------------------------------------------------------
@dataclass
class ReferenceStats:
    """Features of a reference image set and their float64 Gaussian statistics."""

    features: torch.Tensor  # float32 (N, D)
    mu: torch.Tensor  # float64 (D,)
    sigma: torch.Tensor  # float64 (D, D)
    key: str  # sha256 of (feature net, images)
    source: str  # where the images came from (for the report)
    resolution: int  # the images' size: samples must match it
    # images per class name in the reference (a folder with class subfolders); None: unknown. A class-conditional
    # generator is evaluated with its classes in these proportions, as the reference holds them.
    class_counts: dict[str, int] | None = None
    # images per shape ("WxH") where the reference holds several (a folder read in a generator's aspect-ratio
    # buckets); None: every image is resolution x resolution. A generator is then sampled at those shapes in these
    # proportions.
    shape_counts: dict[str, int] | None = None

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {"encdiff_class": "ReferenceStats", "key": self.key, "source": self.source,
                    "resolution": str(self.resolution)}
        if self.class_counts is not None:
            metadata["class_counts"] = json.dumps(self.class_counts)
        if self.shape_counts is not None:
            metadata["shape_counts"] = json.dumps(self.shape_counts)
        atomic_save_tensors({"features": self.features, "mu": self.mu, "sigma": self.sigma}, path, metadata=metadata)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ReferenceStats":
        from safetensors import safe_open

        path = Path(path)
        tensors = read_weights(path)
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("encdiff_class") != "ReferenceStats" or set(tensors) != {"features", "mu", "sigma"}:
            raise EncdiffError(f"{path}: not an encdiff reference-statistics file (written by `encdiff eval` "
                               "into its --cache-dir)")
        counts = json.loads(meta["class_counts"]) if "class_counts" in meta else None
        shapes = json.loads(meta["shape_counts"]) if "shape_counts" in meta else None
        return cls(tensors["features"], tensors["mu"], tensors["sigma"], meta["key"], meta["source"],
                   int(meta["resolution"]), counts, shapes)


def reference_stats(images: torch.Tensor | Sequence[torch.Tensor], net: torch.nn.Module | None = None,
                    cache_dir: str | os.PathLike | None = None, source: str = "images", batch_size: int = 250,
                    progress: bool = False, class_counts: dict[str, int] | None = None,
                    resolution: int | None = None) -> ReferenceStats:
    """Features and statistics of uint8 reference images; with `cache_dir`, read from / written to
    `cache_dir/reference-<key>.safetensors`, the key hashing the image bytes and the feature net's config and weights.
    `class_counts` (images per class name) are recorded with them: see `ReferenceStats.class_counts`.

    `images` may be a list of parts of different shapes (a folder's aspect-ratio buckets): their images per shape
    are recorded (`ReferenceStats.shape_counts`) unless all are the square, and `resolution` names the square size
    they belong to."""
    net = net if net is not None else default_feature_net()
    listed = not isinstance(images, torch.Tensor)
    parts = [p for p in images if len(p)] if listed else [images]
    if not parts:
        raise EncdiffError(f"{source}: no reference images")
    shapes: dict[str, int] = {}
    for part in parts:
        name = format_shape(tuple(part.shape[-2:]))
        shapes[name] = shapes.get(name, 0) + len(part)
    if resolution is None:
        if len(shapes) > 1:
            raise ValueError("reference images of several shapes need the square `resolution` they were read at")
        resolution = parts[0].shape[-1]
    # parts record their shapes unless every image is the square (a folder all in one non-square bucket is sampled
    # at that shape); a tensor is images at `resolution`, as it always was
    shape_counts = shapes if listed and list(shapes) != [format_shape((resolution, resolution))] else None
    # one part hashes as the tensor alone did, so caches written before parts existed are found again
    key = hashlib.sha256((feature_net_identity(net) + "".join(images_identity(p) for p in parts)).encode()).hexdigest()
    path = Path(cache_dir) / f"reference-{key[:24]}.safetensors" if cache_dir is not None else None
    if path is not None and path.is_file():
        cached = ReferenceStats.load(path)
        if cached.key == key:
            if class_counts is not None and cached.class_counts != class_counts:
                # the features are the images'; the labels come from the folder as it is read now
                cached.class_counts = class_counts
                cached.save(path)
            return cached
    features = torch.cat([extract_features(net, part, batch_size, progress, desc="reference features")
                          for part in parts])
    mu, sigma = gaussian_stats(features)
    stats = ReferenceStats(features, mu, sigma, key, source, resolution, class_counts, shape_counts)
    if path is not None:
        stats.save(path)
    return stats


# --- set-level metrics ---------------------------------------------------------------------------------
def compare_features(reference: ReferenceStats, features: torch.Tensor, *, kid_subsets: int = KID_SUBSETS,
                     kid_subset_size: int = KID_SUBSET_SIZE, k: int = PR_K, seed: int = 0,
                     where: str = "samples") -> dict:
    """FID, KID (mean, std), precision and recall of `features` against the reference."""
    minimum = min_images_for_fid(features.shape[1])
    check_count(len(reference.features), minimum, f"FID in a {features.shape[1]}-d feature space", reference.source)
    check_count(len(features), minimum, f"FID in a {features.shape[1]}-d feature space", where)
    mu, sigma = gaussian_stats(features)
    kid_mean, kid_std = kid(reference.features, features, kid_subsets, kid_subset_size, seed)
    precision, recall = precision_recall(reference.features, features, k)
    return {"fid": frechet_distance(reference.mu, reference.sigma, mu, sigma), "kid_mean": kid_mean,
            "kid_std": kid_std, "precision": precision, "recall": recall}


def class_accuracy(net: torch.nn.Module, images: torch.Tensor | Sequence[torch.Tensor], labels: torch.Tensor,
                   class_names: Sequence[str]) -> dict[str, float]:
    """Per class: the fraction of images of that (requested) class that the feature net classifies as it.
    `images` may be a list of parts of different shapes, `labels` then those of the parts in order."""
    logits = []
    with torch.inference_mode():
        for part in [images] if isinstance(images, torch.Tensor) else images:
            for s in range(0, len(part), 250):
                logits.append(net(to_unit(part[s:s + 250])).float())
    predicted = torch.cat(logits).argmax(1)
    return {class_names[c]: float((predicted[labels == c] == c).double().mean())
            for c in sorted(set(labels.tolist()))}


def sample_images(generator, n: int, *, batch_size: int = 100, sampling=None, seed: int = 0,
                  class_labels: torch.Tensor | None = None, progress: bool = False,
                  which: Sequence[int] | None = None, size: tuple[int, int] | None = None):
    """Yield uint8 batches of `n` generated images; image i uses seed `seed + i` (and class_labels[i]), with
    `sampling` (a pipeline.Sampling; default: the generator's). `which` makes only those of the n images, in that
    order; `size` (height, width) draws them at one of the generator's shapes (default its square)."""
    which = list(range(n)) if which is None else [int(i) for i in which]
    desc = "sampling" if size is None else f"sampling {format_shape(size)}"
    with tqdm(total=len(which), desc=desc, unit="img", disable=not progress) as bar:
        for s in range(0, len(which), batch_size):
            chosen = which[s:s + batch_size]
            labels = None if class_labels is None else class_labels[chosen]
            batch = generator.images([seed + i for i in chosen], labels, sampling, size=size)
            bar.update(len(chosen))
            yield batch


CLASS_MIXES = ("reference", "even")


def class_counts(labels: torch.Tensor, class_names: Sequence[str]) -> dict[str, int]:
    """Images per class name, from a reference's integer labels (what `ReferenceStats.class_counts` records)."""
    return {name: int((labels == c).sum()) for c, name in enumerate(class_names)}


def interleave(n: int, weights: Sequence[float]) -> torch.Tensor:
    """`n` picks among len(weights) choices in proportion to `weights`, interleaved by smooth weighted round-robin:
    deterministic, every prefix within one pick per choice of its share, and with equal weights the plain cycle
    0, 1, 2, ...; a choice of weight 0 is never picked."""
    weights = [float(w) for w in weights]
    total = sum(weights)
    current = [0.0] * len(weights)
    picks = []
    for _ in range(n):
        current = [c + w for c, w in zip(current, weights)]
        pick = max(range(len(weights)), key=lambda j: (current[j], -j))  # ties: the first choice
        current[pick] -= total
        picks.append(pick)
    return torch.tensor(picks, dtype=torch.int64)


def class_labels(n: int, classes: Sequence[int], weights: Sequence[float] | None = None) -> torch.Tensor:
    """`n` class labels from `classes` in proportion to `weights` (None: equal), `interleave`d (so a balanced
    reference gives the same samples as `even`)."""
    picks = interleave(n, [1.0] * len(classes) if weights is None else weights)
    return torch.tensor(classes, dtype=torch.int64)[picks]


def class_weights(class_mix: str | None, generator_classes: Sequence[str], requested: Sequence[int],
                  reference: ReferenceStats) -> tuple[str, list[int] | None]:
    """Which mix runs and its weights per requested class. `reference`: the reference's class proportions (the FID
    then compares like with like on an unbalanced folder); `even`: every requested class equally; None: `reference`
    where the reference knows the generator's classes, else `even`."""
    if class_mix not in (None, *CLASS_MIXES):
        raise EncdiffError(f"--class-mix {class_mix!r}: choose one of {', '.join(CLASS_MIXES)}")
    if class_mix == "even":
        return "even", None
    counts = reference.class_counts or {}
    names = [generator_classes[c] if generator_classes else str(c) for c in requested]
    missing = [name for name in names if name not in counts]
    weights = [counts.get(name, 0) for name in names]
    if class_mix is None and (missing or not any(weights)):
        return "even", None
    if missing:
        known = ", ".join(counts) if counts else "none: it is not a folder with class subfolders"
        raise EncdiffError(f"--class-mix reference: the reference {reference.source} has no images of class "
                           f"{', '.join(missing)} (its classes: {known}); use --class-mix even")
    if not any(weights):
        raise EncdiffError(f"--class-mix reference: the reference {reference.source} has no images of the requested "
                           f"classes {', '.join(names)}; use --class-mix even")
    return "reference", weights


def feature_classes(net: torch.nn.Module, generator_classes: Sequence[str], requested: Sequence[int]) -> list[int] | None:
    """The feature net's class index for each requested generator class, matched by name; None when the
    feature net does not know them (then class accuracy is not reported)."""
    names = list(getattr(getattr(net, "config", None), "class_names", ()) or ())
    if not names or not generator_classes:
        return None
    mapped = [names.index(generator_classes[c]) if generator_classes[c] in names else None for c in requested]
    return None if any(m is None for m in mapped) else mapped


def class_accuracy_report(net: torch.nn.Module, images: torch.Tensor | Sequence[torch.Tensor],
                          labels: torch.Tensor | None, class_names: Sequence[str]) -> dict:
    """The report's `class_accuracy` (per class of `class_names` present in `labels`, indices into it: the feature
    net's accuracy on those images, its classes matched by name, `feature_classes`) and `class_accuracy_mean`; empty
    when there are no labels or the net does not know every one of the classes."""
    requested = [] if labels is None else sorted(set(labels.tolist()))
    mapped = feature_classes(net, class_names, requested) if requested else None
    if mapped is None:
        return {}
    lookup = dict(zip(requested, mapped))
    per_class = class_accuracy(net, images, torch.tensor([lookup[int(c)] for c in labels]), net.config.class_names)
    accuracy = {class_names[c]: per_class[net.config.class_names[lookup[c]]] for c in requested}
    return {"class_accuracy": accuracy, "class_accuracy_mean": sum(accuracy.values()) / len(accuracy)}


def evaluate_generator(generator, reference: ReferenceStats, n: int, *, net: torch.nn.Module | None = None,
                       batch_size: int = 100, sampler: str | None = None, steps: int | None = None,
                       guidance_scale: float | None = None, sigmas: Sequence[float] | None = None,
                       guidance_interval: tuple[float, float] | None = None, guidance_kind: str | None = None,
                       decoder: str | None = None,
                       seed: int = 0,
                       classes: Sequence[int | str] | None = None, class_mix: str | None = None,
                       kid_subsets: int = KID_SUBSETS, kid_subset_size: int = KID_SUBSET_SIZE, k: int = PR_K,
                       progress: bool = False) -> dict:
    """Generate `n` images and measure them against `reference`: FID, KID, precision, recall and, for a
    class-conditional model, the feature net's accuracy per requested class. The classes are drawn in the reference's
    proportions where it knows them, else equally (`class_mix`, see `class_weights`). A reference of several shapes
    (`ReferenceStats.shape_counts`) is matched shape for shape: the samples are drawn at those shapes, `interleave`d in
    the reference's proportions. Unset sampler, steps and guidance are the generator's own (`Generator.settings`;
    guidance_scale=1 for none). The result also records every setting that produced it. This is the call for
    periodic evaluation during training, e.g.

        stats = reference_stats(dataset.images[idx_2k], cache_dir=run_dir / "eval")  # once
        evaluate_generator(generator, stats, 2000, steps=20)                          # every N steps
    """
    net = net if net is not None else default_feature_net()
    if generator.image_size != reference.resolution:
        raise EncdiffError(f"the generator makes {generator.image_size}x{generator.image_size} images, the "
                           f"reference ({reference.source}) is {reference.resolution}x{reference.resolution}: "
                           "use a reference at the model's resolution (encdiff eval --resolution)")
    check_count(n, min_images_for_fid(reference.features.shape[1]),
                f"FID in a {reference.features.shape[1]}-d feature space", "--num (samples to generate)")
    shapes = [parse_shape(s) for s in reference.shape_counts] if reference.shape_counts else [None]
    for shape in shapes:
        if shape is not None and shape not in generator.sizes:
            raise EncdiffError(f"the reference ({reference.source}) holds {format_shape(shape)} images, a shape the "
                               f"generator was not trained at (its shapes: "
                               f"{', '.join(format_shape(s) for s in generator.sizes)}); read the reference in the "
                               "generator's shapes, or at its square with --resolution")
    shape_of = interleave(n, list(reference.shape_counts.values())) if reference.shape_counts else \
        torch.zeros(n, dtype=torch.int64)
    labels, requested, mix = None, [], None
    if generator.num_classes:
        requested = [generator.class_index(c) for c in classes] if classes else list(range(generator.num_classes))
        mix, weights = class_weights(class_mix, generator.class_names, requested, reference)
        labels = class_labels(n, requested, weights)
        requested = [c for c in requested if (labels == c).any()]  # a class the reference lacks is not drawn
    elif classes:
        raise EncdiffError("classes were requested but the model is unconditional: it takes no class")
    elif class_mix is not None:
        raise EncdiffError(f"--class-mix {class_mix}: the model is unconditional: it takes no class")
    sampling = generator.settings(labels, sampler=sampler, steps=steps, guidance_scale=guidance_scale, sigmas=sigmas,
                                  guidance_interval=guidance_interval, guidance_kind=guidance_kind, decoder=decoder)
    started = time.perf_counter()
    generator.reset_evaluations()  # counted as they run: a guided pair is two, a step outside the interval one
    which = [torch.nonzero(shape_of == j).flatten() for j in range(len(shapes))]
    parts = [torch.cat(list(sample_images(generator, n, batch_size=batch_size, sampling=sampling, seed=seed,
                                          class_labels=labels, progress=progress, which=chosen, size=shape)))
             for shape, chosen in zip(shapes, which) if len(chosen)]
    sample_seconds = time.perf_counter() - started
    nfe = generator.evaluations / n
    features = torch.cat([extract_features(net, part, progress=progress, desc="sample features") for part in parts])
    result = compare_features(reference, features, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size, k=k,
                              seed=seed, where="generated samples")
    in_part_order = None if labels is None else labels[torch.cat(which)]
    result.update(class_accuracy_report(net, parts, in_part_order, generator.class_names))
    if parts[0].shape[1] == 4:
        result["alpha_coverage"] = alpha_coverage(torch.cat([part[:, 3].flatten() for part in parts]))
    guidance = sampling.guidance_scale if sampling.guidance_scale != 1 else None
    result["settings"] = {"num_samples": n, "sampler": sampling.sampler, "steps": sampling.steps,
                          "schedule": sampling.schedule, "sigmas": sampling.sigmas, "guidance_scale": guidance,
                          "guidance_interval": sampling.guidance_interval if guidance else None,
                          "guidance_kind": sampling.guidance_kind if guidance else None, "decoder": sampling.decoder,
                          "network_evaluations_per_image": round(nfe, 3),
                          "seed": seed, "batch_size": batch_size, "classes": [generator.class_names[c] if
                                                                              generator.class_names else c
                                                                              for c in requested] or None,
                          "class_mix": mix,
                          "samples_per_class": None if labels is None else {
                              generator.class_names[c] if generator.class_names else str(c): int((labels == c).sum())
                              for c in requested},
                          "reference": reference.source, "reference_images": len(reference.features),
                          "reference_key": reference.key, "kid_subsets": kid_subsets,
                          "kid_subset_size": min(kid_subset_size, n, len(reference.features)), "k": k,
                          "feature_net": getattr(net, "name", type(net).__name__),
                          "feature_dim": reference.features.shape[1], "sample_seconds": round(sample_seconds, 1)}
    if reference.shape_counts:
        result["settings"]["samples_per_shape"] = {format_shape(shape): len(chosen)
                                                   for shape, chosen in zip(shapes, which)}
    return result


def evaluate_images(images: torch.Tensor | Sequence[torch.Tensor], reference: ReferenceStats, *,
                    net: torch.nn.Module | None = None, source: str = "samples", labels: torch.Tensor | None = None,
                    class_names: Sequence[str] = (), kid_subsets: int = KID_SUBSETS,
                    kid_subset_size: int = KID_SUBSET_SIZE, k: int = PR_K, seed: int = 0,
                    progress: bool = False) -> dict:
    """FID, KID, precision and recall of a set of uint8 images (e.g. a folder of generated images) and, where they
    are labelled (`labels`: indices into `class_names`, a folder's class subfolders) with classes the feature net
    knows, its accuracy per class: for generated images the same figure as a generator's, for real images held out
    from the feature net's training the rate that figure is to be read against. Images of several shapes are a list
    of parts, one tensor per shape (labels in their order), against a reference read in those shapes
    (`ReferenceStats.shape_counts`)."""
    net = net if net is not None else default_feature_net()
    parts = [images] if isinstance(images, torch.Tensor) else list(images)
    shapes = [format_shape(tuple(part.shape[-2:])) for part in parts]
    if reference.shape_counts:
        unknown = [shape for shape in shapes if shape not in reference.shape_counts]
        if unknown:
            raise EncdiffError(f"{source}: images of {', '.join(unknown)}, shapes the reference ({reference.source}) "
                               f"was not read at ({', '.join(reference.shape_counts)})")
    elif any(shape != format_shape((reference.resolution,) * 2) for shape in shapes):
        raise EncdiffError(f"{source}: images are {', '.join(shapes)}, the reference ({reference.source}) is "
                           f"{reference.resolution}x{reference.resolution}; compare at one size (encdiff eval "
                           "--resolution R resizes both)")
    features = torch.cat([extract_features(net, part, progress=progress, desc="sample features") for part in parts])
    result = compare_features(reference, features, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size, k=k,
                              seed=seed, where=source)
    result.update(class_accuracy_report(net, parts, labels, class_names))
    result["settings"] = {"samples": source, "num_samples": len(features), "reference": reference.source,
                          "reference_images": len(reference.features), "reference_key": reference.key,
                          "kid_subsets": kid_subsets, "kid_subset_size": min(kid_subset_size, len(images),
                                                                             len(reference.features)),
                          "k": k, "seed": seed, "feature_net": getattr(net, "name", type(net).__name__),
                          "feature_dim": reference.features.shape[1],
                          "images_per_class": None if labels is None else class_counts(labels, class_names)}
    if reference.shape_counts:
        result["settings"]["samples_per_shape"] = {shape: len(part) for shape, part in zip(shapes, parts)}
    return result


# --- reconstructions -----------------------------------------------------------------------------------
@torch.inference_mode()
def reconstruct(autoencoder, images: torch.Tensor, batch_size: int = 100, progress: bool = False) -> torch.Tensor:
    """uint8 images -> uint8 reconstructions through the posterior mode (deterministic)."""
    out = []
    for s in tqdm(range(0, len(images), batch_size), desc="reconstructing", disable=not progress):
        x = to_unit(images[s:s + batch_size])
        z = autoencoder.posterior(x).mode()
        pixels = autoencoder.decode_raw(z)
        out.append(to_uint8(pixels))
    return torch.cat(out)


def alpha_edges(reconstructed: torch.Tensor, alpha: torch.Tensor) -> dict[str, float | None]:
    """Where an RGBA reconstruction's alpha error lies: the pixels whose true alpha is partial (0 < alpha < 255, the
    anti-aliased edges of icons and sprites) against the fully transparent or opaque ones. On emoji64 the edges are
    about an eighth of the pixels and carry most of the squared error, so they, not the flat regions, decide the alpha
    PSNR. PSNRs here are pooled over all images (one mean squared error per group), not per-image means."""
    se = (reconstructed.double() - alpha.double()).square()
    edges = (alpha > 0) & (alpha < 255)

    def pooled(mask: torch.Tensor) -> float | None:
        return float(psnr_from_mse(se[mask].mean(), int(mask.sum()))) if mask.any() else None

    total = float(se.sum())
    return {"alpha_edge_pixels": float(edges.double().mean()),
            "alpha_edge_error_share": float(se[edges].sum()) / total if total else 0.0,
            "psnr_alpha_edges_pooled": pooled(edges), "psnr_alpha_flat_pooled": pooled(~edges)}


def alpha_coverage(alpha: torch.Tensor) -> dict[str, float]:
    """The shares of uint8 alpha values that are fully transparent (0), partial (1-254) and opaque (255): how clean
    an RGBA model's backgrounds and outlines are. Real icons are mostly flat, their partial pixels a thin anti-aliased
    outline (emoji64: 12 %); a generator whose backgrounds are not cleanly transparent shows it as a larger partial
    share than its training images'."""
    n = alpha.numel()
    transparent, opaque = int((alpha == 0).sum()), int((alpha == 255).sum())
    return {"transparent": transparent / n, "partial": (n - transparent - opaque) / n, "opaque": opaque / n}


def evaluate_autoencoder(autoencoder, images: torch.Tensor | Sequence[torch.Tensor], *,
                         net: torch.nn.Module | None = None, source: str = "images", batch_size: int = 100,
                         cache_dir: str | os.PathLike | None = None, progress: bool = False) -> dict:
    """PSNR, SSIM and reconstruction FID (reconstructions against the originals) on uint8 images; for RGBA images
    also PSNR/SSIM of the colour and of the alpha channel apart (the features see RGBA on white), and where the alpha
    error lies (alpha_edges). `images` may be a list of parts of different shapes (a folder's aspect-ratio buckets):
    the per-image means are then over every image, and the statistics those of all of them."""
    net = net if net is not None else default_feature_net()
    listed = not isinstance(images, torch.Tensor)
    parts = [p for p in images if len(p)] if listed else [images]
    recon = [reconstruct(autoencoder, part, batch_size, progress) for part in parts]
    n = sum(len(part) for part in parts)

    def mean_over_images(channels: slice) -> tuple[float, float]:
        # psnr_ssim's per-image means, weighted by each part's images: the mean over every image
        values = [psnr_ssim(r[:, channels], part[:, channels]) for r, part in zip(recon, parts)]
        return tuple(sum(v[i] * len(part) for v, part in zip(values, parts)) / n for i in range(2))

    psnr, ssim = mean_over_images(slice(None))
    extra = {}
    if parts[0].shape[1] == 4:
        extra["psnr_colour"], extra["ssim_colour"] = mean_over_images(slice(0, 3))
        extra["psnr_alpha"], extra["ssim_alpha"] = mean_over_images(slice(3, 4))
        extra.update(alpha_edges(torch.cat([r[:, 3].flatten() for r in recon]),
                                 torch.cat([part[:, 3].flatten() for part in parts])))
    reference = reference_stats(parts if listed else images, net, cache_dir, source, progress=progress,
                                resolution=autoencoder.config.sample_size if listed else None)
    rfid = None
    if n >= min_images_for_fid(reference.features.shape[1]):
        features = torch.cat([extract_features(net, r, progress=progress, desc="reconstruction features")
                              for r in recon])
        mu, sigma = gaussian_stats(features)
        rfid = frechet_distance(reference.mu, reference.sigma, mu, sigma)
    settings = {"images": source, "num_images": n, "posterior": "mode", "ssim_window": "gaussian 11x11, sigma 1.5",
                "psnr_data_range": 255, "feature_net": getattr(net, "name", type(net).__name__)}
    if reference.shape_counts:
        settings["images_per_shape"] = reference.shape_counts
    return {"psnr": psnr, "ssim": ssim, **extra, "rfid": rfid, "settings": settings}


# --- controlled degradations (sanity checks: FID must grow with each) ------------------------------------
def gaussian_blur(images: torch.Tensor, sigma: float, radius: int = 3) -> torch.Tensor:
    """uint8 images blurred by a separable Gaussian of std `sigma` pixels (reflect padding)."""
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-x**2 / (2 * sigma**2))
    k = (k / k.sum()).float()
    c = images.shape[1]
    out = images.float()
    out = F.conv2d(F.pad(out, (radius, radius, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    out = F.conv2d(F.pad(out, (0, 0, radius, radius), mode="reflect"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)
    return out.round().clamp(0, 255).to(torch.uint8)


def add_noise(images: torch.Tensor, std: float, seed: int = 0) -> torch.Tensor:
    """uint8 images plus seeded Gaussian noise of `std` (in 0..255 units), rounded and clipped."""
    g = torch.Generator().manual_seed(seed)
    return (images.float() + std * torch.randn(images.shape, generator=g)).round().clamp(0, 255).to(torch.uint8)


# --- reports -------------------------------------------------------------------------------------------
def write_report(result: dict, out_dir: str | os.PathLike, title: str) -> tuple[Path, Path]:
    """`metrics.json` (everything) and `metrics.md` (a table of the metrics and one of the settings)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clean = {k: v for k, v in result.items() if not isinstance(v, torch.Tensor)}
    json_path, md_path = out / "metrics.json", out / "metrics.md"
    atomic_write_bytes(json_path, (json.dumps(clean, indent=2) + "\n").encode())

    def fmt(v):
        if isinstance(v, dict):  # e.g. samples per class: "cat 240, ship 30", not Python's repr
            return ", ".join(f"{k} {fmt(x)}" for k, x in v.items())
        return f"{v:.4f}" if isinstance(v, float) else ("—" if v is None else str(v))

    lines = [f"# {title}", "", "| metric | value |", "|---|---|"]
    for key, value in clean.items():
        if key == "settings":
            continue
        if isinstance(value, dict):
            lines += [f"| {key}: {name} | {fmt(v)} |" for name, v in value.items()]
        else:
            lines.append(f"| {key} | {fmt(value)} |")
    lines += ["", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {fmt(v)} |" for k, v in clean.get("settings", {}).items()]
    # the net is named, not assumed: the figures mean nothing without the features they were measured in
    lines += ["", "Feature-space metrics are in the features of `feature_weights` (encdiff's shipped CIFAR-10 net, a "
              "net from `encdiff train-feature-net`, or Inception v3): only Inception FIDs compare with published "
              "ones.", ""]
    atomic_write_bytes(md_path, "\n".join(lines).encode())
    return json_path, md_path


# --- `encdiff eval`: what a path holds, its reference, the report ---------------------------------------------------
@dataclass(frozen=True)
class EvalRequest:
    """What `encdiff eval` was asked; the fields are its flags (so errors name the flag)."""

    target: str  # generator folder, autoencoder folder or folder of images
    reference: str | None = None  # image folder or reference-*.safetensors statistics
    num: int = 10000  # samples to generate (autoencoder: images to reconstruct)
    reference_num: int | None = None  # a seeded random subset of the reference images
    sampler: str | None = None  # None: the generator's
    steps: int | None = None  # None: the generator's
    guidance: float | None = None  # None: the generator's; 1: none
    sigmas: tuple[float, ...] | None = None  # explicit noise levels, one per step; None: the generator's
    guidance_interval: tuple[float, float] | None = None  # guidance only where lo < sigma <= hi; None: the generator's
    guidance_kind: str | None = None  # classifier-free or auto (the generator's guide); None: the generator's
    decoder: str | None = None  # full or light (the generator's light decoder); None: the generator's
    classes: str | None = None  # comma-separated class names or indices
    class_mix: str | None = None  # reference (its class proportions) or even; None: reference where it has them
    seed: int = 0  # sample i uses seed + i; also seeds subsets
    batch_size: int = 100
    resolution: int | None = None  # resize and centre-crop reference (and sample-folder) images to this
    feature_net: str | None = None  # feature-net file (default: the shipped one)
    inception: str | None = None  # pytorch-fid's Inception weights: the standard Inception FID instead
    cache_dir: str | None = None  # decoded images and reference statistics
    kid_subsets: int = KID_SUBSETS
    kid_subset_size: int = KID_SUBSET_SIZE
    k: int = PR_K  # neighbours for precision/recall
    bpd: bool = False  # also bits/dim (pixel-space VP models)
    bpd_images: int = 1000
    bpd_timesteps: int | None = None
    workers: int | None = None  # image-decoding processes
    out: str | None = None  # report folder (default eval-<target name>)


def _image_sizes(folder: Path) -> dict[tuple[int, int], list[Path]]:
    """{(width, height): files} of an image folder, reading headers only."""
    from PIL import Image

    from .data import scan_folder

    files, _, _ = scan_folder(folder)
    sizes: dict[tuple[int, int], list[Path]] = {}
    for f in files:
        try:
            with Image.open(f) as image:
                sizes.setdefault(image.size, []).append(f)
        except Exception:  # unreadable or a decompression bomb (any PIL error type): ImageDataset skips and reports it
            continue
    return sizes


def _single_size(folder: Path, what: str) -> int:
    sizes = _image_sizes(folder)
    if not sizes:
        raise EncdiffError(f"{folder}: no readable images ({what})")
    if len(sizes) > 1:
        listed = "; ".join(f"{w}x{h} ({len(fs)} files, e.g. {fs[0].name})" for (w, h), fs in
                           sorted(sizes.items(), key=lambda kv: -len(kv[1]))[:4])
        raise EncdiffError(f"{folder}: mismatched image sizes in the {what}: {listed}; pass --resolution R to "
                           "resize and centre-crop every image to R x R")
    (w, h), = sizes
    if w != h:
        raise EncdiffError(f"{folder}: {w}x{h} images are not square; pass --resolution R to centre-crop them")
    return w


def _sample_shapes(folder: Path) -> list[tuple[int, int]] | None:
    """The (height, width) shapes of a folder of samples, the most common first, when they are several or not
    square (a bucketed generator's); None for one square size. Two sizes of one aspect ratio cannot be told apart
    by the buckets' nearest-ratio rule, so they are refused."""
    sizes = _image_sizes(folder)
    if len(sizes) <= 1 and all(w == h for w, h in sizes):
        return None
    ratios: dict[float, tuple[int, int]] = {}
    described = lambda size: f"{size[0]}x{size[1]} ({len(sizes[size])} files, e.g. {sizes[size][0].name})"
    for size in sorted(sizes):
        other = ratios.setdefault(round(size[0] / size[1], 6), size)
        if other != size:
            raise EncdiffError(f"{folder}: samples of {described(other)} and {described(size)}, one aspect ratio at "
                               "two sizes; evaluate each size apart, or pass --resolution R to resize every image to "
                               "R x R")
    return [(h, w) for (w, h) in sorted(sizes, key=lambda size: -len(sizes[size]))]


def _eval_kind(path: Path) -> str:
    from .pipeline import folder_kind
    from .data import image_files_under

    kind = folder_kind(path)
    if kind in ("generator", "autoencoder"):
        return kind
    if kind in ("unet", "model"):
        name = {"unet": "UNet"}.get(kind, "non-generator")
        raise EncdiffError(f"{path}: a {name} model folder is not a generator: evaluate a generator folder "
                           "(with generator.json, written by `encdiff train` or `encdiff export`), an autoencoder "
                           "folder, or a folder of generated images")
    if kind == "run":
        raise EncdiffError(f"{path}: a training run folder, not a generator: evaluate its model ({path / 'model'}) "
                           f"or export one with `encdiff export {path} OUT`")
    if path.is_dir() and image_files_under(path):
        return "images"
    raise EncdiffError(f"{path}: not a generator folder, an autoencoder folder or a folder of images")


def _load_reference(args: "EvalRequest", net, resolution: int, where: str,
                    sizes: Sequence[tuple[int, int]] = ()):
    """The reference: a statistics file from a previous run, or an image folder (at `resolution`). With `sizes`
    (a generator's shapes, several: it was trained with aspect-ratio buckets) and no --resolution, the folder is read
    in those shapes, each image in the one nearest its aspect ratio, as training read it."""

    if not args.reference:
        raise EncdiffError(f"--reference is required to evaluate {where}: an image folder (e.g. the training "
                           "or test split) or a reference-*.safetensors file from --cache-dir")
    ref = Path(args.reference)
    if ref.is_file():
        stats = ReferenceStats.load(ref)
        if stats.resolution != resolution:
            raise EncdiffError(f"{ref}: reference images were {stats.resolution}x{stats.resolution}, {where} is "
                               f"{resolution}x{resolution}")
        return stats, None
    if not ref.is_dir():
        raise EncdiffError(f"{ref}: reference not found (give an image folder or a reference statistics file)")
    if args.resolution is None and (len(sizes) > 1 or any(h != w for h, w in sizes)):
        data = ImageDataset(ref, resolution, cache_dir=args.cache_dir, workers=args.workers, buckets=list(sizes))
        keep = _reference_keep(len(data), args)
        counts = None if data.labels is None else class_counts(data.labels[keep], data.class_names)
        return reference_stats(data.images_by_bucket(keep), net, args.cache_dir, str(ref), progress=True,
                               class_counts=counts, resolution=resolution), data
    if args.resolution is None:
        native = _single_size(ref, "reference")
        if native != resolution:
            raise EncdiffError(f"mismatched image sizes: the reference {ref} has {native}x{native} images, {where} "
                               f"{resolution}x{resolution}; pass --resolution {resolution} to resize the reference")
    data = ImageDataset(ref, resolution, cache_dir=args.cache_dir, workers=args.workers)
    counts = None if data.labels is None else class_counts(_reference_subset(data.labels, args), data.class_names)
    return reference_stats(_reference_subset(data.images, args), net, args.cache_dir, str(ref), progress=True,
                           class_counts=counts), data


def _seeded_subset(n: int, num: int | None, seed: int) -> torch.Tensor:
    """The indices of `num` of n images (all for None): a seeded random subset (folders are often ordered by class),
    in file order."""
    if num is None or num >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:num].sort().values


def _reference_keep(n: int, args: "EvalRequest") -> torch.Tensor:
    """The indices of the n reference images that `--reference-num` keeps (`_seeded_subset`)."""
    return _seeded_subset(n, args.reference_num, args.seed)


def _reference_subset(images: torch.Tensor, args: "EvalRequest") -> torch.Tensor:
    """The reference images (or their labels) that `--reference-num` keeps (`_reference_keep`)."""
    return images[_reference_keep(len(images), args)]


def run_evaluation(args: "EvalRequest") -> tuple[Path, Path]:
    """`encdiff eval`: measure what `args.target` holds (a generator, an autoencoder or a folder of images) against
    the reference, and write metrics.json and metrics.md; returns their paths."""
    from .featurenet import FeatureNet
    from .inception import load_inception

    target = Path(args.target)
    kind = _eval_kind(target)
    if args.inception and args.feature_net:
        raise EncdiffError("give at most one of --inception and --feature-net")
    net = load_inception(args.inception) if args.inception else FeatureNet.load(args.feature_net)
    common = {"kid_subsets": args.kid_subsets, "kid_subset_size": args.kid_subset_size, "k": args.k}
    if kind != "generator" and (args.classes or args.class_mix):
        flag = "--classes" if args.classes else "--class-mix"
        raise EncdiffError(f"{flag}: {target} is {'an autoencoder' if kind == 'autoencoder' else 'a folder of images'}"
                           ", which draws no classes; the flag is for a generator")
    if kind == "generator":
        from .pipeline import Generator

        generator = Generator.from_pretrained(target)
        if args.resolution is not None and args.resolution != generator.image_size:
            raise EncdiffError(f"--resolution {args.resolution}: the generator makes {generator.image_size}x"
                               f"{generator.image_size} images; compare at that size")
        reference, ref_data = _load_reference(args, net, generator.image_size, f"the generator {target}",
                                              sizes=generator.sizes)
        classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
        result = evaluate_generator(generator, reference, args.num, net=net, batch_size=args.batch_size,
                                             sampler=args.sampler, steps=args.steps, guidance_scale=args.guidance,
                                             sigmas=args.sigmas, guidance_interval=args.guidance_interval,
                                             guidance_kind=args.guidance_kind, decoder=args.decoder,
                                             seed=args.seed, classes=classes, class_mix=args.class_mix,
                                             progress=True, **common)
        if generator.image_channels == 4 and ref_data is not None:
            # the same figure for the reference folder, read with its alpha (FID reads it as RGB on white)
            rgba = ImageDataset(ref_data.root, ref_data.resolution, channels=4, cache_dir=args.cache_dir,
                                workers=args.workers, buckets=list(generator.sizes) if ref_data.bucketed else None)
            alpha = [part[:, 3].flatten() for part in rgba.images_by_bucket(_reference_keep(len(rgba), args))]
            result["reference_alpha_coverage"] = alpha_coverage(torch.cat(alpha))
        if args.bpd:
            result.update(_bits_per_dim(args, generator, ref_data))
        result["settings"]["model"] = str(target)
    elif kind == "autoencoder":
        from .autoencoder import Autoencoder
        autoencoder = Autoencoder.from_pretrained(target).eval()
        if not args.reference:
            raise EncdiffError(f"--reference is required to evaluate the autoencoder {target}: the image folder "
                               "(split) to reconstruct")
        buckets = None
        if args.resolution is None:
            sizes = _image_sizes(Path(args.reference))
            if len(sizes) > 1 or any(w != h for w, h in sizes):
                # images of several sizes or not square: read as training reads such a folder, each in the
                # aspect-ratio bucket nearest it at the autoencoder's size (`--buckets auto`), none cropped square
                resolution = autoencoder.config.sample_size
                buckets = resolve_buckets(["auto"], resolution, autoencoder.downsample_factor)
            else:
                resolution = _single_size(Path(args.reference), "reference")
        else:
            resolution = args.resolution
        # read with the autoencoder's channels: an RGBA autoencoder reconstructs the alpha it was trained on
        data = ImageDataset(args.reference, resolution, channels=autoencoder.config.in_channels,
                            cache_dir=args.cache_dir, workers=args.workers, buckets=buckets)
        keep = _seeded_subset(len(data), args.num, args.seed)
        # all of a one-shape set: the images as read (a memory map for a large folder), not a copy
        images = data.images_by_bucket(keep) if buckets else data.images if len(keep) == len(data) else \
            data.images[keep]
        result = evaluate_autoencoder(autoencoder, images, net=net, source=str(args.reference),
                                               batch_size=args.batch_size, cache_dir=args.cache_dir, progress=True)
        result["settings"].update({"model": str(target), "resolution": resolution, "seed": args.seed})
    else:
        shapes = _sample_shapes(target) if args.resolution is None else None
        if shapes:
            # samples of several shapes (a bucketed generator's): each read at its own size, the reference in those
            # shapes, each real image in the one nearest its aspect ratio (as training read it)
            resolution = round(math.sqrt(shapes[0][0] * shapes[0][1]))
            samples = ImageDataset(target, resolution, cache_dir=None, workers=args.workers, buckets=shapes)
            order = torch.cat([torch.nonzero(samples.bucket_of == b).flatten() for b in range(len(samples.shapes))])
            images, labels = samples.images_by_bucket(order), None if samples.labels is None else samples.labels[order]
        else:
            resolution = args.resolution or _single_size(target, "samples")
            samples = ImageDataset(target, resolution, cache_dir=None, workers=args.workers)
            images, labels = samples.images, samples.labels
        reference, _ = _load_reference(args, net, resolution, f"the samples in {target}",
                                       sizes=samples.shapes if shapes else ())
        result = evaluate_images(images, reference, net=net, source=str(target), labels=labels,
                                 class_names=samples.class_names, seed=args.seed, progress=True, **common)
    result["settings"]["feature_weights"] = str(args.inception or args.feature_net or "shipped encdiff-featurenet")
    out = Path(args.out or f"eval-{target.name}")
    return write_report(result, out, f"encdiff eval {target}")




def _bits_per_dim(args: "EvalRequest", generator, ref_data) -> dict:
    from .denoiser import VPDenoiser

    from .autoencoder import IdentityAutoencoder

    if not isinstance(generator.denoiser, VPDenoiser) or not isinstance(generator.autoencoder, IdentityAutoencoder):
        raise EncdiffError("--bpd needs a pixel-space VP (DDPM-style) generator: bits/dim of a latent or EDM model "
                           "is not defined by this bound")
    if ref_data is None:
        raise EncdiffError("--bpd needs the reference as an image folder (the images to score), not a statistics file")
    if ref_data.bucketed and len(ref_data.shapes) > 1:
        raise EncdiffError(f"--bpd: the reference {ref_data.root} was read in the generator's "
                           f"{len(ref_data.shapes)} shapes, and bits/dim is scored at one: pass --resolution "
                           f"{generator.image_size} to read it as squares")
    if ref_data.channels != generator.image_channels:  # FID's reference is read as RGB; the model scores its own
        ref_data = ImageDataset(ref_data.root, ref_data.resolution, channels=generator.image_channels,
                                cache_dir=args.cache_dir, workers=args.workers)
    n = min(args.bpd_images, len(ref_data))
    idx = torch.randperm(len(ref_data), generator=torch.Generator().manual_seed(args.seed))[:n].sort().values
    x0, labels = ref_data.batch(idx)
    if generator.num_classes and labels is None:
        raise EncdiffError("--bpd with a class-conditional model needs a reference folder with class subfolders")
    per_image, parts = [], []
    for s in range(0, n, args.batch_size):
        r = bits_per_dim(generator.denoiser, x0[s:s + args.batch_size],
                         class_labels=None if not generator.num_classes else labels[s:s + args.batch_size],
                         timesteps=args.bpd_timesteps, seed=args.seed + s)
        per_image.append(r.pop("per_image"))
        parts.append(r)
    total = torch.cat(per_image)
    weights = [p["settings"]["num_images"] / n for p in parts]
    return {"bits_per_dim": float(total.mean()),
            "bits_per_dim_std_err": float(total.std() / total.numel() ** 0.5) if n > 1 else None,
            **{k: sum(w * p[k] for w, p in zip(weights, parts)) for k in ("prior_bpd", "diffusion_bpd", "decoder_bpd")},
            "bpd_settings": {**parts[0]["settings"], "num_images": n}}
