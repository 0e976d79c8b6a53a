"""The README's figures, made with the bundled generator: docs/editing.png (edits of a real CIFAR-10 test image),
docs/serve.png (the web page of `encdiff serve` in headless Chromium, after generating) and docs/guidance.png (the
same seeds under each kind of guidance; it needs a generator with a guide, `encdiff train-guide`).

    PYTHONPATH=src python benchmarks/readme_figures.py /tmp/cifar10 [--only editing|serve|guidance] [--generator DIR]
"""

import argparse
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from encdiff import editing
from encdiff.images import load_image
from encdiff.pipeline import Generator

DOCS = Path(__file__).resolve().parents[1] / "docs"
SCALE = 3  # 32-pixel images are shown 3x, nearest-neighbour


def labelled_row(images: torch.Tensor, labels: list[str]) -> Image.Image:
    """A row of images, each scaled up, with a caption under it."""
    size = images.shape[-1] * SCALE
    row = Image.new("RGB", (len(images) * (size + 6), size + 18), "white")
    draw = ImageDraw.Draw(row)
    for i, (image, label) in enumerate(zip(images, labels)):
        tile = Image.fromarray(image.permute(1, 2, 0).numpy()).resize((size, size), Image.Resampling.NEAREST)
        row.paste(tile, (i * (size + 6), 0))
        draw.text((i * (size + 6) + 2, size + 3), label, fill="black")
    return row


def editing_figure(data: Path) -> Path:
    generator = Generator.bundled()
    cat = generator.class_index("cat")
    files = sorted((data / "test" / "cat").glob("*.jpg"))
    path = random.Random(4).choice(files)  # a seeded random test image, not the first of a sorted folder
    image = torch.from_numpy(load_image(path, 32))[None]
    label = torch.tensor([cat])
    rows = []
    strengths = [editing.img2img(generator, image, [0], label, strength=s) for s in (0.0, 0.4, 0.6, 0.8)]
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    holed = (image.float() * (1 - mask)).to(torch.uint8)
    inpainted = editing.inpaint(generator, image, mask, [1], label)
    noise = editing.invert(generator, image, label, steps=50)
    back = editing.regenerate(generator, noise, label, steps=50)
    dog = editing.regenerate(generator, noise, torch.tensor([generator.class_index("dog")]), steps=50,
                             guidance_scale=3.0)
    rows.append(labelled_row(torch.cat([image, *strengths, holed, inpainted, back, dog]),
                             ["input", "s=0", "s=0.4", "s=0.6", "s=0.8", "mask", "inpaint", "inverted", "as dog"]))
    c = generator.unet.config  # the latent's shape is the model's: 8x8x8 for version 0.5, 8x8x16 since 0.6
    ends = [torch.randn(1, c.in_channels, c.sample_size, c.sample_size, generator=torch.Generator().manual_seed(s))
            .double() * generator.denoiser.sigma_max for s in (3, 11)]
    strip = editing.regenerate(generator, editing.interpolate_noise(*ends, 9),
                               torch.tensor([generator.class_index("horse")] * 9), guidance_scale=3.0, steps=30)
    rows.append(labelled_row(strip, ["seed 3"] + [""] * 7 + ["seed 11"]))
    figure = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows) + 8), "white")
    y = 0
    for r in rows:
        figure.paste(r, (0, y))
        y += r.height + 8
    out = DOCS / "editing.png"
    figure.save(out)
    print(f"{out} (input: {path.relative_to(data)})")
    return out


# (caption, Sampling overrides): the rows of the guidance figure, the settings BENCHMARKS.md measures
GUIDANCE_ROWS = [
    ("none", dict(guidance_scale=1.0)),
    ("classifier-free 3", dict(guidance_scale=3.0, guidance_kind="classifier-free", guidance_interval=None)),
    ("classifier-free 4, sigma in (0.5, 10]", dict(guidance_scale=4.0, guidance_kind="classifier-free",
                                                   guidance_interval=(0.5, 10.0))),
    ("autoguidance 1.5", dict(guidance_scale=1.5, guidance_kind="auto", guidance_interval=None)),
    ("autoguidance 2", dict(guidance_scale=2.0, guidance_kind="auto", guidance_interval=None)),
]
# The unconditional figure's last row: the best measured autoguidance with a guide from the main run's own early step
# (BENCHMARKS.md, session 23); a class-conditional model at this scale is far past its best.
UNCONDITIONAL_ROWS = [
    ("autoguidance 4, sigma in (0.5, 10]", dict(guidance_scale=4.0, guidance_kind="auto", guidance_interval=(0.5, 10.0))),
]


def guidance_figure(generator_folder: Path | None) -> Path:
    """One row per kind of guidance, the same seed down a column: one column per class for a class-conditional
    generator (docs/guidance.png), ten seeds for an unconditional one (docs/guidance-unconditional.png, whose rows
    leave classifier-free guidance out: there is no class to guide towards)."""
    generator = Generator.from_pretrained(generator_folder) if generator_folder else Generator.bundled()
    if generator.guide is None:
        raise SystemExit(f"{generator_folder or 'the bundled generator'}: no guide to autoguide with; "
                         "train one (encdiff train-guide GENERATOR DATA) and pass --generator")
    conditional = generator.num_classes > 0
    columns = generator.num_classes if conditional else 10
    seeds = list(range(100, 100 + columns))
    labels = torch.arange(columns) if conditional else None
    rows = []
    for caption, overrides in GUIDANCE_ROWS + ([] if conditional else UNCONDITIONAL_ROWS):
        if not conditional and overrides.get("guidance_kind") == "classifier-free":
            continue
        images = generator.images(seeds, labels, **overrides)
        row = labelled_row(images, [""] * len(seeds))
        captioned = Image.new("RGB", (row.width + 200, row.height), "white")
        captioned.paste(row, (200, 0))
        ImageDraw.Draw(captioned).text((4, row.height // 2 - 6), caption, fill="black")
        rows.append(captioned)
    figure = Image.new("RGB", (rows[0].width, 15 + sum(r.height for r in rows)), "white")
    draw = ImageDraw.Draw(figure)
    for i, name in enumerate(generator.class_names):  # column headings, spaced as labelled_row spaces its tiles
        draw.text((200 + i * (generator.image_size * SCALE + 6) + 2, 1), name, fill="black")
    y = 15
    for r in rows:
        figure.paste(r, (0, y))
        y += r.height
    out = DOCS / ("guidance.png" if conditional else "guidance-unconditional.png")
    figure.save(out)
    print(out)
    return out


def serve_figure() -> Path:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "encdiff", "serve", "--port", str(port)])
    try:
        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium")
        for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,620"):
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
        try:
            for _ in range(120):
                try:
                    driver.get(f"http://127.0.0.1:{port}/")
                    break
                except Exception:
                    time.sleep(0.5)
            wait = WebDriverWait(driver, 120)
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#class option")) == 11)
            for cls, seed in (("horse", "5"), ("ship", "21")):
                Select(driver.find_element(By.ID, "class")).select_by_visible_text(cls)
                for field, value in (("num_images", "6"), ("seed", seed)):
                    driver.find_element(By.ID, field).clear()
                    driver.find_element(By.ID, field).send_keys(value)
                before = len(driver.find_elements(By.CSS_SELECTOR, "#gallery img"))
                driver.find_element(By.ID, "generate").click()
                wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery img")) == before + 6)
            out = DOCS / "serve.png"
            driver.save_screenshot(str(out))
            print(out)
            return out
        finally:
            driver.quit()
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, help="CIFAR-10 folder with test/<class>/ images")
    parser.add_argument("--only", choices=["editing", "serve", "guidance"])
    parser.add_argument("--generator", type=Path, help="generator folder for the guidance figure (default: bundled)")
    args = parser.parse_args()
    if args.only in (None, "editing"):
        editing_figure(args.data)
    if args.only in (None, "serve"):
        serve_figure()
    if args.only in (None, "guidance"):
        guidance_figure(args.generator)
