"""Accuracy of each deterministic sampler for a budget of model evaluations (NFE).

For every case (a denoiser, a sigma grid and a reference image) prints a markdown table of the RMS
error of the final image against the reference at 5, 10, 20 and 50 NFE. Heun spends 2 NFE per step
but 1 on the last (its step into sigma = 0 is Euler), so it gets (NFE + 1) // 2 steps; the table gives
its actual NFE in brackets when it differs. Everything runs in float64, so the numbers are
discretisation error, not rounding.

Cases:
  gaussian-edm   exact denoiser of per-pixel Gaussian data, EDM range sigma in [0.002, 80], Karras grid;
                 reference: the closed-form solution of the probability-flow ODE.
  gaussian-vp    the same data through a discrete VP eps-prediction model (Stable Diffusion's
                 scaled-linear schedule, sigma in [0.029, 14.6]), on the Karras and the linspace grids;
                 reference: closed form.
  random-net     a small fixed random conv net under EDM preconditioning (a stand-in for a trained
                 model: nonlinear, no closed form); reference: Heun with 1000 steps.

Usage: PYTHONPATH=src python benchmarks/sampler_accuracy.py [--cases gaussian-edm,gaussian-vp,random-net]
"""

import argparse
import math
import types

import torch

from encdiff.denoiser import EDMDenoiser, GaussianDenoiser, VPDenoiser
from encdiff.samplers import SAMPLERS, noise
from encdiff.schedules import alpha_bars_scaled_linear, get_sigmas

NFES = (5, 10, 20, 50)
DETERMINISTIC = ("euler", "heun", "dpmpp_2m", "dpmpp_3m")  # ddim (eta = 0) is the Euler update
SHAPE = (8, 3, 16, 16)


def steps_for(sampler, nfe):
    return (nfe + 1) // 2 if sampler == "heun" else nfe


def nfe_of(sampler, steps):
    return 2 * steps - 1 if sampler == "heun" else steps


def gaussian_data():
    g = torch.Generator().manual_seed(1)
    mu = torch.randn(SHAPE[1:], generator=g, dtype=torch.float64) * 0.5
    s = 0.1 + 0.9 * torch.rand(SHAPE[1:], generator=g, dtype=torch.float64)
    return GaussianDenoiser(mu, s)


class VPEpsOf(torch.nn.Module):
    """The eps-prediction network whose VP denoiser is exactly a given denoiser (the ideal one here)."""

    config = types.SimpleNamespace(num_classes=0, null_class=False)

    def __init__(self, exact):
        super().__init__()
        self.exact = exact

    def forward(self, x_t, t, class_labels=None):
        sigma = self.vp.t_to_sigma(t.double())
        x = x_t * (1 + sigma**2).sqrt().reshape(-1, 1, 1, 1)
        return (x - self.exact(x, sigma)) / sigma.reshape(-1, 1, 1, 1)


def random_net():
    g = torch.Generator().manual_seed(1234)
    conv1, conv2 = torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.Conv2d(32, 3, 3, padding=1)
    with torch.no_grad():
        for p in [*conv1.parameters(), *conv2.parameters()]:
            p.copy_(torch.randn(p.shape, generator=g) * 0.15)

    class Net(torch.nn.Module):
        config = types.SimpleNamespace(num_classes=0, null_class=False)

        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = conv1, conv2

        def forward(self, x, noise_labels, class_labels=None):
            h = torch.nn.functional.silu(self.conv1(x) + torch.sin(noise_labels).reshape(-1, 1, 1, 1))
            return self.conv2(h)

    return Net().double()


def cases(names):
    """(title, denoiser, schedule, x_T, reference) for each requested case."""
    x_unit = noise(SHAPE, torch.Generator().manual_seed(0), torch.float64)
    if "gaussian-edm" in names:
        exact = gaussian_data()
        x_T = x_unit * exact.sigma_max
        reference = exact.ode_solution(x_T, exact.sigma_max, 0.0)
        yield "Gaussian data, EDM (sigma 0.002..80), Karras rho=7", exact, "karras", x_T, reference
    if "gaussian-vp" in names:
        exact = gaussian_data()
        net = VPEpsOf(exact)
        vp = VPDenoiser(net, alpha_bars_scaled_linear(), "epsilon")
        net.vp = vp
        for schedule in ("karras", "linspace"):
            x_T = x_unit * vp.sigma_max
            reference = exact.ode_solution(x_T, vp.sigma_max, 0.0)
            title = f"Gaussian data, VP eps-prediction (scaled-linear, sigma 0.029..14.6), {schedule}"
            yield title, vp, schedule, x_T, reference
    if "random-net" in names:
        denoiser = EDMDenoiser(random_net())
        x_T = x_unit * denoiser.sigma_max
        with torch.no_grad():
            reference = SAMPLERS["heun"](denoiser, x_T, get_sigmas("karras", 1000, denoiser))
        yield "Random conv net, EDM, Karras rho=7 (reference: Heun, 1000 steps)", denoiser, "karras", x_T, reference


def rms(a):
    return a.square().mean().sqrt().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default="gaussian-edm,gaussian-vp,random-net")
    names = parser.parse_args().cases.split(",")
    print(f"RMS error of the final image vs the reference; batch {SHAPE}, float64.\n")
    for title, denoiser, schedule, x_T, reference in cases(names):
        print(f"### {title}\n")
        print(f"reference RMS {rms(reference):.3f}\n")
        print("| sampler | " + " | ".join(f"NFE {nfe}" for nfe in NFES) + " |")
        print("|---" * (len(NFES) + 1) + "|")
        for sampler in DETERMINISTIC:
            cells = []
            for nfe in NFES:
                steps = steps_for(sampler, nfe)
                with torch.no_grad():
                    x = SAMPLERS[sampler](denoiser, x_T, get_sigmas(schedule, steps, denoiser))
                error = rms(x - reference)
                actual = nfe_of(sampler, steps)
                cell = f"{error:.2e}" if math.isfinite(error) else "diverged"
                cells.append(cell + (f" ({actual})" if actual != nfe else ""))
            print(f"| {sampler} | " + " | ".join(cells) + " |")
        print()


if __name__ == "__main__":
    main()
