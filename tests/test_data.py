"""Image folders: scanning, decoding of every format and PIL mode, resize and centre crop, unreadable files,
the on-disk cache, parallel decoding, batches with flips, and the resumable per-rank batch sampler. Images are
made here with PIL; one test reads a seeded subset of the CIFAR-10 copy in ../shared/data when it is there."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from torch.utils.data import DistributedSampler

import encdiff.data as data
from encdiff import EncdiffError
from conftest import extract_cifar_subset, extract_emoji, needs_cifar, needs_emoji
from encdiff.data import IMAGE_EXTENSIONS, BatchSampler, ImageDataset, random_flips, scan_folder
from encdiff.images import ALPHA_SNAP, load_image, on_checkerboard, png_bytes, to_uint8

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def save(path: Path, image: Image.Image, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def solid(path: Path, color, size=(8, 8), mode="RGB", **kwargs) -> Path:
    return save(path, Image.new(mode, size, color), **kwargs)


def broken_files(folder: Path) -> list[Path]:
    """A zero-byte PNG, a truncated JPEG, a text file named .png and random bytes named .gif (sorted)."""
    folder.mkdir(parents=True, exist_ok=True)
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "JPEG")
    files = {"a_empty.png": b"", "b_truncated.jpg": buffer.getvalue()[: buffer.tell() // 2],
             "c_text.png": b"not an image\n", "d_noise.gif": bytes(range(256)) * 4}
    for name, content in files.items():
        (folder / name).write_bytes(content)
    return [folder / name for name in files]


def quiet_dataset(*args, **kwargs) -> ImageDataset:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning is expected: fail loudly if one appears
        return ImageDataset(*args, progress=False, **kwargs)


# ----------------------------------------------------------------------------------------------- scanning


def test_image_extensions():
    assert IMAGE_EXTENSIONS == {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"}


def test_scan_flat_folder_ignores_other_and_hidden_files(tmp_path):
    for name in ["b.png", "a.JPG", "c.jpeg", "d.webp", "e.BMP", "f.gif"]:
        solid(tmp_path / name, (1, 2, 3), format={".jpg": "JPEG", ".jpeg": "JPEG"}.get(Path(name).suffix.lower()))
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / ".DS_Store").write_bytes(b"\0")
    solid(tmp_path / "._b.png", (0, 0, 0))  # macOS resource fork: hidden
    (tmp_path / "empty_subfolder").mkdir()
    files, labels, classes = scan_folder(tmp_path)
    assert [f.name for f in files] == ["a.JPG", "b.png", "c.jpeg", "d.webp", "e.BMP", "f.gif"]
    assert labels is None and classes == []


def test_scan_class_folders(tmp_path):
    solid(tmp_path / "dog" / "2.png", 0)
    solid(tmp_path / "dog" / "10.png", 0)
    solid(tmp_path / "cat" / "z.png", 0)
    solid(tmp_path / "cat" / "nested" / "a.png", 0)  # class folders are searched at any depth
    solid(tmp_path / ".hidden_class" / "x.png", 0)
    solid(tmp_path / "dog" / ".ipynb_checkpoints" / "x.png", 0)
    (tmp_path / "no_images").mkdir()
    (tmp_path / "no_images" / "readme.txt").write_text("x")
    (tmp_path / "LICENSE").write_text("x")
    files, labels, classes = scan_folder(tmp_path)
    assert classes == ["cat", "dog"]
    assert [f.relative_to(tmp_path).as_posix() for f in files] == ["cat/nested/a.png", "cat/z.png", "dog/10.png",
                                                                   "dog/2.png"]
    assert labels == [0, 0, 1, 1]


def test_scan_errors_name_the_path(tmp_path):
    with pytest.raises(EncdiffError, match="missing.*not found"):
        scan_folder(tmp_path / "missing")
    with pytest.raises(EncdiffError, match="not a folder"):
        scan_folder(solid(tmp_path / "file.png", 0))
    (tmp_path / "empty").mkdir()
    with pytest.raises(EncdiffError, match="empty: no image files"):
        scan_folder(tmp_path / "empty")
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("x")
    with pytest.raises(EncdiffError, match="text: no image files"):
        scan_folder(tmp_path / "text")
    solid(tmp_path / "mixed" / "cat" / "a.png", 0)
    solid(tmp_path / "mixed" / "stray.png", 0)
    with pytest.raises(EncdiffError, match=r"stray\.png: image file next to class subfolders \(cat\)"):
        scan_folder(tmp_path / "mixed")


# ----------------------------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("ext,kwargs,tolerance", [(".png", {}, 0), (".bmp", {}, 0), (".gif", {}, 0),
                                                  (".webp", {"lossless": True}, 0), (".jpg", {"quality": 95}, 3),
                                                  (".jpeg", {"quality": 95}, 3)])
def test_formats(tmp_path, ext, kwargs, tolerance):
    # Two halves of pure colours (a GIF palette holds them exactly).
    pixels = np.zeros((8, 8, 3), dtype=np.uint8)
    pixels[:, :4] = (200, 40, 10)
    pixels[:, 4:] = (0, 90, 255)
    path = save(tmp_path / f"image{ext}", Image.fromarray(pixels), **kwargs)
    out = load_image(path, 8)
    assert out.dtype == np.uint8 and out.shape == (3, 8, 8) and out.flags.c_contiguous
    expected = pixels.transpose(2, 0, 1).astype(int)
    # JPEG blurs the colour edge (4:2:0 chroma): compare away from it.
    cols = [0, 1, 6, 7] if tolerance else list(range(8))
    assert np.abs(out[:, :, cols].astype(int) - expected[:, :, cols]).max() <= tolerance


def mode_image(mode: str) -> tuple[Image.Image, str, tuple[int, int, int], tuple[int, int, int]]:
    """An 8x8 image in `mode` whose left half and right half have known RGB values after decoding, and the
    file suffix that stores it (TIFF for I, F and CMYK: load_image decodes any file PIL can read)."""
    left, right = np.zeros((8, 4), dtype=np.float64), np.zeros((8, 4), dtype=np.float64)
    if mode in ("L", "1"):
        image = Image.new(mode, (8, 8), 0)
        image.paste(255 if mode == "1" else 100, (0, 0, 4, 8))
        return image, ".png", (255, 255, 255) if mode == "1" else (100, 100, 100), (0, 0, 0)
    if mode == "LA":  # opaque grey | fully transparent (white) ... composited on white
        image = Image.new("LA", (8, 8), (30, 0))
        image.paste((100, 255), (0, 0, 4, 8))
        return image, ".png", (100, 100, 100), (255, 255, 255)
    if mode in ("P", "P+transparency"):
        image = Image.new("P", (8, 8), 1)
        image.putpalette([200, 40, 10, 0, 90, 255] + [0] * 762)
        image.paste(0, (0, 0, 4, 8))
        if mode == "P":
            return image, ".png", (200, 40, 10), (0, 90, 255)
        image.info["transparency"] = 1
        return image, ".gif", (200, 40, 10), (255, 255, 255)
    if mode == "RGB":
        image = Image.new("RGB", (8, 8), (0, 90, 255))
        image.paste((200, 40, 10), (0, 0, 4, 8))
        return image, ".png", (200, 40, 10), (0, 90, 255)
    if mode == "RGBA":  # opaque | half transparent (blended with white)
        image = Image.new("RGBA", (8, 8), (0, 90, 254, 128))
        image.paste((200, 40, 10, 255), (0, 0, 4, 8))
        blend = tuple(round((v * 128 + 255 * 127) / 255) for v in (0, 90, 254))
        return image, ".png", (200, 40, 10), blend
    if mode == "CMYK":  # full magenta | full cyan
        image = Image.new("CMYK", (8, 8), (255, 0, 0, 0))
        image.paste((0, 255, 0, 0), (0, 0, 4, 8))
        return image, ".tiff", (255, 0, 255), (0, 255, 255)
    # High bit depths: scaled to 8 bits, never clipped at 255.
    left[:], right[:] = {"I;16": (257 * 200, 65535), "I": (257 * 200, 30000), "F": (0.5, 1.0),
                         "F>1": (100.0, 250.0)}[mode]
    values = np.concatenate([left, right], axis=1)
    if mode == "I;16":
        image = Image.fromarray(values.astype(np.uint16))
        suffix = ".png"
    else:
        image = Image.fromarray(values.astype(np.int32 if mode == "I" else np.float32))
        suffix = ".tiff"
    expected = {"I;16": (200, 255), "I": (200, round(30000 / 257)), "F": (128, 255), "F>1": (100, 250)}[mode]
    return image, suffix, (expected[0],) * 3, (expected[1],) * 3


MODES = ["L", "LA", "P", "P+transparency", "RGB", "RGBA", "I;16", "I", "F", "F>1", "1", "CMYK"]


@pytest.mark.parametrize("mode", MODES)
def test_modes_to_rgb(tmp_path, mode):
    image, suffix, left, right = mode_image(mode)
    path = save(tmp_path / f"image{suffix}", image)
    with Image.open(path) as reread:
        assert reread.mode == image.mode  # the file really holds this mode
    out = load_image(path, 8).astype(int)
    assert (np.abs(out[:, :, :4] - np.array(left)[:, None, None]) <= 1).all(), out[:, 0, 0]
    assert (np.abs(out[:, :, 4:] - np.array(right)[:, None, None]) <= 1).all(), out[:, 0, 7]


@pytest.mark.parametrize("mode", MODES)
def test_modes_to_grayscale(tmp_path, mode):
    image, suffix, left, right = mode_image(mode)
    path = save(tmp_path / f"image{suffix}", image)
    out = load_image(path, 8, channels=1).astype(int)
    assert out.shape == (1, 8, 8)
    luma = [round((299 * c[0] + 587 * c[1] + 114 * c[2]) / 1000) for c in (left, right)]
    assert (np.abs(out[0, :, :4] - luma[0]) <= 1).all() and (np.abs(out[0, :, 4:] - luma[1]) <= 1).all()


def transparent_image(mode: str) -> Image.Image:
    """Left half opaque red, right half fully transparent (its colour junk: green), in an RGBA-capable mode."""
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[:, :4] = (255, 0, 0, 255)
    rgba[:, 4:] = (0, 255, 0, 0)
    image = Image.fromarray(rgba, "RGBA")
    if mode == "LA":
        return image.convert("LA")
    if mode == "P+transparency":  # a palette PNG whose transparent pixels are one palette index
        palette = Image.new("P", (8, 8))
        palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
        palette.putdata([0 if x < 4 else 1 for _ in range(8) for x in range(8)])
        palette.info["transparency"] = 1
        return palette
    return image


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P+transparency"])
def test_transparency_is_kept_as_a_fourth_channel_and_transparent_pixels_are_cleared(tmp_path, mode):
    path = save(tmp_path / "icon.png", transparent_image(mode), **({"transparency": 1} if mode == "P+transparency" else {}))
    out = load_image(path, 8, channels=4).astype(int)
    assert out.shape == (4, 8, 8)
    left = (255, 0, 0, 255) if mode != "LA" else (76, 76, 76, 255)  # LA keeps red's luma
    assert (np.abs(out[:, :, :4] - np.array(left)[:, None, None]) <= 1).all(), out[:, 0, 0]
    assert (out[:, :, 4:] == 0).all(), out[:, 0, 7]  # (0, 0, 0, 0): the stored green is gone


def test_transparency_is_composited_onto_the_background_without_alpha(tmp_path):
    path = save(tmp_path / "icon.png", transparent_image("RGBA"))
    assert (load_image(path, 8)[:, :, 4:] == 255).all()  # white by default
    black = load_image(path, 8, background="black")
    assert (black[:, :, 4:] == 0).all() and (black[:, :, :4] == np.array([255, 0, 0])[:, None, None]).all()
    with pytest.raises(EncdiffError, match="background = 'sky'"):
        load_image(path, 8, background="sky")


def test_an_opaque_image_read_with_alpha_is_fully_opaque_and_resizing_does_not_bleed_colour(tmp_path):
    assert (load_image(solid(tmp_path / "a.jpg", (10, 200, 30)), 8, channels=4)[3] == 255).all()
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[:, :8] = (0, 0, 255, 255)
    rgba[:, 8:] = (255, 255, 0, 0)  # transparent yellow: must not tint the blue edge when downscaled
    out = load_image(save(tmp_path / "edge.png", Image.fromarray(rgba, "RGBA")), 8, channels=4).astype(int)
    visible = out[3] > 0
    assert (out[0][visible] <= 1).all() and (out[1][visible] <= 1).all()


def test_rgba_folders_decode_to_four_channels_and_are_cached_apart_from_the_composited_ones(tmp_path):
    for i in range(3):
        save(tmp_path / "data" / f"{i}.png", transparent_image("RGBA"))
    rgba = quiet_dataset(tmp_path / "data", 8, channels=4, cache_dir=tmp_path / "cache")
    grey = quiet_dataset(tmp_path / "data", 8, channels=3, cache_dir=tmp_path / "cache", background="#808080")
    white = quiet_dataset(tmp_path / "data", 8, channels=3, cache_dir=tmp_path / "cache")
    assert rgba.images.shape == (3, 4, 8, 8) and (rgba.images[:, 3, :, 4:] == 0).all()
    assert (grey.images[:, :, :, 4:] == 128).all() and (white.images[:, :, :, 4:] == 255).all()
    assert len(list((tmp_path / "cache").iterdir())) == 3


def test_grids_show_transparency_on_a_checkerboard_and_pngs_keep_it():
    image = torch.zeros(4, 8, 8, dtype=torch.uint8)
    image[:, :, :4] = torch.tensor([255, 0, 0, 255]).view(4, 1, 1)
    shown = on_checkerboard(image)
    assert shown.shape == (3, 8, 8) and (shown[:, :, :4] == torch.tensor([255, 0, 0]).view(3, 1, 1)).all()
    assert set(shown[0, :, 4:].unique().tolist()) == {204, 255}  # the two squares' greys
    assert torch.equal(on_checkerboard(image[:3]), image[:3])
    with Image.open(io.BytesIO(png_bytes(image))) as reread:
        assert reread.mode == "RGBA" and reread.getpixel((6, 0)) == (0, 0, 0, 0)


def test_decoded_rgba_alpha_near_transparent_or_opaque_is_written_exactly_so():
    """A decoder's alpha haze (1-3 over a transparent background) is written as 0 with a cleared colour, as files
    are read; anything further from 0 or 255 (an anti-aliased edge) and every colour channel stay as rounded."""
    levels = torch.arange(256, dtype=torch.float32)
    decoded = torch.stack([levels.flip(0), levels, torch.full_like(levels, 200), levels]).view(1, 4, 16, 16)
    out = to_uint8(decoded / 127.5 - 1)
    alpha, colour = out[0, 3].flatten(), out[0, :3].flatten(1)
    expected = levels.to(torch.uint8).clone()
    expected[:ALPHA_SNAP + 1], expected[255 - ALPHA_SNAP:] = 0, 255
    assert torch.equal(alpha, expected)
    cleared = alpha == 0
    assert (colour[:, cleared] == 0).all()
    assert torch.equal(colour[:, ~cleared], decoded[0, :3].flatten(1)[:, ~cleared].to(torch.uint8))
    # RGB, grayscale and a single image (C, H, W) are not touched
    assert torch.equal(to_uint8(decoded[:, :3] / 127.5 - 1), decoded[:, :3].to(torch.uint8))
    assert torch.equal(to_uint8(decoded[0] / 127.5 - 1), decoded[0].to(torch.uint8))


@needs_emoji
def test_emoji64_files_read_with_transparent_backgrounds(tmp_path):
    paths = extract_emoji(tmp_path / "emoji", 12)
    dataset = quiet_dataset(tmp_path / "emoji", 64, channels=4)
    alpha = dataset.images[:, 3].float()
    assert dataset.images.shape == (12, 4, 64, 64) and len(paths) == 12
    # every emoji has a transparent surround and an opaque body; what is fully transparent holds no colour
    assert ((alpha == 0).float().mean((1, 2)) > 0.05).all() and ((alpha == 255).float().mean((1, 2)) > 0.1).all()
    assert (dataset.images[:, :3].permute(1, 0, 2, 3)[:, alpha == 0] == 0).all()


def test_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), color) for color in [(255, 0, 0), (0, 0, 255), (0, 255, 0)]]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    with Image.open(path) as reread:
        assert reread.n_frames == 3
    assert (load_image(path, 8)[:, 3, 3] == [255, 0, 0]).all()


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("L", (12, 8), 0)
    image.paste(255, (0, 0, 4, 8))  # white left strip of a landscape image
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    out = load_image(save(tmp_path / "rotated.jpg", image, exif=exif, quality=95), 8, channels=1)
    # Displayed as an 8x12 portrait with the strip on top; the centre crop keeps rows 2..9: the strip's last 2.
    assert out[0, :2].min() > 200 and out[0, 3:].max() < 50


def test_center_crop_without_resize(tmp_path):
    rows = np.repeat((np.arange(12) * 20)[:, None], 8, axis=1).astype(np.uint8)  # 8 wide, 12 tall: row r = 20r
    out = load_image(save(tmp_path / "tall.png", Image.fromarray(rows)), 8, channels=1)
    assert (out[0] == rows[2:10]).all()  # shorter side already 8: no resampling, rows 2..9 kept
    out = load_image(save(tmp_path / "wide.png", Image.fromarray(rows.T.copy())), 8, channels=1)
    assert (out[0] == rows.T[:, 2:10]).all()
    odd = rows[:11]  # 3 rows too many: the extra one is cut at the bottom
    out = load_image(save(tmp_path / "odd.png", Image.fromarray(odd)), 8, channels=1)
    assert (out[0] == odd[1:9]).all()


@pytest.mark.parametrize("transpose", [False, True])
def test_resize_shorter_side_then_center_crop(tmp_path, transpose):
    # A linear ramp along the long side survives Lanczos resampling exactly away from the borders, so each output
    # pixel's value tells which source position it came from: that checks the scale and the crop offset.
    x = np.arange(64, dtype=np.float64)
    ramp = np.repeat((3 * x + 10)[None, :], 16, axis=0)  # 64 wide, 16 tall
    source = ramp.T if transpose else ramp
    out = load_image(save(tmp_path / "ramp.png", Image.fromarray(source.astype(np.uint8))), 8, channels=1)[0]
    out = out.T if transpose else out
    # Shorter side 16 -> 8 (scale 2): 32 x 8, crop columns 12..19, whose centres sit at source x = 2(j + 12) + 0.5.
    expected = 3 * (2 * (np.arange(8) + 12) + 0.5) + 10
    assert np.abs(out.astype(float) - expected[None, :]).max() <= 1


def test_resize_is_antialiased_and_upscales(tmp_path):
    checkerboard = (np.indices((64, 96)).sum(axis=0) % 2 * 255).astype(np.uint8)
    out = load_image(save(tmp_path / "checker.png", Image.fromarray(checkerboard)), 8, channels=1)
    assert out.shape == (1, 8, 8) and np.abs(out.astype(int) - 128).max() <= 8  # no aliasing into black/white
    small = load_image(solid(tmp_path / "small.png", (10, 200, 30), size=(3, 5)), 16)
    assert small.shape == (3, 16, 16) and (small[:, 8, 8] == [10, 200, 30]).all()


def test_unreadable_files_raise_naming_them(tmp_path):
    for path in broken_files(tmp_path):
        with pytest.raises(EncdiffError, match=path.name):
            load_image(path, 8)
    with pytest.raises(EncdiffError, match="a_empty.png: empty file"):
        load_image(tmp_path / "a_empty.png", 8)
    with pytest.raises(EncdiffError, match="truncated"):
        load_image(tmp_path / "b_truncated.jpg", 8)
    with pytest.raises(EncdiffError, match="channels = 2"):
        load_image(solid(tmp_path / "ok.png", 0), 8, channels=2)
    with pytest.raises(EncdiffError, match="resolution = 0"):
        load_image(tmp_path / "ok.png", 0)


# ------------------------------------------------------------------------------------------------ dataset


def test_flat_dataset(tmp_path):
    solid(tmp_path / "b.png", (0, 0, 255))
    solid(tmp_path / "a.png", (255, 0, 0), size=(16, 8))
    ds = quiet_dataset(tmp_path, 4, workers=0)
    assert len(ds) == 2 and ds.images.dtype == torch.uint8 and ds.images.shape == (2, 3, 4, 4)
    assert ds.labels is None and ds.class_names == [] and ds.num_classes == 0 and ds.skipped == []
    assert ds.images[0, :, 0, 0].tolist() == [255, 0, 0] and ds.images[1, :, 0, 0].tolist() == [0, 0, 255]
    gray = quiet_dataset(tmp_path, 4, channels=1, workers=0)
    assert gray.images.shape == (2, 1, 4, 4)


def test_class_dataset_labels_follow_sorted_class_names(tmp_path):
    colors = {"zebra": (0, 0, 0), "ant": (255, 255, 255), "moth": (100, 100, 100)}
    for name, color in colors.items():
        for i in range(2):
            solid(tmp_path / name / f"{i}.png", color)
    ds = quiet_dataset(tmp_path, 4, workers=0)
    assert ds.class_names == ["ant", "moth", "zebra"] and ds.num_classes == 3
    assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == [0, 0, 1, 1, 2, 2]
    for image, label in zip(ds.images, ds.labels):
        assert image[:, 0, 0].tolist() == list(colors[ds.class_names[label]])


def test_unreadable_files_are_skipped_with_one_warning(tmp_path):
    broken = broken_files(tmp_path / "cat")
    solid(tmp_path / "cat" / "ok.png", (1, 2, 3))
    solid(tmp_path / "dog" / "ok.png", (4, 5, 6))
    with pytest.warns(UserWarning) as record:
        ds = ImageDataset(tmp_path, 4, workers=0, progress=False)
    assert len(record) == 1
    message = str(record[0].message)
    assert "skipped 4 unreadable image files of 6" in message
    assert all(path.name in message for path in broken)
    assert ds.skipped == broken
    assert len(ds) == 2 and ds.labels.tolist() == [0, 1] and ds.images[:, :, 0, 0].tolist() == [[1, 2, 3], [4, 5, 6]]
    with pytest.raises(EncdiffError, match="a_empty.png: empty file.*strict"):
        ImageDataset(tmp_path, 4, strict=True, workers=0, progress=False)


def test_warning_lists_at_most_ten_files(tmp_path):
    for i in range(12):
        (tmp_path / f"{i:02d}.png").write_bytes(b"junk")
    solid(tmp_path / "ok.png", 0)
    with pytest.warns(UserWarning, match=r"skipped 12 .*09\.png \(not an image.*\); and 2 more$") as record:
        ImageDataset(tmp_path, 4, workers=0, progress=False)
    assert "10.png" not in str(record[0].message)


def test_folder_without_readable_images_is_an_error(tmp_path):
    broken_files(tmp_path / "broken")
    with pytest.raises(EncdiffError, match="broken: no readable images among its 4 image file"):
        ImageDataset(tmp_path / "broken", 4, workers=0, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(EncdiffError, match="empty: no image files"):
        ImageDataset(tmp_path / "empty", 4, progress=False)


def test_workers_give_identical_results(tmp_path):
    rng = np.random.default_rng(1)
    for i in range(13):
        pixels = rng.integers(0, 256, (rng.integers(6, 20), rng.integers(6, 20), 3), dtype=np.uint8)
        save(tmp_path / f"c{i % 3}" / f"{i}.png", Image.fromarray(pixels))
    (tmp_path / "c1" / "broken.png").write_bytes(b"junk")
    results = []
    for workers in (1, 2):
        with pytest.warns(UserWarning, match="broken.png"):
            results.append(ImageDataset(tmp_path, 8, workers=workers, progress=False))
    one, two = results
    assert torch.equal(one.images, two.images) and torch.equal(one.labels, two.labels)
    assert one.skipped == two.skipped == [tmp_path / "c1" / "broken.png"]
    with pytest.raises(EncdiffError, match="broken.png"):
        ImageDataset(tmp_path, 8, strict=True, workers=2, progress=False)


def test_cache_is_loaded_without_decoding_and_invalidated_by_a_change(tmp_path, monkeypatch):
    folder, cache = tmp_path / "images", tmp_path / "cache"
    for i, name in enumerate(["a", "b"]):
        solid(folder / name / "0.png", (i, 2, 3), size=(10, 12))
    (folder / "b" / "junk.png").write_bytes(b"junk")
    with pytest.warns(UserWarning, match="junk.png"):
        first = ImageDataset(folder, 8, cache_dir=cache, workers=0, progress=False)
    [cache_file] = cache.iterdir()
    assert cache_file.suffix == ".safetensors"
    with safe_open(str(cache_file), framework="pt") as f:
        assert set(f.keys()) == {"images", "labels"} and f.get_tensor("images").dtype == torch.uint8

    def refuse(*args, **kwargs):
        raise AssertionError("decoded although the cache is valid")

    monkeypatch.setattr(data, "load_image", refuse)
    with pytest.warns(UserWarning, match="junk.png"):  # the cached set still reports what it skipped
        cached = ImageDataset(folder, 8, cache_dir=cache, workers=0, progress=False)
    assert torch.equal(cached.images, first.images) and torch.equal(cached.labels, first.labels)
    assert cached.skipped == first.skipped and cached.class_names == ["a", "b"]
    with pytest.raises(EncdiffError, match="junk.png.*strict"):
        ImageDataset(folder, 8, strict=True, cache_dir=cache, workers=0, progress=False)
    with pytest.raises(AssertionError, match="decoded"):  # another resolution is another cache entry
        ImageDataset(folder, 4, cache_dir=cache, workers=0, progress=False)

    monkeypatch.undo()
    solid(folder / "a" / "0.png", (250, 2, 3), size=(10, 12))
    stat = (folder / "a" / "0.png").stat()
    os.utime(folder / "a" / "0.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.warns(UserWarning, match="junk.png"):
        changed = ImageDataset(folder, 8, cache_dir=cache, workers=0, progress=False)
    assert changed.images[0, 0, 0, 0] == 250 and len(list(cache.glob("*.safetensors"))) == 2


def test_damaged_cache_is_rebuilt(tmp_path):
    solid(tmp_path / "images" / "a.png", (9, 8, 7))
    cache = tmp_path / "cache"
    # cloned: a dataset maps its cache file, and this damage is done in place (encdiff only ever replaces files)
    first = quiet_dataset(tmp_path / "images", 4, cache_dir=cache, workers=0).images.clone()
    [cache_file] = cache.iterdir()
    cache_file.write_bytes(cache_file.read_bytes()[:50])
    with pytest.warns(UserWarning, match="ignoring an unreadable image cache"):
        again = ImageDataset(tmp_path / "images", 4, cache_dir=cache, workers=0, progress=False)
    assert torch.equal(again.images, first)
    assert quiet_dataset(tmp_path / "images", 4, cache_dir=cache, workers=0).images.equal(first)  # rewritten


def test_batch_values_labels_and_flips(tmp_path):
    pixels = np.arange(3 * 4 * 4, dtype=np.uint8).reshape(4, 4, 3) * 5
    save(tmp_path / "x" / "0.png", Image.fromarray(pixels))
    solid(tmp_path / "y" / "0.png", (255, 0, 127), size=(4, 4))
    ds = quiet_dataset(tmp_path, 4, workers=0)
    x, y = ds.batch(torch.tensor([0, 1, 0]), torch.tensor([False, False, True]))
    assert x.dtype == torch.float32 and x.shape == (3, 3, 4, 4) and y.tolist() == [0, 1, 0]
    expected = torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.equal(x[0], expected) and torch.equal(x[2], expected.flip(-1))
    assert torch.equal(x[1, :, 0, 0], torch.tensor([255.0, 0.0, 127.0]) / 127.5 - 1)
    assert x[1, :2, 0, 0].tolist() == [1.0, -1.0]
    assert torch.equal(ds.batch(torch.tensor([0]))[0][0], expected)
    assert ds.images[0].equal(torch.from_numpy(pixels).permute(2, 0, 1))  # the stored images are untouched
    flat = quiet_dataset(tmp_path / "x", 4, workers=0)
    assert flat.batch(torch.tensor([0]))[1] is None


def test_random_flips_come_from_the_generator():
    flips = random_flips(10_000, torch.Generator().manual_seed(0))
    assert flips.dtype == torch.bool and flips.shape == (10_000,) and 4800 < flips.sum() < 5200
    assert torch.equal(flips, random_flips(10_000, torch.Generator().manual_seed(0)))
    assert not torch.equal(flips, random_flips(10_000, torch.Generator().manual_seed(1)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the trainer's generators live there)")
def test_flips_from_a_cuda_generator(tmp_path):
    solid(tmp_path / "a.png", (10, 20, 30))
    ds = quiet_dataset(tmp_path, 4, workers=0)
    flips = random_flips(4, torch.Generator("cuda").manual_seed(0))
    assert flips.device.type == "cuda"
    x, _ = ds.batch(torch.zeros(4, dtype=torch.int64), flips)
    assert x.shape == (4, 3, 4, 4)


# ------------------------------------------------------------------------------------------------ sampler


def take(sampler, count: int) -> list[list[int]]:
    return [next(sampler).tolist() for _ in range(count)]


def test_sampler_serves_every_index_once_per_epoch_and_reshuffles():
    sampler = BatchSampler(24, 4, seed=3)
    assert sampler.batches_per_epoch == 6
    epochs = [take(sampler, 6) for _ in range(3)]
    for batches in epochs:
        assert all(len(b) == 4 for b in batches) and sorted(sum(batches, [])) == list(range(24))
    assert epochs[0] != epochs[1] != epochs[2]
    assert sampler.state_dict() == {"epoch": 3, "batch": 0}
    assert take(BatchSampler(24, 4, seed=3), 18) == sum(epochs, [])  # deterministic
    assert take(BatchSampler(24, 4, seed=4), 6) != epochs[0]
    reference = DistributedSampler(range(24), num_replicas=1, rank=0, shuffle=True, seed=3, drop_last=True)
    reference.set_epoch(1)
    assert sum(epochs[1], []) == list(reference)


def test_sampler_drops_the_incomplete_final_batch():
    sampler = BatchSampler(10, 4, seed=0)
    assert sampler.batches_per_epoch == 2
    for _ in range(3):
        indices = sum(take(sampler, 2), [])
        assert len(set(indices)) == 8
    with pytest.raises(EncdiffError, match="10 images, fewer than one global batch of 12"):
        BatchSampler(10, 6, seed=0, world_size=2)


def test_sampler_ranks_split_the_global_batch():
    world = [BatchSampler(48, 4, seed=7, rank=r, world_size=3) for r in range(3)]
    single = BatchSampler(48, 12, seed=7)
    for _ in range(2 * single.batches_per_epoch):  # two epochs
        shares = [set(next(s).tolist()) for s in world]
        assert all(len(s) == 4 for s in shares) and not (shares[0] & shares[1] or shares[0] & shares[2]
                                                         or shares[1] & shares[2])
        assert set().union(*shares) == set(next(single).tolist())
    with pytest.raises(EncdiffError, match="rank = 3"):
        BatchSampler(48, 4, seed=7, rank=3, world_size=3)


def test_sampler_resumes_exactly():
    uninterrupted = BatchSampler(30, 4, seed=11, rank=1, world_size=2)
    expected = take(uninterrupted, 20)
    for stop in (0, 3, 4, 7, 11):
        first = BatchSampler(30, 4, seed=11, rank=1, world_size=2)
        served = take(first, stop)
        state = first.state_dict()
        assert set(state) == {"epoch", "batch"} and all(isinstance(v, int) for v in state.values())
        resumed = BatchSampler(30, 4, seed=11, rank=1, world_size=2)
        resumed.load_state_dict(dict(state))
        assert served + take(resumed, 20 - stop) == expected


def test_weighted_sampler_balances_classes_resumes_and_splits_one_draw_over_ranks():
    labels = torch.tensor([0] * 90 + [1] * 10)
    weights = 1 / torch.bincount(labels).double()[labels]
    sampler = BatchSampler(100, 10, seed=3, weights=weights)
    drawn = torch.cat([next(sampler) for _ in range(50)])  # 5 epochs
    share = (labels[drawn] == 1).float().mean().item()
    assert 0.4 < share < 0.6  # the 10-image class is drawn half the time, not a tenth
    again = BatchSampler(100, 10, seed=3, weights=weights)
    for _ in range(23):
        next(again)
    resumed = BatchSampler(100, 10, seed=3, weights=weights)
    resumed.load_state_dict(again.state_dict())
    assert all(torch.equal(next(again), next(resumed)) for _ in range(30))
    ranks = [BatchSampler(100, 5, seed=3, rank=r, world_size=2, weights=weights) for r in range(2)]
    one = BatchSampler(100, 10, seed=3, weights=weights)
    first = next(one)
    parts = [next(r) for r in ranks]
    assert sorted(torch.cat(parts).tolist()) == sorted(first.tolist())
    with pytest.raises(EncdiffError, match="sampling weights"):
        BatchSampler(100, 10, seed=3, weights=torch.zeros(100))


@pytest.mark.parametrize("state,field", [({"epoch": 0, "batch": 3}, "batch"), ({"epoch": -1, "batch": 0}, "epoch"),
                                         ({"batch": 0}, "epoch"), ({"epoch": 0, "batch": 1.0}, "batch")])
def test_sampler_refuses_bad_states(state, field):
    sampler = BatchSampler(12, 4, seed=0)
    with pytest.raises(EncdiffError, match=f"field '{field}'"):
        sampler.load_state_dict(state)


# ----------------------------------------------------------------------------------------------- CIFAR-10


@needs_cifar
def test_cifar10_subset(tmp_path):
    chosen = extract_cifar_subset(tmp_path, 300)
    ds = quiet_dataset(tmp_path, 32, workers=0)
    assert ds.class_names == CIFAR_CLASSES and len(ds) == 300 and ds.images.shape == (300, 3, 32, 32)
    expected = sorted(chosen)
    assert ds.labels.tolist() == [CIFAR_CLASSES.index(name) for name, _ in expected]
    assert torch.bincount(ds.labels, minlength=10).min() >= 15
    assert 80 < ds.images.float().mean() < 160 and ds.images.float().std() > 40  # natural images, not blank
    x, _ = ds.batch(torch.arange(8))
    assert x.min() >= -1 and x.max() <= 1
