"""Post-hoc EMA (EDM2 sec. 3): the sigma_rel <-> gamma map, the profiles' inner products, the least-squares
reconstruction against a brute-force EMA, and the trainer's snapshots (exact resume, export, the command)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from encdiff import EncdiffError
from encdiff.phema import (PowerEMA, gamma_to_sigma_rel, power_beta, profile_dot, reconstruct, sigma_rel_to_gamma,
                           snapshot_nearest, snapshots, solve_coefficients)


def test_sigma_rel_and_gamma_are_each_others_inverse_with_edm2s_values():
    # EDM2 sec. 3: sigma_rel 0.05 and 0.10 are gamma 16.97 and 6.94
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    for s in (0.01, 0.05, 0.13, 0.28):
        assert gamma_to_sigma_rel(sigma_rel_to_gamma(s)) == pytest.approx(s, rel=1e-10)
    for bad in (0.0, 0.3, float("nan"), -0.1, "0.1"):
        with pytest.raises(EncdiffError, match="sigma_rel"):
            sigma_rel_to_gamma(bad)


def test_profile_inner_products_match_numerical_integration():
    def profile(t, gamma, tau):
        return np.where(tau <= t, (gamma + 1) * tau**gamma / t ** (gamma + 1), 0.0)

    tau = np.linspace(0, 7, 2_000_001)[1:]
    for t_a, g_a, t_b, g_b in ((3.0, 6.9, 7.0, 17.0), (7.0, 2.0, 3.0, 4.5), (5.0, 6.9, 5.0, 6.9)):
        numeric = np.trapezoid(profile(t_a, g_a, tau) * profile(t_b, g_b, tau), tau)
        assert profile_dot(t_a, g_a, t_b, g_b) == pytest.approx(numeric, rel=1e-4)


def toy_run(sigma_rels, steps=3000, every=150, batch=4, dim=6, seed=0):
    """A parameter that drifts and oscillates, with noise, averaged by PowerEMA; snapshots in memory."""
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Linear(dim, 1, bias=False)
    ema = PowerEMA(model, sigma_rels)
    frequencies = torch.rand(dim, generator=g) * 6 + 1
    stored = []
    for step in range(1, steps + 1):
        u = step / steps
        with torch.no_grad():
            model.weight.copy_((torch.sin(frequencies * u) + 2 * u + 0.3 * torch.randn(dim, generator=g))[None])
        ema.update(model, step * batch, batch)
        if step % every == 0:
            stored.append((step * batch, [m.weight.detach().double().clone() for m in ema.models]))
    return stored


def combine(stored, sigma_rels, x):
    weights = [w for _, per_profile in stored for w in per_profile]
    return sum(c * w for c, w in zip(x, weights))


def test_the_solve_matches_a_brute_force_ema_on_a_toy_parameter_sequence():
    stored = toy_run((0.05, 0.10))
    times = [t for t, ws in stored for _ in ws]
    rels = [r for _ in stored for r in (0.05, 0.10)]
    for target in (0.03, 0.075, 0.15):
        x = solve_coefficients(times, rels, [stored[-1][0]], [target])[:, 0]
        reconstructed = combine(stored, (0.05, 0.10), x)
        brute = toy_run((target,))[-1][1][0]
        spread = (toy_run((0.05,))[-1][1][0] - toy_run((0.20,))[-1][1][0]).abs().max()
        assert (reconstructed - brute).abs().max() < 0.05 * spread, target


def test_reconstructing_a_stored_profile_returns_it():
    stored = toy_run((0.05, 0.10), steps=600, every=100)
    times = [t for t, ws in stored for _ in ws]
    rels = [r for _ in stored for r in (0.05, 0.10)]
    for which, rel in enumerate((0.05, 0.10)):
        x = solve_coefficients(times, rels, [stored[-1][0]], [rel])[:, 0]
        assert torch.allclose(combine(stored, (0.05, 0.10), x), stored[-1][1][which], atol=1e-6)


def test_the_update_is_the_power_function_average_and_starts_as_a_copy():
    assert power_beta(6.94, 8, 8) == 0.0
    model = torch.nn.Linear(2, 1, bias=False)
    ema = PowerEMA(model, (0.1,))
    gamma = sigma_rel_to_gamma(0.1)
    values = torch.arange(1.0, 41.0)
    for t, v in enumerate(values, start=1):
        with torch.no_grad():
            model.weight.fill_(float(v))
        ema.update(model, t, 1)
    # (1 - 1/t)^(gamma+1) products telescope: the weight of step tau is prod... = the discrete power profile
    weights = torch.tensor([(1 - power_beta(gamma, tau, 1)) * math.prod(power_beta(gamma, s, 1) for s in
                                                                       range(tau + 1, 41)) for tau in range(1, 41)],
                           dtype=torch.float64)
    assert weights.sum().item() == pytest.approx(1.0, abs=1e-9)
    assert ema.models[0].weight[0, 0].item() == pytest.approx((weights * values.double()).sum().item(), rel=1e-5)


def test_the_trainer_stores_snapshots_that_resume_exactly_and_export(tmp_path, capsys):
    from test_hostile_input import COMMON, make_folder

    from encdiff import Autoencoder
    from encdiff.cli import main
    from encdiff.training import TrainConfig, train_autoencoder, export_run

    data = make_folder(tmp_path / "data")
    base = dict(data=str(data), checkpoint_every=2, phema_every=2, phema_sigma_rels=(0.05, 0.10), **COMMON)
    train_autoencoder(TrainConfig(run_dir=str(tmp_path / "whole"), steps=6, **base))
    train_autoencoder(TrainConfig(run_dir=str(tmp_path / "split"), steps=4, **base))
    train_autoencoder(TrainConfig(run_dir=str(tmp_path / "split"), steps=6, **base))  # resumed at step 4
    whole, split = snapshots(tmp_path / "whole"), snapshots(tmp_path / "split")
    assert [s[1] for s in whole] == [16, 32, 48] and [s[2] for s in whole] == [(0.05, 0.10)] * 3
    from safetensors.torch import load_file

    assert [s[1:] for s in whole] == [s[1:] for s in split]
    for (a, _, _), (b, _, _) in zip(whole, split):
        ta, tb = load_file(str(a)), load_file(str(b))
        assert sorted(ta) == sorted(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)
    # the run's early states by fraction of its length (snapshots at 16, 32, 48 images = steps 2, 4, 6)
    assert [snapshot_nearest(tmp_path / "whole", f) for f in (0.1, 0.375, "0.6", 0.9, 1)] == [2, 2, 4, 6, 6]
    for bad in (0, 1.5, "half", math.nan):
        with pytest.raises(EncdiffError, match="snapshot fraction"):
            snapshot_nearest(tmp_path / "whole", bad)
    with pytest.raises(EncdiffError, match="no post-hoc EMA snapshots"):
        snapshot_nearest(tmp_path / "data", 0.5)
    state, record = reconstruct(tmp_path / "whole", 0.07)
    assert record["images"] == 48 and record["fit_error"] < 0.05
    out = export_run(tmp_path / "whole", tmp_path / "exported", sigma_rel=0.07)
    exported = Autoencoder.from_pretrained(out).state_dict()
    assert all(torch.equal(exported[k], v) for k, v in state.items() if k in exported)
    assert main(["posthoc-ema", str(tmp_path / "whole"), "--sigma-rel", "0.05", "0.12", "--out",
                 str(tmp_path / "ph")]) == 0
    assert sorted(p.name for p in (tmp_path / "ph").iterdir()) == ["sigma-rel-0.05", "sigma-rel-0.12"]
    capsys.readouterr()
    assert main(["posthoc-ema", str(tmp_path / "data"), "--sigma-rel", "0.1"]) == 2
    assert "no post-hoc EMA snapshots" in capsys.readouterr().err
    assert main(["posthoc-ema", str(tmp_path / "whole"), "--sigma-rel", "0.5"]) == 2
    assert "--sigma-rel = 0.5" in capsys.readouterr().err
