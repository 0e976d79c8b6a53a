"""EMA: the lerp maths against hand computations (with and without ramp-up), the half-life in images,
the EMA copy's independence from the live model, and its state dict round trip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from encdiff import EncdiffError
from encdiff.ema import EMA


def scalar_model(value: float) -> nn.Module:
    """One float64 parameter (exact enough to compare against Python floats) and one buffer."""
    model = nn.Module()
    model.weight = nn.Parameter(torch.tensor([value], dtype=torch.float64))
    model.register_buffer("stat", torch.tensor([0.0], dtype=torch.float64))
    return model


def set_value(model: nn.Module, value: float) -> None:
    with torch.no_grad():
        model.weight.fill_(value)


def test_constant_model_closed_form():
    # From e0 towards a constant c: e_k = c + (e0 - c) * beta**k, beta = 0.5 ** (B / H).
    model = scalar_model(2.0)
    ema = EMA(model, halflife_images=300, rampup_ratio=None)
    set_value(model, -1.0)
    for k in range(1, 8):
        ema.update(model, images_seen=32 * k, batch_images=32)
    beta = 0.5 ** (32 / 300)
    assert ema.model.weight.item() == pytest.approx(-1.0 + 3.0 * beta**7, rel=1e-13)


@pytest.mark.parametrize("rampup_ratio", [None, 0.05, 0.5])
def test_changing_model_matches_hand_computation(rampup_ratio):
    values = [0.3, -1.2, 4.0, 2.5, 0.0, 7.1, -3.3, 1.0]
    batch, halflife = 16, 100.0
    model = scalar_model(1.0)
    ema = EMA(model, halflife_images=halflife, rampup_ratio=rampup_ratio)
    expected = 1.0
    for k, value in enumerate(values, start=1):
        set_value(model, value)
        ema.update(model, images_seen=batch * k, batch_images=batch)
        h = halflife if rampup_ratio is None else min(halflife, rampup_ratio * batch * k)
        beta = 0.5 ** (batch / h)
        expected = beta * expected + (1 - beta) * value
        assert ema.model.weight.item() == pytest.approx(expected, rel=1e-12, abs=1e-14), k
    if rampup_ratio == 0.5:  # the ramp-up capped the half-life at 8, 16, ..., 64 < 100 images
        assert ema.beta(batch * 8, batch) == pytest.approx(0.5 ** (16 / 64))


def test_rampup_first_update_nearly_copies_the_model():
    model = scalar_model(0.0)
    ema = EMA(model, halflife_images=10_000, rampup_ratio=0.05)
    set_value(model, 1.0)
    ema.update(model, images_seen=64, batch_images=64)  # half-life capped at 3.2 images: beta = 0.5 ** 20
    assert ema.model.weight.item() == pytest.approx(1 - 0.5**20, rel=1e-13)


@pytest.mark.parametrize("batch", [1, 10, 250, 1000])
def test_initial_value_weighs_half_after_halflife_images(batch):
    model = scalar_model(0.0)
    ema = EMA(model, halflife_images=1000, rampup_ratio=None)
    set_value(model, 1.0)
    for k in range(1, 1000 // batch + 1):
        ema.update(model, images_seen=batch * k, batch_images=batch)
    assert ema.model.weight.item() == pytest.approx(0.5, rel=1e-12)


def test_ema_model_is_an_independent_frozen_copy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).train()
    ema = EMA(model, halflife_images=100)
    assert not ema.model.training and model.training
    assert all(not p.requires_grad for p in ema.model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    live, frozen = dict(model.named_parameters()), dict(ema.model.named_parameters())
    for name in live:
        assert torch.equal(live[name], frozen[name]), name
        assert live[name].untyped_storage().data_ptr() != frozen[name].untyped_storage().data_ptr(), name

    model(torch.randn(8, 3)).sum().backward()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert not torch.equal(ema.model[0].weight, model[0].weight)  # live changes do not leak into the EMA
    ema.update(model, images_seen=8, batch_images=8)
    assert all(p.grad is None for p in ema.model.parameters())
    for key, value in model.state_dict().items():  # update() leaves the live model alone
        assert torch.equal(value, before[key]), key
    for name in ("running_mean", "running_var", "num_batches_tracked"):  # buffers are copied, not averaged
        assert torch.equal(getattr(ema.model[1], name), getattr(model[1], name)), name
    ema.model[0].weight.data.zero_()
    assert torch.equal(model[0].weight, before["0.weight"])


def test_state_dict_round_trip():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.GroupNorm(2, 4))
    ema = EMA(model, halflife_images=50)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-2.0)
    ema.update(model, images_seen=5, batch_images=5)
    ema.update(model, images_seen=10, batch_images=5)
    restored = EMA(nn.Sequential(nn.Linear(3, 4), nn.GroupNorm(2, 4)), halflife_images=50)
    restored.load_state_dict({k: v.clone() for k, v in ema.state_dict().items()})
    for key, value in ema.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key
    assert all(not p.requires_grad for p in restored.model.parameters())
    # Both continue identically.
    ema.update(model, images_seen=15, batch_images=5)
    restored.update(model, images_seen=15, batch_images=5)
    for key, value in ema.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key


def test_load_state_dict_names_the_wrong_key():
    ema = EMA(nn.Linear(3, 4), halflife_images=50)
    state = ema.state_dict()
    with pytest.raises(EncdiffError, match="'bias'"):
        ema.load_state_dict({"weight": state["weight"]})
    with pytest.raises(EncdiffError, match="'weight'.*shape"):
        ema.load_state_dict({"weight": torch.zeros(2, 3), "bias": state["bias"]})


@pytest.mark.parametrize("kwargs, field", [
    ({"halflife_images": 0}, "halflife_images"), ({"halflife_images": float("nan")}, "halflife_images"),
    ({"halflife_images": 10, "rampup_ratio": -0.1}, "rampup_ratio"),
])
def test_bad_settings_are_refused(kwargs, field):
    with pytest.raises(EncdiffError, match=field):
        EMA(nn.Linear(2, 2), **kwargs)


def test_bad_update_counts_are_refused():
    model = nn.Linear(2, 2)
    ema = EMA(model, halflife_images=10)
    with pytest.raises(EncdiffError, match="images_seen"):
        ema.update(model, images_seen=4, batch_images=8)


def test_fused_update_equals_the_per_tensor_loop_and_follows_the_live_model():
    # The update gathers the live model's tensors once; the optimizer changes them in place, and a different live
    # model (same shapes) is followed from its first update on. Bits equal to lerp_/copy_ tensor by tensor.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.LazyLinear(5)).train()
    model(torch.randn(2, 3, 6, 6))
    ema = EMA(model, halflife_images=50, rampup_ratio=None)
    reference = [t.clone() for t in (*ema.model.parameters(), *ema.model.buffers())]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    other = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(128, 5)).train()
    for k in range(1, 7):
        live = model if k <= 4 else other
        optimizer.zero_grad()
        live(torch.randn(4, 3, 6, 6)).square().mean().backward()
        optimizer.step()
        optimizer = torch.optim.SGD(other.parameters(), lr=0.1) if k == 4 else optimizer
        ema.update(live, images_seen=8 * k, batch_images=8)
        weight = 1.0 - ema.beta(8 * k, 8)
        params, buffers = list(live.parameters()), list(live.buffers())
        for i, target in enumerate(reference):
            if i < len(params):
                target.lerp_(params[i].detach(), weight)
            else:
                target.copy_(buffers[i - len(params)])
        for i, (got, want) in enumerate(zip((*ema.model.parameters(), *ema.model.buffers()), reference)):
            assert torch.equal(got, want), (k, i)


def test_update_from_a_model_of_another_shape_is_refused():
    ema = EMA(nn.Linear(3, 4), halflife_images=100)
    with pytest.raises(EncdiffError, match="2 parameters and 0 buffers updated from one with 4"):
        ema.update(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 4)), images_seen=8, batch_images=8)
