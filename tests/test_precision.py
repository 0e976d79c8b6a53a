"""The inference precision (precision.py): chosen from the CPU's flags and a cached probe under `auto`, forced by
ENCDIFF_PRECISION, auto by default; bf16 autocast changes the networks' arithmetic only."""

from __future__ import annotations

import json

import pytest
import torch

import encdiff.precision as precision
from encdiff import EncdiffError

from test_editing import tiny_generator


@pytest.fixture(autouse=True)
def fresh(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("ENCDIFF_PRECISION", raising=False)
    precision.inference_precision.cache_clear()
    yield
    precision.inference_precision.cache_clear()


def test_auto_follows_the_cpu_flags_and_caches_the_probe(monkeypatch, tmp_path):
    monkeypatch.setenv("ENCDIFF_PRECISION", "auto")
    monkeypatch.setattr(precision, "cpu_info", lambda: ("Old CPU", frozenset({"avx2"})))
    assert precision.inference_precision("cpu") == "float32"  # no native bf16: never probed
    assert not (tmp_path / "encdiff" / "precision.json").exists()
    precision.inference_precision.cache_clear()
    monkeypatch.setattr(precision, "cpu_info", lambda: ("New CPU", frozenset({"avx512_bf16"})))
    probes = []
    monkeypatch.setattr(precision, "probe_speedup", lambda: probes.append(1) or 1.7)
    assert precision.inference_precision("cpu") == "bf16"
    precision.inference_precision.cache_clear()
    assert precision.inference_precision("cpu") == "bf16" and len(probes) == 1  # the cached probe
    cached = json.loads((tmp_path / "encdiff" / "precision.json").read_text())
    assert list(cached.values()) == [{"speedup": 1.7, "choice": "bf16"}]
    assert precision.inference_precision("cuda") == "float32"


def test_the_default_is_auto_and_a_slow_probe_keeps_float32(monkeypatch):
    # No ENCDIFF_PRECISION (the fixture removes it): the CPU decides.
    monkeypatch.setattr(precision, "cpu_info", lambda: ("Fast CPU", frozenset({"amx_bf16"})))
    monkeypatch.setattr(precision, "probe_speedup", lambda: 1.7)
    assert precision.inference_precision("cpu") == "bf16"
    precision.inference_precision.cache_clear()
    monkeypatch.setattr(precision, "cpu_info", lambda: ("Slow CPU", frozenset({"amx_bf16"})))
    monkeypatch.setattr(precision, "probe_speedup", lambda: 1.05)
    assert precision.inference_precision("cpu") == "float32"
    monkeypatch.setenv("ENCDIFF_PRECISION", "fp8")
    precision.inference_precision.cache_clear()
    with pytest.raises(EncdiffError, match="ENCDIFF_PRECISION = 'fp8'"):
        precision.inference_precision("cpu")


def test_bf16_changes_the_images_a_little_and_only_through_the_networks(monkeypatch):
    generator = tiny_generator()
    labels = torch.tensor([0, 1])
    full = generator.images([0, 1], labels, steps=4)
    monkeypatch.setenv("ENCDIFF_PRECISION", "bf16")
    precision.inference_precision.cache_clear()
    half = generator.images([0, 1], labels, steps=4)
    assert half.dtype == torch.uint8 and half.shape == full.shape
    assert (half.int() - full.int()).abs().float().mean() < 8  # close, not equal


def test_the_precision_flag_overrides_the_environment_for_the_whole_command(monkeypatch, capsys):
    from encdiff.cli import main

    monkeypatch.setenv("ENCDIFF_PRECISION", "bf16")  # restored after the test, whatever main sets
    assert main(["--precision", "float32", "info"]) == 0
    assert "inference precision here: float32" in capsys.readouterr().out
    assert precision.inference_precision("cpu") == "float32"
    assert main(["--precision", "bf16", "info"]) == 0
    assert "inference precision here: bf16" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # argparse: a one-line usage error naming the choices
        main(["--precision", "fp8", "info"])
    assert "invalid choice: 'fp8'" in capsys.readouterr().err
