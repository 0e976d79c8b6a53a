"""The denoising U-Net: shapes, initialisation, noise and class conditioning, dropout, gradient
checkpointing, memory format, dtype and config validation."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import count_forward_calls, TINY_UNET, TINY_UNET_CLASSES, max_abs_diff, randomize_
from encdiff import EncdiffError, UNet, UNetConfig, presets
from encdiff.layers import ResnetBlock, SelfAttention


def make_unet(config: UNetConfig = TINY_UNET, seed: int | None = 0) -> UNet:
    """A U-Net in eval mode, its parameters randomised unless `seed` is None."""
    unet = UNet(config).eval()
    return unet if seed is None else randomize_(unet, seed)


def inputs(config: UNetConfig, batch: int = 2, size: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, size, size, generator=g)
    t = torch.rand(batch, generator=g) * 1000
    return x, t


@pytest.mark.parametrize("config", [
    TINY_UNET,
    TINY_UNET_CLASSES,
    dataclasses.replace(TINY_UNET, in_channels=4, out_channels=8, block_out_channels=(8, 16, 16),
                        attention_levels=(False, False, True), downsample_padding=0),
], ids=["tiny", "classes", "3-levels-4-to-8-channels"])
def test_output_has_input_resolution_and_out_channels(config):
    unet = make_unet(config)
    x, t = inputs(config, batch=3)
    with torch.no_grad():
        out = unet(x, t)
        rect = unet(torch.randn(1, config.in_channels, 8, 16), 5.0)
    assert out.shape == (3, config.out_channels, 16, 16)
    assert rect.shape == (1, config.out_channels, 8, 16)


@pytest.mark.parametrize("config", [TINY_UNET, TINY_UNET_CLASSES], ids=["tiny", "classes"])
def test_freshly_built_unet_outputs_exactly_zero(config):
    unet = UNet(config).eval()
    x, t = inputs(config)
    with torch.no_grad():
        out = unet(x, t)
    assert torch.count_nonzero(out) == 0


@pytest.mark.parametrize("config", [TINY_UNET, TINY_UNET_CLASSES], ids=["tiny", "classes"])
def test_every_residual_branch_ends_in_a_zero_initialised_layer(config):
    unet = UNet(config)
    resnets = [m for m in unet.modules() if isinstance(m, ResnetBlock)]
    attentions = [m for m in unet.modules() if isinstance(m, SelfAttention)]
    # tiny: 1 down + 2 up per level, 2 in the mid block; attention after each resnet at attended levels + mid.
    assert len(resnets) == 3 * len(config.block_out_channels) + 2
    assert len(attentions) == 3 * sum(config.attention_levels) + 1
    last_layers = [r.conv2 for r in resnets] + [a.to_out[0] for a in attentions] + [unet.conv_out]
    for layer in last_layers:
        assert all(torch.count_nonzero(p) == 0 for p in layer.parameters())
    # ... and only those: the layers feeding them are not zero, so the network can learn.
    assert all(torch.count_nonzero(r.conv1.weight) > 0 for r in resnets)
    assert all(torch.count_nonzero(a.to_q.weight) > 0 for a in attentions)


def test_scalar_noise_label_equals_per_sample_vector():
    unet = make_unet()
    x, _ = inputs(TINY_UNET)
    with torch.no_grad():
        vector = unet(x, torch.tensor([250.0, 250.0]))
        assert torch.equal(unet(x, 250.0), vector)
        assert torch.equal(unet(x, torch.tensor(250.0)), vector)
        assert torch.equal(unet(x, torch.tensor([250.0])), vector)
        assert max_abs_diff(unet(x, 10.0), vector) > 1e-3  # the label matters


def test_batch_elements_are_independent():
    """Each sample's output depends only on its own input, label and class (no cross-batch mixing)."""
    unet = make_unet(TINY_UNET_CLASSES)
    x, t = inputs(TINY_UNET_CLASSES, batch=3)
    labels = torch.tensor([0, 4, 5])
    with torch.no_grad():
        batched = unet(x, t, labels)
        single = torch.cat([unet(x[i:i + 1], t[i:i + 1], labels[i:i + 1]) for i in range(3)])
    assert max_abs_diff(batched, single) < 1e-5


def test_class_labels_none_means_the_null_class():
    config = TINY_UNET_CLASSES
    unet = make_unet(config)
    assert unet.class_embedding.num_embeddings == config.num_classes + 1
    x, t = inputs(config)
    with torch.no_grad():
        implicit = unet(x, t)
        explicit = unet(x, t, torch.full((2,), config.num_classes))
    assert torch.equal(implicit, explicit)


def test_different_classes_give_different_outputs():
    unet = make_unet(TINY_UNET_CLASSES)
    x, t = inputs(TINY_UNET_CLASSES)
    with torch.no_grad():
        outs = [unet(x, t, torch.full((2,), c)) for c in range(TINY_UNET_CLASSES.num_classes + 1)]
    for i in range(len(outs)):
        for j in range(i):
            assert max_abs_diff(outs[i], outs[j]) > 1e-4, (i, j)


def test_class_labels_on_unconditional_unet_are_refused():
    unet = make_unet(TINY_UNET)
    x, t = inputs(TINY_UNET)
    with pytest.raises(EncdiffError, match="class_labels"):
        unet(x, t, torch.tensor([0, 1]))


def test_missing_class_labels_without_null_class_are_refused():
    config = dataclasses.replace(TINY_UNET_CLASSES, null_class=False)
    unet = make_unet(config)
    assert unet.class_embedding.num_embeddings == config.num_classes
    x, t = inputs(config)
    with pytest.raises(EncdiffError, match="class_labels"):
        unet(x, t)
    with torch.no_grad():
        assert unet(x, t, torch.tensor([0, 4])).shape == x.shape  # explicit labels still work


def test_dropout_is_active_only_in_train_mode():
    config = dataclasses.replace(TINY_UNET, dropout=0.5)
    unet = make_unet(config)
    reference = make_unet(dataclasses.replace(config, dropout=0.0))  # same seed: same weights
    x, t = inputs(config)
    with torch.no_grad():
        unet.train()
        a, b = unet(x, t), unet(x, t)
        assert max_abs_diff(a, b) > 1e-4
        unet.eval()
        assert torch.equal(unet(x, t), unet(x, t))
        assert max_abs_diff(unet(x, t), reference(x, t)) < 1e-6


def _forward_backward(unet: UNet, x, t, labels, seed: int):
    unet.zero_grad()
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)  # the same dropout masks for both runs
    out = unet(x, t, labels)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    grads = {name: p.grad.clone() for name, p in unet.named_parameters()}
    return out.detach(), x.grad, grads


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_gradient_checkpointing_gives_same_outputs_and_gradients(dropout):
    config = dataclasses.replace(TINY_UNET_CLASSES, dropout=dropout)
    unet = make_unet(config).train()
    x, t = inputs(config)
    labels = torch.tensor([1, 5])
    # Count how often a down-level and a mid-block ResNet run: checkpointing re-runs them in backward.
    calls = count_forward_calls(unet.down_blocks[0].resnets[0], unet.mid_block.resnets[1])

    plain = _forward_backward(unet, x, t, labels, seed=3)
    assert len(calls) == 2
    unet.set_gradient_checkpointing(True)
    calls.clear()
    ckpt = _forward_backward(unet, x, t, labels, seed=3)
    assert len(calls) == 4

    assert max_abs_diff(plain[0], ckpt[0]) < 1e-6
    assert max_abs_diff(plain[1], ckpt[1]) < 1e-6
    for name, grad in plain[2].items():
        assert max_abs_diff(grad, ckpt[2][name]) < 1e-5, name
    assert any(g.abs().sum() > 0 for g in plain[2].values())


def test_channels_last_gives_same_outputs():
    config = TINY_UNET_CLASSES
    unet = make_unet(config)
    x, t = inputs(config)
    with torch.no_grad():
        expected = unet(x, t)
        unet.to(memory_format=torch.channels_last)
        assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        out = unet(x.to(memory_format=torch.channels_last), t)
    assert max_abs_diff(out, expected) < 1e-5


def test_float64_unet_runs_in_float64_and_agrees_with_float32():
    config = TINY_UNET_CLASSES
    unet = make_unet(config)
    x, t = inputs(config)
    with torch.no_grad():
        expected = unet(x, t, torch.tensor([0, 3]))
        unet.double()
        out = unet(x.double(), t.double(), torch.tensor([0, 3]))
        scalar = unet(x.double(), 7.0)
    assert out.dtype == torch.float64 and scalar.dtype == torch.float64
    assert max_abs_diff(out, expected) < 1e-4


@pytest.mark.parametrize("name", sorted(presets.UNETS))
def test_presets_build(name):
    with torch.device("meta"):
        unet = UNet(presets.UNETS[name])
    assert sum(p.numel() for p in unet.parameters()) > 0


def test_ddpm_cifar10_preset_has_35_7m_parameters():
    with torch.device("meta"):
        unet = UNet(presets.UNETS["ddpm_cifar10"])
    assert round(sum(p.numel() for p in unet.parameters()) / 1e5) == 357


INVALID = [
    (dict(norm_num_groups=5), "norm_num_groups"),
    (dict(attention_levels=(False, True, True)), "attention_levels"),
    (dict(attention_head_dim=3), "attention_head_dim"),
    (dict(block_out_channels=()), "block_out_channels"),
    (dict(block_out_channels=(8, -16)), "block_out_channels"),
    (dict(in_channels=0), "in_channels"),
    (dict(out_channels=0), "out_channels"),
    (dict(layers_per_block=0), "layers_per_block"),
    (dict(num_classes=-1), "num_classes"),
    (dict(downsample_padding=2), "downsample_padding"),
    (dict(dropout=1.0), "dropout"),
    # Zero divisors must be refused like any other bad value, not crash with ZeroDivisionError.
    (dict(norm_num_groups=0), "norm_num_groups"),
    (dict(attention_head_dim=0), "attention_head_dim"),
    # Fields the constructor used to take on trust: a bad value must fail here, not at the first forward.
    (dict(freq_shift=None), "freq_shift"),
    (dict(norm_eps=-1.0), "norm_eps"),
    (dict(emb_channels=-8), "emb_channels"),
]


@pytest.mark.parametrize("changes, field", INVALID, ids=[",".join(f"{k}={v}" for k, v in c.items()) for c, _ in INVALID])
def test_invalid_config_names_the_field(changes, field):
    with pytest.raises(EncdiffError, match=field):
        dataclasses.replace(TINY_UNET, **changes)


def test_attention_head_dim_is_checked_against_the_mid_block_too():
    # 16 divides the attended first level (16 channels) but not the 24-channel mid block.
    with pytest.raises(EncdiffError, match="attention_head_dim"):
        UNetConfig(block_out_channels=(16, 24), attention_levels=(True, False), norm_num_groups=8,
                   attention_head_dim=16)
    UNetConfig(block_out_channels=(16, 24), attention_levels=(True, False), norm_num_groups=8,
               attention_head_dim=16, mid_attention=False)


@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
def test_forward_leaves_its_inputs_untouched(grad):
    unet = make_unet(TINY_UNET_CLASSES)
    x, t = inputs(TINY_UNET_CLASSES)
    labels = torch.tensor([1, 2])
    copies = x.clone(), t.clone(), labels.clone()
    with torch.set_grad_enabled(grad):
        unet(x, t, labels)
    assert all(torch.equal(a, b) for a, b in zip((x, t, labels), copies))


def test_outputs_are_the_same_with_and_without_autograd():
    """Inference-only shortcuts (e.g. in-place activations without a graph) must not change the result."""
    unet = make_unet(TINY_UNET_CLASSES)
    x, t = inputs(TINY_UNET_CLASSES)
    with torch.no_grad():
        expected = unet(x, t)
    assert max_abs_diff(unet(x, t).detach(), expected) < 1e-6
