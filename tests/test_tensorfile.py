"""Safetensors files written and read through memory maps (tensorfile.py): the image and latent caches."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from encdiff import EncdiffError
from encdiff.tensorfile import read_mapped, write_mapped


def test_a_mapped_file_is_ordinary_safetensors_both_ways(tmp_path):
    images = torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8)
    labels = torch.arange(5)
    latents = torch.randn(5, 2, 3)

    def fill(views):
        views["images"][:] = images.numpy()
        views["labels"][:] = labels.numpy()
        for i in range(5):  # row by row, as the caches are written
            views["latents"][i] = latents[i].numpy()

    path = tmp_path / "cache.safetensors"
    write_mapped(path, {"images": (torch.uint8, (5, 3, 4, 4)), "labels": (torch.int64, (5,)),
                        "latents": (torch.float32, (5, 2, 3))}, fill, {"format": "test"})
    loaded = load_file(str(path))
    assert torch.equal(loaded["images"], images) and torch.equal(loaded["labels"], labels)
    assert torch.equal(loaded["latents"], latents)
    mapped, meta = read_mapped(path)
    assert meta == {"format": "test"} and torch.equal(mapped["images"][torch.tensor([4, 0])], images[[4, 0]])
    save_file({"x": latents}, str(tmp_path / "theirs.safetensors"))
    assert torch.equal(read_mapped(tmp_path / "theirs.safetensors")[0]["x"], latents)


def test_a_failed_fill_leaves_no_file_and_damage_is_named(tmp_path):
    path = tmp_path / "cache.safetensors"

    def fail(views):
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_mapped(path, {"x": (torch.uint8, (3,))}, fail)
    assert list(tmp_path.iterdir()) == []
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    with pytest.raises(EncdiffError, match="cache.safetensors: not a safetensors file"):
        read_mapped(path)
    save_file({"x": torch.zeros(100)}, str(path))
    path.write_bytes(path.read_bytes()[:-8])  # truncated
    with pytest.raises(EncdiffError, match="does not fit the file"):
        read_mapped(path)
