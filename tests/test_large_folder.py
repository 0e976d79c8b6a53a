"""A folder larger than the memory it may use: 50,000 RGBA images of 64x64 (819 MB decoded) are decoded, cached,
encoded to latents and drawn in batches while the process's anonymous memory (what cannot be paged back to the files)
stays far below that; the caches are read through memory maps."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from conftest import SRC

IMAGES = 50_000


def anonymous_memory_script(data, cache) -> str:
    return textwrap.dedent(f"""
        import threading, time, torch
        from pathlib import Path
        from encdiff.autoencoder import Autoencoder
        from encdiff.data import ImageDataset
        from encdiff.presets import AUTOENCODERS
        from encdiff.training.latents import cached_latents, latent_batches
        from encdiff.training.loop import Distributed
        import dataclasses

        def anon():
            for line in open("/proc/self/status"):
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        peak, done = [anon()], []
        def watch():
            while not done:
                peak.append(anon()); time.sleep(0.02)
        threading.Thread(target=watch, daemon=True).start()
        base = anon()
        data = ImageDataset({str(data)!r}, 64, channels=4, cache_dir={str(cache)!r}, workers=2, progress=False)
        # as cheap an autoencoder as encodes: the memory, not the model, is under test
        ae = Autoencoder(dataclasses.replace(AUTOENCODERS["tiny"], block_out_channels=(4, 4, 4), layers_per_block=1,
                                             attention_levels=(False,) * 3, mid_attention=False, in_channels=4,
                                             out_channels=4, sample_size=64))
        latents = cached_latents(ae, data, Path({str(cache)!r}), "tiny", Distributed())
        batch = latent_batches(latents, data)
        for start in range(0, len(data), 997 * 8):
            x, _ = batch(torch.randint(0, len(data), (256,)), torch.zeros(256, dtype=torch.bool))
            data.batch(torch.arange(start, min(start + 256, len(data))))
        done.append(1)
        import json
        print(json.dumps({{"images": len(data), "grown": max(peak) - base, "image_bytes": data.images.numel(),
                          "latent_bytes": latents[0].numel() * 4}}))
    """)


@pytest.mark.slow
def test_fifty_thousand_images_train_in_bounded_memory(tmp_path):
    folder = tmp_path / "icons"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(IMAGES):
        pixels = np.zeros((64, 64, 4), dtype=np.uint8)
        y, x = rng.integers(8, 40, 2)
        pixels[y:y + 16, x:x + 16] = (*rng.integers(0, 256, 3), 255)
        Image.fromarray(pixels, "RGBA").save(folder / f"{i:05d}.png", optimize=False, compress_level=1)
    result = subprocess.run([sys.executable, "-c", anonymous_memory_script(folder, tmp_path / "cache")],
                            capture_output=True, text=True, timeout=1200, env={"PYTHONPATH": SRC, "OMP_NUM_THREADS": "2",
                                                                              "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-2000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["images"] == IMAGES and measured["image_bytes"] == IMAGES * 4 * 64 * 64
    grown = measured["grown"]
    # the decoded set is 819 MB; what the process holds beyond its start is a fraction of it
    assert grown < 400 * 2**20, f"anonymous memory grew by {grown / 2**20:.0f} MiB"
