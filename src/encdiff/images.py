"""Images in and out: one pixel convention (uint8 <-> float in [-1, 1]), files read with the training rule (any
mode, EXIF orientation, shorter side resized with Lanczos, centre crop), PNGs written, and grids.

Channels: 1 (grayscale), 3 (RGB) or 4 (RGBA, straight alpha). Read without alpha, a transparent image is composited
onto a background colour; read with it, fully transparent pixels are (0, 0, 0, 0) whatever colour the file stored
there (invisible, and a constant keeps a network from learning noise), and resizing is premultiplied (PIL), so no
colour bleeds in from transparent pixels.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageColor, ImageOps, UnidentifiedImageError

from .errors import EncdiffError, check_field, check_int

EXIF_ORIENTATION = 0x0112
MODES = {1: "L", 3: "RGB", 4: "RGBA"}  # the channel counts an image is read with, and their PIL modes
CHECKER = (204, 255)  # the two greys, and the square size below, that show transparency in grids
CHECKER_SQUARE = 4
# uint8 levels: a decoded alpha this close to 0 or 255 is written as exactly transparent or opaque (snap_alpha)
ALPHA_SNAP = 3


def to_unit(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [-1, 1]: x / 127.5 - 1, the range every network in encdiff takes."""
    return pixels.float() / 127.5 - 1


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float images nominally in [-1, 1] -> uint8 pixels (clamped, rounded), on the CPU; a batch of RGBA images
    (B, 4, H, W) has its alpha snapped (snap_alpha)."""
    pixels = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    return snap_alpha(pixels) if pixels.dim() == 4 and pixels.shape[1] == 4 else pixels


def snap_alpha(pixels: torch.Tensor, levels: int = ALPHA_SNAP) -> torch.Tensor:
    """uint8 RGBA images (B, 4, H, W) with every alpha within `levels` of 0 or 255 made exactly 0 or 255, and the
    colour of the pixels made transparent set to 0, as files are read (module docstring).

    Why: a decoder regresses alpha, so a background that should be transparent comes out at 1-3 rather than 0 where
    the output hovers just above zero (emoji64 samples: 8 % of all pixels at alpha 1-3, the data 0.6 %). Invisible
    on any background (at most 1.2 % of a colour), such a haze still makes a sprite's background "not transparent"
    to every tool that trims, masks or tests alpha > 0. Three levels change no visible pixel."""
    alpha = pixels[:, 3]
    snapped = torch.where(alpha <= levels, 0, torch.where(alpha >= 255 - levels, 255, alpha)).to(torch.uint8)
    colour = pixels[:, :3] * (snapped > 0).unsqueeze(1)
    return torch.cat([colour, snapped.unsqueeze(1)], dim=1)


class UnreadableImageError(EncdiffError):
    """A file that is not a decodable image; `reason` says why without repeating the path."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def check_image_args(resolution: int, channels: int) -> None:
    check_int(resolution, "resolution", 1, what="")
    check_field(channels in MODES and not isinstance(channels, bool), "channels", channels,
                "1 (grayscale), 3 (RGB) or 4 (RGBA)", what="")


def background_rgb(colour: str) -> tuple[int, int, int]:
    """A colour name or #rrggbb (PIL's names: "white", "black", "#808080", ...) as an RGB triple."""
    try:
        return ImageColor.getrgb(colour)[:3]
    except (ValueError, AttributeError, TypeError):
        raise EncdiffError(f"background = {colour!r}: expected a colour name or #rrggbb (white, black, #808080, ...)") \
            from None


def has_alpha(image: Image.Image) -> bool:
    """Whether an image carries transparency: an alpha band, or a palette/grayscale transparency entry."""
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def high_depth_to_8bit(image: Image.Image) -> Image.Image:
    """I;16*, I and F images as 8-bit grayscale, scaled rather than clipped at 255.

    I;16 spans 0..65535. I and F carry no range of their own, so the smallest usual range holding the
    image's values is taken: [0, 1] (F only), [0, 255], [0, 65535], else [0, the image's maximum].
    """
    values = np.nan_to_num(np.asarray(image).astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0).clip(min=0)
    if image.mode.startswith("I;16"):
        top = 65535.0
    else:
        peak = float(values.max(initial=0.0))
        top = next((t for t in (1.0, 255.0, 65535.0) if peak <= t and (t > 1.0 or image.mode == "F")), peak)
    return Image.fromarray(np.rint(values * (255.0 / top)).clip(0, 255).astype(np.uint8), "L")


def to_8bit(image: Image.Image, channels: int, background: str = "white") -> Image.Image:
    """Any PIL mode as "L", "RGB" or "RGBA" (MODES[channels]). Without an alpha channel, transparent pixels are
    composited onto `background`; with one, an opaque image gets alpha 255."""
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        image = high_depth_to_8bit(image)
    if channels == 4:
        return image.convert("RGBA")
    if has_alpha(image):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (*background_rgb(background), 255)), rgba)
    return image.convert(MODES[channels])


def upright(image: Image.Image) -> Image.Image:
    """The image as a viewer shows it (EXIF orientation applied); a damaged EXIF block leaves it as stored,
    since the pixels themselves are fine."""
    try:
        if image.getexif().get(EXIF_ORIENTATION, 1) != 1:
            return ImageOps.exif_transpose(image)
    except Exception:
        pass
    return image


def load_image(path: str | os.PathLike, resolution: int, channels: int = 3, background: str = "white",
               shape: tuple[int, int] | None = None) -> np.ndarray:
    """Decode an image file (its first frame) to uint8 (channels, resolution, resolution), or (channels, H, W) for
    a `shape` (H, W) (an aspect-ratio bucket).

    EXIF orientation is applied, any mode is converted (see `to_8bit`; `background` is the colour transparency is
    composited onto without alpha), the image is resized with Lanczos to cover the shape (the shorter side to
    `resolution` for a square; antialiased; no resampling when it already has that size), and the centre is cropped
    (an odd leftover pixel goes to the right or bottom). An unreadable file raises EncdiffError.
    """
    check_image_args(resolution, channels)
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise UnreadableImageError(path, "empty file (0 bytes)")
        # Everything that touches the file's bytes stays inside this try: a corrupt file can make any PIL
        # plugin raise any exception type. Truncated files fail in load() (LOAD_TRUNCATED_IMAGES stays off).
        with Image.open(path) as image:
            image.load()
            image = to_8bit(upright(image), channels, background)
    except EncdiffError:
        raise
    except UnidentifiedImageError:
        raise UnreadableImageError(path, "not an image (PIL cannot identify its format)") from None
    except Exception as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {e}"
        raise UnreadableImageError(path, f"not a readable image ({reason})") from None
    array = np.array(fit_shape(image, shape or (resolution, resolution)), dtype=np.uint8)
    if channels == 4:
        array[array[:, :, 3] == 0] = 0  # fully transparent: (0, 0, 0, 0), whatever colour the file kept there
    return np.ascontiguousarray(array[None] if channels == 1 else array.transpose(2, 0, 1))


def upright_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of an image as a viewer shows it (EXIF orientation applied), from its header alone; an
    unreadable file raises UnreadableImageError."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            width, height = image.size
            try:
                orientation = image.getexif().get(EXIF_ORIENTATION, 1)
            except Exception:  # a damaged EXIF block: the pixels are read as stored (see `upright`)
                orientation = 1
    except Exception as e:
        raise UnreadableImageError(path, f"not a readable image ({type(e).__name__}: {e})") from None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)  # 5-8 turn it a quarter


def fit(image: Image.Image, resolution: int, resample=Image.Resampling.LANCZOS) -> Image.Image:
    """The training rule for any image size: the shorter side resized to `resolution` (no resampling when it has
    that size already), then the centre cropped (an odd leftover pixel goes to the right or bottom)."""
    return fit_shape(image, (resolution, resolution), resample)


def fit_shape(image: Image.Image, shape: tuple[int, int], resample=Image.Resampling.LANCZOS) -> Image.Image:
    """`fit` for a (height, width) shape: resized (keeping its aspect ratio) to the smallest size covering the
    shape, then the centre cropped."""
    height, width = shape
    scale = max(width / image.size[0], height / image.size[1])
    size = (max(width, round(image.size[0] * scale)), max(height, round(image.size[1] * scale)))
    if size != image.size:
        image = image.resize(size, resample)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    return image.crop((left, top, left + width, top + height))


def image_grid(images: torch.Tensor, rows: int) -> torch.Tensor:
    """uint8 (B, C, H, W) -> one uint8 (C, rows*H, cols*W) grid, filled row by row."""
    B, C, H, W = images.shape
    cols = -(-B // rows)
    grid = torch.zeros(C, rows * H, cols * W, dtype=torch.uint8)
    for i in range(B):
        r, c = divmod(i, cols)
        grid[:, r * H:(r + 1) * H, c * W:(c + 1) * W] = images[i]
    return grid


def on_checkerboard(images: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 4, H, W) RGBA -> (..., 3, H, W) RGB over a grey checkerboard, the way image editors show
    transparency (for grids people look at); other channel counts are returned as they are."""
    if images.shape[-3] != 4:
        return images
    H, W = images.shape[-2:]
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    board = torch.where(((ys // CHECKER_SQUARE + xs // CHECKER_SQUARE) % 2) == 0, *[torch.tensor(float(v)) for v in CHECKER])
    rgb, alpha = images[..., :3, :, :].float(), images[..., 3:, :, :].float() / 255
    return (rgb * alpha + board * (1 - alpha)).round().to(torch.uint8)


def save_png(image: torch.Tensor, path: str | os.PathLike) -> None:
    """uint8 (C, H, W) with C = 1, 3 or 4 (RGBA, transparency kept) -> PNG file."""
    array = image.permute(1, 2, 0).numpy()
    Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(path)


def png_bytes(image: torch.Tensor) -> bytes:
    """uint8 (C, H, W) with C = 1, 3 or 4 -> the bytes of a PNG file."""
    array = image.permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(buffer, format="PNG")
    return buffer.getvalue()
