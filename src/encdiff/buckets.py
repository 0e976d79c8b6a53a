"""Aspect-ratio buckets: a few image shapes of about the same pixel count, so that a folder of non-square images
trains without cropping them all to squares (NovelAI's bucketing, as in kohya's sd-scripts). Each image goes to the
bucket nearest its aspect ratio and is resized to cover it, then centre-cropped (only what the aspect difference
leaves over); a batch is always drawn within one bucket, so the convolutional networks see one shape per step.

Shapes are (height, width) in code, as tensors hold them, and written "WxH" (width first) wherever a person reads or
types one, as image sizes usually are.
"""

from __future__ import annotations

import math
import re
from collections import Counter

from .errors import EncdiffError, check_int

MAX_ASPECT = 2.0  # the widest bucket of the rule: width / height (and height / width) at most 2


def format_shape(shape: tuple[int, int]) -> str:
    """(height, width) -> "WxH"."""
    return f"{shape[1]}x{shape[0]}"


def parse_shape(text: str, what: str = "size") -> tuple[int, int]:
    """"WxH" (e.g. "80x48") -> (height, width), with an error naming `what` for anything else."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(text))
    if not match or int(match[1]) < 1 or int(match[2]) < 1:
        raise EncdiffError(f"{what} {text!r}: expected WIDTHxHEIGHT in pixels, e.g. 64x48")
    return int(match[2]), int(match[1])


def bucket_shapes(resolution: int, multiple: int, max_aspect: float = MAX_ASPECT) -> list[tuple[int, int]]:
    """The rule's buckets for a training `resolution`: for every width that is a multiple of `multiple`, the tallest
    height (a multiple too) whose area is at most resolution^2, kept while the aspect ratio stays within
    1/max_aspect .. max_aspect; one shape per aspect ratio. The square resolution x resolution is always one
    (when it is a multiple). Sorted from the tallest to the widest."""
    check_int(resolution, "resolution", 1, what="")
    check_int(multiple, "bucket multiple", 1, what="")
    area = resolution * resolution
    shapes = set()
    for width in range(multiple, int(resolution * max_aspect) + 1, multiple):
        height = area // width // multiple * multiple
        if height >= multiple and 1 / max_aspect <= width / height <= max_aspect:
            shapes.add((height, width))
    # two widths can give the same aspect ratio only as multiples of one another; keep the larger area
    best: dict[float, tuple[int, int]] = {}
    for shape in shapes:
        ratio = round(shape[1] / shape[0], 6)
        if ratio not in best or shape[0] * shape[1] > best[ratio][0] * best[ratio][1]:
            best[ratio] = shape
    return sorted(best.values(), key=lambda s: s[1] / s[0])


def nearest_bucket(width: int, height: int, shapes: list[tuple[int, int]]) -> int:
    """The index of the shape nearest an image's aspect ratio (in log ratio, so 2:1 and 1:2 are as far from 1:1);
    a tie goes to the first."""
    ratio = math.log(width / height)
    return min(range(len(shapes)), key=lambda i: abs(math.log(shapes[i][1] / shapes[i][0]) - ratio))


def assign_buckets(sizes: list[tuple[int, int]], shapes: list[tuple[int, int]],
                   min_images: int = 1) -> tuple[list[tuple[int, int]], list[int]]:
    """Each image's bucket, given the images' (width, height): returns the shapes in use and, per image, its index
    among them. A bucket with fewer than `min_images` images (fewer than a batch: it would never be drawn whole) is
    dropped, the smallest first, and its images go to the nearest bucket left; the most populous one always stays."""
    if not shapes:
        raise EncdiffError("no bucket shapes given")
    if len(set(shapes)) != len(shapes):
        raise EncdiffError(f"bucket shapes repeat: {', '.join(format_shape(s) for s in shapes)}")
    kept = list(shapes)
    while True:
        chosen = [nearest_bucket(w, h, kept) for w, h in sizes]
        counts = Counter(chosen)
        small = [i for i in range(len(kept)) if counts[i] < min_images]
        if not small or len(kept) == 1:
            break
        # the emptiest first; one at a time, as its images may lift a neighbour above the threshold
        del kept[min(small, key=lambda i: (counts[i], i))]
    used = sorted(set(chosen))
    renumber = {old: new for new, old in enumerate(used)}
    return [kept[i] for i in used], [renumber[i] for i in chosen]


def resolve_buckets(spec: tuple[str, ...] | list[str], resolution: int, factor: int) -> list[tuple[int, int]] | None:
    """A config's `buckets` as shapes: None for none (centre-cropped squares), the rule's for ["auto"] (sides
    multiples of twice the autoencoder's downsampling `factor`, so latents have even sides), else the listed "WxH"
    shapes, each side a multiple of `factor`."""
    if not spec:
        return None
    if list(spec) == ["auto"]:
        return bucket_shapes(resolution, 2 * factor)
    shapes = [parse_shape(text, "bucket") for text in spec]
    for text, (height, width) in zip(spec, shapes):
        if height % factor or width % factor:
            raise EncdiffError(f"bucket {text}: its sides must be multiples of the autoencoder's downsampling "
                               f"factor {factor}")
    if len(set(shapes)) != len(shapes):
        raise EncdiffError(f"buckets {', '.join(spec)}: a shape is listed twice")
    return shapes
