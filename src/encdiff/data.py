"""Image folders as training data: scan, decode once to uint8 (in parallel, cached on disk as safetensors and read
back through a memory map, so a folder larger than memory trains too), serve float batches with flips, and shuffle
resumably across epochs and ranks.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import multiprocessing
import os
import re
import sys
import tempfile
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from .tensorfile import read_mapped, write_mapped
from .errors import EncdiffError, check_field, check_int, count
from .buckets import assign_buckets, format_shape
from .images import UnreadableImageError, background_rgb, check_image_args, load_image, to_unit, upright_size

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"})
# Bump whenever load_image's output for a given file changes, so that stale caches are never read.
DECODE_VERSION = 1
CACHE_FORMAT = "encdiff-images"
# How many unreadable files a warning or an error names before it says "and N more".
LISTED = 10
# A chunk of files decoded as one task: small enough for a smooth progress bar and modest results to send
# back from a worker, large enough that the per-task overhead does not matter.
CHUNK_FILES = 256
CHUNK_BYTES = 32 << 20


def is_hidden(path: Path) -> bool:
    return path.name.startswith(".")


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not is_hidden(path) and path.is_file()


def image_files_under(folder: Path, visited: set[tuple[int, int]] | None = None, skipped: list[Path] | None = None,
                      exclude: tuple[Path, ...] = ()) -> list[Path]:
    """Image files anywhere below `folder` (hidden files and folders skipped), sorted by their path parts.

    Symbolic links to folders are followed, but every real folder is visited once (tracked in `visited` by device
    and inode, shared across calls): a link loop or a second link to the same folder would otherwise count its
    images again. Folders passed over that way, and the `exclude` folders (a run folder inside the data), are
    appended to `skipped`."""
    visited = set() if visited is None else visited
    excluded = {p.resolve() for p in exclude}
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        here = Path(dirpath)
        stat = here.stat()
        if (stat.st_dev, stat.st_ino) in visited or here.resolve() in excluded:
            dirnames[:] = []
            if skipped is not None:
                skipped.append(here)
            continue
        visited.add((stat.st_dev, stat.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for p in (Path(dirpath, name) for name in filenames):
            if is_image_file(p):
                found.append(p)
            elif skipped is not None and is_broken_link(p):
                skipped.append(p)
    return sorted(found, key=lambda p: p.relative_to(folder).parts)


def is_broken_link(path: Path) -> bool:
    """A link named like an image whose target is missing (or itself): not an image, but worth saying."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not is_hidden(path) and path.is_symlink() and not path.exists()


def scan_folder(root: str | os.PathLike, exclude: tuple[Path, ...] = ()) -> tuple[list[Path], list[int] | None, list[str]]:
    """The image files of a folder (sorted), their labels and the class names.

    A flat folder (images directly in `root`) is unconditional: labels None, class names []. Otherwise each
    subfolder holding image files (at any depth) is a class, labelled by its position among the sorted names;
    subfolders without image files are ignored. Non-image extensions and hidden files and folders are ignored.
    Each real folder is read once (see `image_files_under`); the `exclude` folders are never read, and what was
    passed over is said in one warning.
    """
    root = Path(root)
    if not root.exists():
        raise EncdiffError(f"{root}: image folder not found")
    if not root.is_dir():
        raise EncdiffError(f"{root}: not a folder (expected a folder of images, or of class subfolders of images)")
    excluded = {p.resolve() for p in exclude}
    entries = sorted(p for p in root.iterdir() if not is_hidden(p))
    direct = [p for p in entries if is_image_file(p)]
    stat = root.stat()
    visited, skipped = {(stat.st_dev, stat.st_ino)}, [p for p in entries if is_broken_link(p)]
    classes = {}
    for p in sorted(entries, key=lambda p: p.is_symlink()):  # real folders claim their images before links to them
        if p.is_dir():
            if p.resolve() in excluded:
                skipped.append(p)
            elif files := image_files_under(p, visited, skipped, exclude):
                classes[p.name] = files
    if skipped:
        names = ", ".join(str(p) for p in skipped[:3]) + (f" and {len(skipped) - 3} more" if len(skipped) > 3 else "")
        warnings.warn(f"{root}: not read as data: {names} (a broken link, a folder already read through another "
                      "link, a link loop, or the run's own folder)", stacklevel=2)
    if direct and classes:
        raise EncdiffError(f"{direct[0]}: image file next to class subfolders ({', '.join(sorted(classes)[:3])}"
                           f"{', ...' if len(classes) > 3 else ''}) in {root}; put every image in a class "
                           f"subfolder, or use a flat folder without subfolders of images")
    if direct:
        return direct, None, []
    if not classes:
        raise EncdiffError(f"{root}: no image files (looked for {', '.join(sorted(IMAGE_EXTENSIONS))} "
                           f"in the folder and its subfolders)")
    class_names = sorted(classes)
    files = [f for name in class_names for f in classes[name]]
    labels = [label for label, name in enumerate(class_names) for _ in classes[name]]
    return files, labels, class_names


def decode_chunk(paths: list[str], resolution: int, channels: int, strict: bool,
                 background: str = "white", shape: tuple[int, int] | None = None
                 ) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Decode files in order: their images (zeros where unreadable) and (position, reason) per unreadable
    file. In strict mode it stops at the first unreadable file, which fails the whole set anyway."""
    height, width = shape or (resolution, resolution)
    images = np.zeros((len(paths), channels, height, width), dtype=np.uint8)
    failures = []
    for i, path in enumerate(paths):
        try:
            images[i] = load_image(path, resolution, channels, background, shape=shape)
        except UnreadableImageError as e:
            failures.append((i, e.reason))
            if strict:
                break
    return images, failures


def header_sizes(files: list[Path]) -> list[tuple[int, int] | None]:
    """Each file's upright (width, height) from its header, None where it cannot be opened (decoding says why)."""
    sizes = []
    for path in files:
        try:
            sizes.append(upright_size(path))
        except UnreadableImageError:
            sizes.append(None)
    return sizes


def default_workers() -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(cpus, 8)


def process_context() -> multiprocessing.context.BaseContext:
    """Fork on Linux: workers start at once and a script needs no `if __name__ == "__main__"` guard. The children
    run only PIL and numpy, never torch, so threads that torch left in the parent cannot deadlock them."""
    return multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")


def list_failures(root: Path, files: list[Path], failed: dict[int, str]) -> str:
    """The first few unreadable files, relative to `root`, with their reasons."""
    order = sorted(failed)
    listed = "; ".join(f"{files[i].relative_to(root).as_posix()} ({failed[i]})" for i in order[:LISTED])
    return listed + (f"; and {len(order) - LISTED} more" if len(order) > LISTED else "")


class ImageDataset:
    """A folder of images decoded once to uint8 (N, C, H, W), with labels from class subfolders.

    Unreadable files are skipped with one warning naming them (`skipped`), or, with `strict`, are an error
    naming the first. With `cache_dir`, the decoded set is written (as it is decoded, never whole in memory) to a
    safetensors file under a key hashing the resolution, channels and every file's relative path, size and
    modification time; `images` is then a tensor over a memory map of that file, read as batches touch it, and
    later runs map it instead of decoding. Without, the images are in memory. `workers` processes decode (default
    min(CPUs, 8); 0 or 1: in this process).

    With `buckets` (a list of (height, width) shapes, buckets.py), each image goes to the bucket nearest its aspect
    ratio instead of a centre-cropped square; buckets with fewer than `min_bucket` images are merged into their
    neighbours (`assign_buckets`). The images of each bucket are then one tensor of `parts` (cached apart, the
    shape in the cache's key), `shapes` lists the buckets in use, and `bucket_of` / `row` place every image;
    a batch is drawn within one bucket. A set of one shape is one part, and `images` is that part.
    """

    def __init__(self, root: str | os.PathLike, resolution: int, channels: int = 3, strict: bool = False,
                 cache_dir: str | os.PathLike | None = None, workers: int | None = None, progress: bool = True,
                 exclude: tuple[Path, ...] = (), background: str = "white",
                 buckets: list[tuple[int, int]] | None = None, min_bucket: int = 1):
        check_image_args(resolution, channels)
        check_int(workers, "workers", 0, optional=True, what="")
        check_int(min_bucket, "min_bucket", 1, what="")
        background_rgb(background)
        self.root = Path(root)
        self.resolution, self.channels = resolution, channels
        # the colour transparency is composited onto when read without alpha (channels 1 or 3)
        self.background = background
        files, labels, self.class_names = scan_folder(self.root, exclude)
        workers = default_workers() if workers is None else workers
        if buckets is None:
            groups, self.bucketed = [(None, list(range(len(files))))], False
        else:
            sizes = header_sizes(files)
            # an unopenable file fails to decode in any bucket: it is put in the first and reported from there
            readable = [i for i, size in enumerate(sizes) if size is not None]
            shapes, chosen = assign_buckets([sizes[i] for i in readable], list(buckets), min_bucket)
            group_of = [0] * len(files)
            for i, b in zip(readable, chosen):
                group_of[i] = b
            members = [[] for _ in shapes]
            for i, b in enumerate(group_of):
                members[b].append(i)
            groups, self.bucketed = list(zip(shapes, members)), True
        parts, keys, failed, kept_shapes = [], [], {}, []
        part_of = [0] * len(files)  # each file's position in `parts`
        for shape, members in groups:
            subset = [files[i] for i in members]
            images, part_failed, key = self.load_part(subset, None if labels is None else [labels[i] for i in members],
                                                      shape, strict, workers, progress, cache_dir)
            failed.update((members[i], reason) for i, reason in part_failed.items())
            if len(images):
                for i in members:
                    part_of[i] = len(parts)
                parts.append(images)
                keys.append(key)
                kept_shapes.append(shape or (resolution, resolution))
        self.check_failures(files, failed, strict)
        self.parts: list[torch.Tensor] = parts
        self.shapes: list[tuple[int, int]] = kept_shapes  # (height, width) of each part, in `parts` order
        # The data's fingerprint (files, sizes, times, decoding settings, buckets) when cached: a resumed run
        # checks it. One shape: the cache's own key, as before buckets existed.
        self.key: str | None = None if cache_dir is None else keys[0] if not self.bucketed else hashlib.sha256(
            json.dumps([[list(s), k] for s, k in zip(kept_shapes, keys)]).encode()).hexdigest()
        # every readable image's bucket and row in its part, in file order (the order of indices and labels): a
        # part holds its bucket's readable images in file order
        keep = [i for i in range(len(files)) if i not in failed]
        self.bucket_of = torch.tensor([part_of[i] for i in keep], dtype=torch.int64)
        self.row = torch.empty_like(self.bucket_of)
        for b, part in enumerate(parts):
            self.row[self.bucket_of == b] = torch.arange(len(part))
        self.labels: torch.Tensor | None = None if labels is None else torch.tensor([labels[i] for i in keep])
        self.skipped: list[Path] = [files[i] for i in sorted(failed)]
        if failed:
            warnings.warn(f"{self.root}: skipped {count(len(failed), 'unreadable image file')} of {len(files)}: "
                          f"{list_failures(self.root, files, failed)}", stacklevel=2)

    def load_part(self, files: list[Path], labels: list[int] | None, shape: tuple[int, int] | None, strict: bool,
                  workers: int, progress: bool, cache_dir: str | os.PathLike | None
                  ) -> tuple[torch.Tensor, dict[int, str], str | None]:
        """The readable images of `files` at `shape` (None: the square resolution), from the cache or decoded
        (into it, with a cache folder), their {position: reason} failures and the cache key."""
        cache_path, key = self.cache_location(files, cache_dir, shape) if cache_dir is not None else (None, None)
        loaded = self.read_cache(cache_path, key, files, shape) if cache_path is not None and cache_path.is_file() \
            else None
        if loaded is not None:
            return (*loaded, key)
        if cache_path is not None and (written := self.decode_to_cache(files, labels, strict, workers, progress,
                                                                       cache_path, key, shape)) is not None:
            return (*written, key)
        images, failed = self.decode(files, strict, workers, progress, shape=shape)
        if strict:
            self.check_failures(files, failed, strict)
        if failed:
            images = images[torch.tensor([i for i in range(len(files)) if i not in failed], dtype=torch.int64)]
        return images, failed, key

    def check_failures(self, files: list[Path], failed: dict[int, str], strict: bool) -> None:
        if failed and strict:
            first = min(failed)
            raise EncdiffError(f"{files[first]}: {failed[first]} (strict: every image file must be readable; "
                               f"{count(len(failed), 'unreadable file')} in {self.root})")
        if len(failed) == len(files):
            raise EncdiffError(f"{self.root}: no readable images among its {count(len(files), 'image file')}: "
                               f"{list_failures(self.root, files, failed)}")

    def __len__(self) -> int:
        return len(self.bucket_of)

    @property
    def images(self) -> torch.Tensor:
        """All images as one uint8 (N, C, H, W) tensor: a set of one shape only."""
        if len(self.parts) != 1:
            raise EncdiffError(f"{self.root}: its images come in {len(self.parts)} shapes (aspect-ratio buckets "
                               f"{', '.join(format_shape(s) for s in self.shapes)}); read them by bucket (`parts`)")
        return self.parts[0]

    @functools.cached_property
    def content_key(self) -> str:
        """sha256 of what the images are (the decoded pixels, the labels and the class names): whatever is
        computed from them, such as encoded latents, is keyed on it, so no change of the data can reuse it. Read
        in chunks: a memory-mapped set is never held whole."""
        h = hashlib.sha256(json.dumps([self.resolution, self.channels, self.class_names]).encode())
        if self.bucketed:
            h.update(json.dumps([list(s) for s in self.shapes]).encode())
            h.update(self.bucket_of.numpy().tobytes())
        for part in self.parts:
            rows = max(1, (64 << 20) // max(1, part[0].numel()))
            for start in range(0, len(part), rows):
                h.update(part[start:start + rows].contiguous().numpy().tobytes())
        if self.labels is not None:
            h.update(self.labels.numpy().tobytes())
        return h.hexdigest()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def bucket_indices(self, bucket: int) -> torch.Tensor:
        """The indices of the images in bucket `bucket` (a position in `shapes`), in file order."""
        return torch.nonzero(self.bucket_of == bucket).flatten()

    def images_by_bucket(self, indices: torch.Tensor) -> list[torch.Tensor]:
        """The uint8 images `indices` (of any buckets), one tensor per bucket that holds any of them, in `shapes`
        order, and within a bucket in the order of `indices` (a set of one shape: the one tensor images[indices])."""
        if len(self.parts) == 1:
            return [self.parts[0][indices]]
        buckets = self.bucket_of[indices]
        return [self.parts[b][self.row[indices[buckets == b]]] for b in range(len(self.shapes)) if (buckets == b).any()]

    def rows_of(self, indices: torch.Tensor) -> tuple[int, torch.Tensor]:
        """The bucket of images `indices` (all of one bucket: a batch is drawn within one) and their rows in its
        part; whatever is stored per bucket (images, latents) is read with them."""
        if len(self.parts) == 1:
            return 0, indices
        buckets = self.bucket_of[indices]
        if len(indices) and not bool((buckets == buckets[0]).all()):
            found = ", ".join(format_shape(self.shapes[b]) for b in buckets.unique().tolist())
            raise EncdiffError(f"a batch mixes aspect-ratio buckets ({found}): draw each batch within one")
        return (int(buckets[0]) if len(indices) else 0), self.row[indices]

    def batch(self, indices: torch.Tensor, flips: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images `indices` (all of one bucket) as float32 in [-1, 1] (x / 127.5 - 1), mirrored left-right where
        `flips` is True, and their labels (None for a flat folder)."""
        indices = indices.cpu()
        bucket, rows = self.rows_of(indices)
        x = to_unit(self.parts[bucket][rows])
        if flips is not None:
            if flips.shape != indices.shape:
                raise EncdiffError(f"flips has shape {tuple(flips.shape)}; expected {tuple(indices.shape)} "
                                   f"(one flag per index)")
            x = torch.where(flips.cpu().bool().view(-1, 1, 1, 1), x.flip(-1), x)
        return x, None if self.labels is None else self.labels[indices]

    def sample_indices(self, num: int) -> torch.Tensor:
        """`num` indices spread evenly over the largest bucket (preview grids: one shape per grid)."""
        largest = max(range(len(self.parts)), key=lambda b: (len(self.parts[b]), -b))
        members = self.bucket_indices(largest)
        return members[torch.arange(0, len(members), max(1, len(members) // num))[:num]]

    def decode(self, files: list[Path], strict: bool, workers: int, progress: bool,
               out: np.ndarray | None = None, shape: tuple[int, int] | None = None
               ) -> tuple[torch.Tensor | np.ndarray, dict[int, str]]:
        """All files decoded in file order (zeros where unreadable), into `out` if given (a memory map), and
        {index: reason} per unreadable file."""
        c = self.channels
        h, w = shape or (self.resolution, self.resolution)
        images = torch.empty((len(files), c, h, w), dtype=torch.uint8) if out is None else out
        failed: dict[int, str] = {}
        per_chunk = min(CHUNK_FILES, CHUNK_BYTES // (c * h * w), math.ceil(len(files) / max(1, workers * 4)))
        per_chunk = max(1, per_chunk)
        starts = range(0, len(files), per_chunk)
        chunks = [[str(f) for f in files[s:s + per_chunk]] for s in starts]
        workers = min(workers, len(chunks))
        decode = functools.partial(decode_chunk, resolution=self.resolution, channels=c, strict=strict,
                                   background=self.background, shape=shape)
        executor = None
        if workers > 1:
            executor = ProcessPoolExecutor(workers, mp_context=process_context())
            results = executor.map(decode, chunks)
        else:
            results = map(decode, chunks)
        label = f"decoding {self.root.name}" + (f" {format_shape(shape)}" if shape is not None else "")
        try:
            with tqdm(total=len(files), desc=label, unit="img", disable=not progress) as bar:
                for start, (array, failures) in zip(starts, results):
                    images[start:start + len(array)] = array if out is not None else torch.from_numpy(array)
                    failed.update((start + i, reason) for i, reason in failures)
                    bar.update(len(array))
                    if strict and failed:
                        break
        finally:
            if executor is not None:
                executor.shutdown(wait=True, cancel_futures=True)
        return images, failed

    def cache_location(self, files: list[Path], cache_dir: str | os.PathLike,
                       shape: tuple[int, int] | None = None) -> tuple[Path, str]:
        listing, changes = [], []
        for f in files:
            stat = f.stat()
            listing.append([f.relative_to(self.root).as_posix(), stat.st_size, stat.st_mtime_ns])
            # The status-change time and inode, which no copy or `touch` can set back: a file replaced by one of the
            # same size and modification time (`cp -p`, `rsync -t`, an unpacked archive) is decoded again.
            changes.append([stat.st_ino, stat.st_ctime_ns])
        self._changes = hashlib.sha256(json.dumps(changes, separators=(",", ":")).encode()).hexdigest()
        identity = {"decode_version": DECODE_VERSION, "resolution": self.resolution, "channels": self.channels,
                    "files": listing}
        if self.channels != 4 and self.background != "white":  # white: the caches written before the choice existed
            identity["background"] = self.background
        if shape is not None:
            identity["bucket"] = list(shape)
        key = hashlib.sha256(json.dumps(identity, separators=(",", ":")).encode()).hexdigest()
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", self.root.resolve().name) or "images"
        size = f"{self.resolution}px" if shape is None else f"{self.resolution}px-{format_shape(shape)}"
        return Path(cache_dir) / f"{name}-{size}-{self.channels}ch-{key[:16]}.safetensors", key

    def read_cache(self, path: Path, key: str, files: list[Path],
                   shape: tuple[int, int] | None = None) -> tuple[torch.Tensor, dict[int, str]] | None:
        """The cached images and unreadable files, or None (with a warning) if the file is not a valid cache."""
        h, w = shape or (self.resolution, self.resolution)
        try:
            tensors, meta = read_mapped(path)
            if meta.get("format") != CACHE_FORMAT or meta.get("key") != key:
                raise ValueError(f"not a cache for this folder (format {meta.get('format')!r})")
            if meta.get("changes") != self._changes:
                return None  # files were rewritten in place since: decoded again, as any first run is
            images, labels = tensors["images"], tensors.get("labels")
            rel = {f.relative_to(self.root).as_posix(): i for i, f in enumerate(files)}
            failed = {rel[name]: reason for name, reason in json.loads(meta["skipped"])}
            expected = (len(files) - len(failed), self.channels, h, w)
            if images.dtype != torch.uint8 or tuple(images.shape) != expected:
                raise ValueError(f"images are {images.dtype} {tuple(images.shape)}, expected uint8 {expected}")
            if json.loads(meta["class_names"]) != self.class_names or (labels is None) != (not self.class_names):
                raise ValueError("its classes differ from the folder's")
            if labels is not None and (labels.dtype != torch.int64 or tuple(labels.shape) != expected[:1]):
                raise ValueError(f"labels are {labels.dtype} {tuple(labels.shape)}, expected int64 {expected[:1]}")
        except Exception as e:  # a damaged cache is rebuilt, never trusted and never fatal
            warnings.warn(f"{path}: ignoring an unreadable image cache ({type(e).__name__}: {e}); decoding again",
                          stacklevel=3)
            return None
        return images, failed

    def decode_to_cache(self, files: list[Path], labels: list[int] | None, strict: bool, workers: int,
                        progress: bool, path: Path, key: str, shape: tuple[int, int] | None = None
                        ) -> tuple[torch.Tensor, dict[int, str]] | None:
        """Decode into a scratch memory map beside the cache, then write the readable rows into the cache file in
        chunks, and map it: memory stays bounded whatever the folder's size. None (with a warning) if the cache
        folder cannot be written: the caller decodes into memory instead."""
        c = self.channels
        h, w = shape or (self.resolution, self.resolution)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, scratch = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".decoding")
            os.close(fd)
        except OSError as e:
            warnings.warn(f"{path}: could not write the image cache ({e}); decoding into memory, and later runs "
                          "will decode again", stacklevel=3)
            return None
        try:
            raw = np.memmap(scratch, dtype=np.uint8, mode="w+", shape=(len(files), c, h, w))
            _, failed = self.decode(files, strict, workers, progress, out=raw, shape=shape)
            if strict or (len(failed) == len(files) and not self.bucketed):  # a bucket: the whole set is checked
                self.check_failures(files, failed, strict)
            keep = np.array([i for i in range(len(files)) if i not in failed], dtype=np.int64)
            skipped = [[files[i].relative_to(self.root).as_posix(), failed[i]] for i in sorted(failed)]
            metadata = {"format": CACHE_FORMAT, "key": key, "class_names": json.dumps(self.class_names),
                        "skipped": json.dumps(skipped), "root": str(self.root), "changes": self._changes}
            specs = {"images": (torch.uint8, (len(keep), c, h, w))}
            if labels is not None:
                specs["labels"] = (torch.int64, (len(keep),))

            def fill(views):
                rows = max(1, CHUNK_BYTES // (c * h * w))
                for start in range(0, len(keep), rows):
                    views["images"][start:start + rows] = raw[keep[start:start + rows]]
                if labels is not None:
                    views["labels"][:] = np.asarray(labels, dtype=np.int64)[keep]

            try:
                write_mapped(path, specs, fill, metadata)
            except OSError as e:  # disk full: the rows are in the scratch map; losing the cache costs time later
                warnings.warn(f"{path}: could not write the image cache ({e}); later runs will decode again",
                              stacklevel=3)
                return torch.from_numpy(np.array(raw[keep])), failed
        finally:
            Path(scratch).unlink(missing_ok=True)
        return read_mapped(path)[0]["images"], failed


def random_flips(batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """Horizontal-flip flags (bool, p = 0.5, on the generator's device), drawn from `generator` only so that a
    resumed run repeats them."""
    return torch.rand(batch_size, generator=generator, device=generator.device) < 0.5


class BatchSampler:
    """Infinite shuffled batches of indices for one rank, resumable exactly from `state_dict()`.

    Each epoch is torch's DistributedSampler(shuffle=True, seed=seed, drop_last=True) after set_epoch(epoch):
    every rank gets a disjoint share, served `batch_size` indices at a time (its part of the global batch);
    an incomplete final batch is dropped. Everything follows from (n, batch_size, seed, rank, world_size).

    With `groups` (each index's aspect-ratio bucket), a batch holds one group only: the epoch's order (the same
    permutation, or weighted draws) is split by group, each group cut into global batches (its incomplete last one
    dropped), and the global batches are shuffled (seeded by seed and epoch) and dealt out, every rank taking its
    rows of each: all ranks train on the same bucket at each step.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 weights: torch.Tensor | None = None, groups: torch.Tensor | None = None):
        check_field(isinstance(seed, int) and not isinstance(seed, bool), "seed", seed, "an integer", what="")
        for name, value, minimum in (("n", n, 1), ("batch_size", batch_size, 1), ("world_size", world_size, 1),
                                     ("rank", rank, 0)):
            check_int(value, name, minimum, what="")
        if rank >= world_size:
            raise EncdiffError(f"rank = {rank}: expected less than world_size = {world_size}")
        self.batch_size = batch_size
        self.sampler = DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                          drop_last=True)
        if weights is not None and (weights.shape != (n,) or not bool((weights >= 0).all()) or not weights.sum() > 0):
            raise EncdiffError(f"sampling weights: expected {n} non-negative numbers, not all zero")
        if groups is not None and (groups.shape != (n,) or groups.dtype != torch.int64 or bool((groups < 0).any())):
            raise EncdiffError(f"sampling groups: expected {n} non-negative integers (one bucket per image)")
        self.groups = None if groups is None or bool((groups == groups[0]).all()) else groups
        # With weights, an epoch is as many draws with replacement (from a generator seeded by seed and epoch, like
        # DistributedSampler's permutation), dealt to the ranks the way DistributedSampler deals its indices.
        self.weights, self.seed, self.rank, self.world_size = weights, seed, rank, world_size
        self.epoch = 0
        self.batch = 0
        self.order: torch.Tensor | None = None
        self.order_epoch = -1
        self.batches_per_epoch = len(self.sampler) // batch_size if self.groups is None else len(self.epoch_order(0))
        if self.batches_per_epoch == 0:
            too_small = "" if self.groups is None else " in any one aspect-ratio bucket"
            raise EncdiffError(f"the dataset has {count(n, 'image')}, fewer than one global batch of {batch_size * world_size} "
                               f"(batch_size {batch_size} x world_size {world_size}){too_small}")

    def __iter__(self) -> BatchSampler:
        return self

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """This rank's indices of `epoch`, in serving order: without groups a flat list (one batch after another),
        with groups (batches, batch_size)."""
        total = len(self.sampler) * self.world_size
        if self.weights is not None:
            g = torch.Generator().manual_seed(self.seed + epoch)
            draws = torch.multinomial(self.weights.double(), total, replacement=True, generator=g)
        elif self.groups is not None:
            # the global permutation DistributedSampler deals from (its own formula: seed + epoch)
            draws = torch.randperm(len(self.groups), generator=torch.Generator().manual_seed(self.seed + epoch))
        else:
            self.sampler.set_epoch(epoch)
            return torch.tensor(list(self.sampler), dtype=torch.int64)
        if self.groups is None:
            return draws[self.rank::self.world_size]
        size = self.batch_size * self.world_size
        batches = []
        for group in self.groups.unique().tolist():
            members = draws[self.groups[draws] == group]
            whole = len(members) // size * size
            batches.append(members[:whole].view(-1, size))
        batches = torch.cat(batches)
        # a second stream, so that the batch order does not repeat the permutation's draws
        shuffle = torch.randperm(len(batches), generator=torch.Generator().manual_seed((self.seed + epoch) * 2 + 1))
        return batches[shuffle][:, self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def __next__(self) -> torch.Tensor:
        if self.order_epoch != self.epoch:
            self.order = self.epoch_order(self.epoch)
            self.order_epoch = self.epoch
        if self.groups is None:
            start = self.batch * self.batch_size
            indices = self.order[start:start + self.batch_size]
        else:
            indices = self.order[self.batch]
        self.batch += 1
        # grouped and weighted, the number of whole batches varies from epoch to epoch
        if self.batch == (self.batches_per_epoch if self.groups is None else len(self.order)):
            self.epoch, self.batch = self.epoch + 1, 0
        return indices

    def state_dict(self) -> dict[str, int]:
        """The position of the next batch to serve."""
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a `state_dict()`: the batches served next are those the uninterrupted run served."""
        if not isinstance(state, dict):
            raise EncdiffError(f"sampler state: expected a dict with 'epoch' and 'batch', found {type(state).__name__}")
        check_int(state.get("epoch"), "epoch", 0, what="sampler state field")
        # the batch within the epoch: below the batches of that epoch
        per_epoch = self.batches_per_epoch if self.groups is None or self.weights is None else \
            len(self.epoch_order(state["epoch"]))
        check_int(state.get("batch"), "batch", 0, per_epoch - 1, what="sampler state field")
        self.epoch, self.batch = state["epoch"], state["batch"]
