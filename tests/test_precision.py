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
    assert precision.inference_precision("cuda") == "float32"  # auto keeps a GPU in float32


def test_a_forced_bf16_applies_on_a_gpu_and_is_refused_where_the_gpu_has_none(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert precision.inference_precision("cuda", "bf16") == "bf16"
    assert precision.inference_precision("cuda", "float32") == "float32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Old GPU")
    precision.inference_precision.cache_clear()
    with pytest.raises(EncdiffError, match=r"this GPU \(Old GPU\) does not compute bf16"):
        precision.inference_precision("cuda", "bf16")
    assert precision.inference_precision("cuda", "auto") == "float32"


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


def test_bf16_group_norm_of_a_channels_last_map_matches_pytorchs_and_keeps_the_layout():
    # encdiff's GroupNorm routes a bf16 channels_last map through the contiguous kernel (PyTorch's channels_last bf16
    # kernel is several times slower on the CPU): same parameters, same state dict, the same numbers to bf16 rounding.
    from torch import nn

    from encdiff.layers import GroupNorm

    g = torch.Generator().manual_seed(0)
    ours, theirs = GroupNorm(8, 32, eps=1e-6), nn.GroupNorm(8, 32, eps=1e-6)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(32, generator=g)), ours.bias.copy_(torch.randn(32, generator=g))
    theirs.load_state_dict(ours.state_dict())
    assert list(ours.state_dict()) == list(theirs.state_dict())
    x = (3 + 2 * torch.randn(4, 32, 8, 8, generator=g)).contiguous(memory_format=torch.channels_last)
    exact = theirs(x)  # float32
    assert torch.equal(ours(x), exact)  # float32 maps take PyTorch's kernel unchanged
    half = x.bfloat16()
    out = ours(half)
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last)
    assert (out.float() - exact).abs().max() <= (theirs(half).float() - exact).abs().max() + 0.02
    x.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # training: the gradient flows through the copies
        ours(x.bfloat16()).float().square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_bf16_attention_over_a_short_map_runs_in_float32(monkeypatch):
    # At <= SHORT_ATTENTION pixels the CPU's float32 attention kernel is the faster one under bf16 autocast, and the
    # more precise; larger maps keep the bf16 kernel.
    import torch.nn.functional as F

    from encdiff.layers import SHORT_ATTENTION, SelfAttention

    torch.manual_seed(0)
    block = SelfAttention(64, groups=8, eps=1e-6, head_dim=16).eval()
    x = torch.randn(2, 64, 4, 4).contiguous(memory_format=torch.channels_last)
    assert 4 * 4 <= SHORT_ATTENTION < 8 * 8
    sdpa, calls = F.scaled_dot_product_attention, []
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, k, v: calls.append(q.dtype) or sdpa(q, k, v))
    with torch.no_grad():
        exact = block(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast = block(x)
            block(torch.randn(2, 64, 8, 8).contiguous(memory_format=torch.channels_last))
    assert calls == [torch.float32, torch.float32, torch.bfloat16]  # float32 run, 16 pixels, 64 pixels
    assert (fast.float() - exact).abs().max() < 0.1


def test_the_cached_probe_is_per_instruction_set_limit(monkeypatch):
    """A process whose oneDNN is limited (ONEDNN_MAX_CPU_ISA, e.g. to emulate a CPU without bf16) probes anew rather
    than reusing the unlimited process's choice."""
    monkeypatch.setattr(precision, "cpu_info", lambda: ("New CPU", frozenset({"avx512_bf16"})))
    speedups = iter([1.7, 0.03])
    monkeypatch.setattr(precision, "probe_speedup", lambda: next(speedups))
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    assert precision.inference_precision("cpu") == "bf16"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    precision.inference_precision.cache_clear()
    assert precision.inference_precision("cpu") == "float32"
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    precision.inference_precision.cache_clear()
    assert precision.inference_precision("cpu") == "bf16"  # each answer cached under its own key
