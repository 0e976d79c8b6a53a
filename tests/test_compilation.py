"""Compiled sampling (compilation.py, Generator(compile=...)): asked for by a flag or ENCDIFF_COMPILE, refused with a
clear message where no C++ compiler exists, and the same images, evaluation counts and saved folder as eager mode."""

from __future__ import annotations

import shutil

import pytest
import torch

import encdiff.compilation as compilation
from encdiff import EncdiffError
from encdiff.pipeline import Generator

from test_editing import tiny_generator


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    monkeypatch.delenv(compilation.ENV, raising=False)


@pytest.fixture
def a_compiler(monkeypatch):
    """Building a compiled generator compiles nothing yet (torch.compile is lazy): these tests need no real one."""
    monkeypatch.setattr(compilation.shutil, "which", lambda name: f"/usr/bin/{name}")


@pytest.mark.parametrize("value, expected", [("", False), ("0", False), ("off", False), ("1", True), ("Yes", True)])
def test_the_environment_asks_for_it_and_the_argument_overrides(monkeypatch, a_compiler, value, expected):
    monkeypatch.setenv(compilation.ENV, value)
    generator = tiny_generator()
    assert generator.compiled is expected
    assert generator.with_compile(not expected).compiled is (not expected)
    # eager: the denoiser calls the network itself; compiled: a torch.compile wrapper around it
    assert (generator.denoiser.net is generator.unet) is (not expected)


def test_a_bad_value_names_the_variable(monkeypatch):
    monkeypatch.setenv(compilation.ENV, "fast")
    with pytest.raises(EncdiffError, match="ENCDIFF_COMPILE = 'fast'"):
        tiny_generator()


def test_without_a_cpp_compiler_it_is_refused_before_sampling(monkeypatch):
    monkeypatch.setattr(compilation.shutil, "which", lambda name: None)
    with pytest.raises(EncdiffError, match="needs a C.. compiler"):
        tiny_generator().with_compile()
    assert not tiny_generator().with_compile(False).compiled  # eager needs none


def test_a_compiled_generator_saves_the_same_folder(tmp_path, a_compiler):
    generator = tiny_generator()
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    generator.save_pretrained(eager)
    generator.with_compile().save_pretrained(compiled)
    files = sorted(p.relative_to(eager) for p in eager.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(compiled) for p in compiled.rglob("*") if p.is_file())
    for name in files:
        assert (eager / name).read_bytes() == (compiled / name).read_bytes(), name
    assert not Generator.from_pretrained(compiled).compiled  # compiling is a choice of the process, not the folder


def test_info_says_whether_sampling_is_compiled(monkeypatch, tmp_path, capsys, a_compiler):
    from encdiff.cli import main

    tiny_generator().save_pretrained(tmp_path / "g")
    assert main(["info", str(tmp_path / "g")]) == 0
    assert "compiled sampling: off" in capsys.readouterr().out
    assert main(["--compile", "info", str(tmp_path / "g")]) == 0
    assert "compiled sampling: on" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.skipif(not any(shutil.which(cc) for cc in compilation.COMPILERS),
                    reason="TorchInductor needs a C++ compiler on the CPU")
def test_compiled_sampling_gives_the_eager_images_and_counts():
    eager = tiny_generator()
    labels = torch.tensor([0, 2])
    expected = eager.images([3, 4], labels, steps=3, guidance_scale=2.0)
    eager_evaluations = eager.evaluations
    generator = eager.with_compile()
    generator.reset_evaluations()
    for _ in range(2):  # the second call runs the cached graphs
        out = generator.images([3, 4], labels, steps=3, guidance_scale=2.0)
        assert out.dtype == torch.uint8 and out.shape == expected.shape
        assert (out.int() - expected.int()).abs().max() <= 1  # fused kernels round differently, by a level at most
    assert generator.evaluations == 2 * eager_evaluations
