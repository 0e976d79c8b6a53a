"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", EDM2,
sec. 3 and appendix C): the averaging length is chosen after training instead of guessed before it.

During training a few *power-function* EMA profiles are tracked (EDM2 eq. 2): the average at time t weighs the
weights of time tau by tau^gamma,

    theta_hat(t) = integral_0^t p_t(tau) theta(tau) dtau,    p_t(tau) = (gamma + 1) tau^gamma / t^(gamma + 1),

kept by the update theta_hat <- beta theta_hat + (1 - beta) theta with beta = (1 - dt / t)^(gamma + 1) (EDM2
app. C.1; t and dt in training images). The width of a profile relative to t, sigma_rel, is what one chooses
(eq. 3): sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)). Snapshots of every profile are stored at an
interval; after training, the EMA of any sigma_rel at any time is the least-squares combination of the stored
snapshots whose profiles best fit its profile (app. C.2: solve A x = b with A_ij = <p_i, p_j> and b_i = <p_i, p>,
the inner products in closed form below), and so the same combination of their weights.

Everything here is float64 and free of torch's state, except the small `PowerEMA` that the trainer updates.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .checkpoint import atomic_save_tensors, check_state_dict
from .ema import AveragedCopy
from .errors import EncdiffError, count, is_finite_number

SIGMA_REL_MAX = 1 / math.sqrt(12)  # sigma_rel of gamma = 0 (a plain running mean); longer profiles do not exist
SNAPSHOT_DIR = "phema"  # inside the run folder: snapshot-<step>.safetensors
SNAPSHOT_FORMAT = "encdiff-phema-snapshot"


def check_sigma_rel(sigma_rel: float, name: str = "sigma_rel") -> float:
    if not (is_finite_number(sigma_rel) and 0 < sigma_rel < SIGMA_REL_MAX):
        raise EncdiffError(f"{name} = {sigma_rel!r}: expected a number in (0, {SIGMA_REL_MAX:.4f}) (EDM2 uses "
                           "0.05 and 0.10 for its stored profiles)")
    return float(sigma_rel)


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The power-function exponent of a relative width (EDM2 eq. 3 solved for gamma: the largest real root of
    gamma^3 + 7 gamma^2 + (16 - t) gamma + (12 - t) with t = sigma_rel^-2)."""
    t = check_sigma_rel(sigma_rel) ** -2
    return float(np.roots([1, 7, 16 - t, 12 - t]).real.max())


def gamma_to_sigma_rel(gamma: float) -> float:
    """EDM2 eq. 3: sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def power_beta(gamma: float, t: float, dt: float) -> float:
    """The weight kept by a power-function EMA in the update that brings the time (images seen) to t after a step of
    dt images (EDM2 app. C.1): (1 - dt / t)^(gamma + 1); 0 at the first step, which copies the weights."""
    return (1 - dt / t) ** (gamma + 1)


def profile_dot(t_a, gamma_a, t_b, gamma_b) -> np.ndarray:
    """<p_a, p_b>, the integral over tau of two power-function profiles p_{t, gamma}(tau) (EDM2 app. C.2), in closed
    form: (gamma_a + 1)(gamma_b + 1) / (gamma_a + gamma_b + 1) * (t_min / t_max)^(gamma of the longer) / t_max.
    Broadcasts over arrays."""
    t_a, gamma_a, t_b, gamma_b = (np.asarray(v, dtype=np.float64) for v in (t_a, gamma_a, t_b, gamma_b))
    ratio = t_a / t_b
    exponent = np.where(t_a < t_b, gamma_b, -gamma_a)
    return ((gamma_a + 1) * (gamma_b + 1) * ratio**exponent) / ((gamma_a + gamma_b + 1) * np.maximum(t_a, t_b))


def profile_products(in_t, in_sigma_rel, out_t, out_sigma_rel) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A_ij = <p_i, p_j> among the stored profiles, b_ij = <p_i, q_j> with the wanted ones, and <q_j, q_j>."""
    in_t, out_t = np.asarray(in_t, np.float64).ravel(), np.asarray(out_t, np.float64).ravel()
    in_gamma = np.array([sigma_rel_to_gamma(s) for s in np.ravel(in_sigma_rel)])
    out_gamma = np.array([sigma_rel_to_gamma(s) for s in np.ravel(out_sigma_rel)])
    if len(in_t) != len(in_gamma) or len(out_t) != len(out_gamma):
        raise EncdiffError("one time per profile: the stored times and widths (and the wanted ones) must pair up")
    A = profile_dot(in_t[:, None], in_gamma[:, None], in_t[None, :], in_gamma[None, :])
    b = profile_dot(in_t[:, None], in_gamma[:, None], out_t[None, :], out_gamma[None, :])
    return A, b, profile_dot(out_t, out_gamma, out_t, out_gamma)


def solve_coefficients(in_t, in_sigma_rel, out_t, out_sigma_rel) -> np.ndarray:
    """The least-squares weights (len(in) x len(out)) that make the stored profiles (times in_t, widths
    in_sigma_rel) best fit each wanted profile (out_t, out_sigma_rel): x = A^-1 b (EDM2 app. C.2, eq. 63)."""
    A, b, _ = profile_products(in_t, in_sigma_rel, out_t, out_sigma_rel)
    # lstsq rather than solve: two profiles that are nearly the same make A nearly singular.
    return np.linalg.lstsq(A, b, rcond=None)[0]


class PowerEMA:
    """Power-function EMAs of a model's weights, one per sigma_rel (EDM2 eq. 2 and app. C.1), kept by the trainer
    beside its ordinary EMA. `models[i]` is a deep copy in eval mode without grad."""

    def __init__(self, model: nn.Module, sigma_rels: tuple[float, ...]):
        if not sigma_rels:
            raise EncdiffError("post-hoc EMA needs at least one sigma_rel to track (EDM2: 0.05 and 0.10)")
        self.sigma_rels = tuple(check_sigma_rel(s, "phema_sigma_rels") for s in sigma_rels)
        self.gammas = tuple(sigma_rel_to_gamma(s) for s in self.sigma_rels)
        self._averages = [AveragedCopy(model) for _ in self.sigma_rels]
        self.models = [average.model for average in self._averages]

    @torch.no_grad()
    def update(self, model: nn.Module, images_seen: int, batch_images: int) -> None:
        """After an optimizer step; `images_seen` includes this batch (global). Buffers are copied."""
        if batch_images < 1 or images_seen < batch_images:
            raise EncdiffError(f"post-hoc EMA update with images_seen = {images_seen!r}, batch_images = "
                               f"{batch_images!r}: expected 1 <= batch_images <= images_seen")
        for gamma, average in zip(self.gammas, self._averages):
            average.lerp_(model, 1.0 - power_beta(gamma, images_seen, batch_images))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every profile's weights as `{i}.{name}`: the checkpoint's part (exact resume)."""
        return {f"{i}.{k}": v for i, ema in enumerate(self.models) for k, v in ema.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for i, ema in enumerate(self.models):
            part = {k[len(f"{i}."):]: v for k, v in state.items() if k.startswith(f"{i}.")}
            check_state_dict(ema, part, f"post-hoc EMA profile {i} (sigma_rel {self.sigma_rels[i]})")
            ema.load_state_dict(part)

    def save_snapshot(self, run_dir: str | Path, step: int, images_seen: int) -> Path:
        """Write run_dir/phema/snapshot-<step>.safetensors (float32, atomically): every profile's weights with the
        time they were taken at. A resumed run rewrites a snapshot it redoes with the same tensors."""
        path = Path(run_dir) / SNAPSHOT_DIR / f"snapshot-{step:08d}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().float().contiguous().cpu() for k, v in self.state_dict().items()}
        metadata = {"format": SNAPSHOT_FORMAT, "step": str(step), "images_seen": str(images_seen),
                    "sigma_rels": ",".join(repr(s) for s in self.sigma_rels)}
        atomic_save_tensors(tensors, path, metadata=metadata)
        return path


def snapshots(run_dir: str | Path) -> list[tuple[Path, int, tuple[float, ...]]]:
    """The run's stored snapshots, oldest first: (file, images seen, sigma_rels), each file's header checked."""
    from safetensors import safe_open

    folder = Path(run_dir) / SNAPSHOT_DIR
    found = []
    for path in sorted(folder.glob("snapshot-*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            if meta.get("format") != SNAPSHOT_FORMAT:
                raise ValueError(f"format {meta.get('format')!r}")
            images = int(meta["images_seen"])
            sigma_rels = tuple(float(s) for s in meta["sigma_rels"].split(","))
        except Exception as e:  # a truncated or foreign file: named, never half-used
            raise EncdiffError(f"{path}: not a post-hoc EMA snapshot ({type(e).__name__}: {e})") from None
        if images < 1:
            raise EncdiffError(f"{path}: images_seen {images}: expected at least 1")
        found.append((path, images, sigma_rels))
    return found


def snapshot_nearest(run_dir: str | Path, fraction: float | str) -> int:
    """The step of the run's snapshot taken nearest `fraction` of the way to its newest (in images): the run as it
    stood early on, to export with `encdiff export RUN OUT --sigma-rel S --at-step N` (autoguidance's guide, EDM2's
    own-early-state variant)."""
    try:
        value = float(fraction)
    except ValueError:
        value = math.nan
    if not (is_finite_number(value) and 0 < value <= 1):
        raise EncdiffError(f"snapshot fraction {fraction!r}: expected a number in (0, 1]")
    stored = snapshots(run_dir)
    if not stored:
        raise EncdiffError(f"{Path(run_dir) / SNAPSHOT_DIR}: no post-hoc EMA snapshots (train with phema_every > 0)")
    path = min(stored, key=lambda s: abs(s[1] - value * stored[-1][1]))[0]
    return int(path.stem[len("snapshot-"):])


def reconstruct(run_dir: str | Path, sigma_rel: float, images: int | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The EMA of width `sigma_rel` at `images` (default: the newest snapshot's time) from the run's snapshots up to
    then, as a state dict, and what was used (for the record): {"sigma_rel", "images", "snapshots", "fit_error"}.

    fit_error is the relative L2 distance between the wanted profile and its reconstruction,
    ||p - sum_i x_i p_i|| / ||p||: near 0 when the stored profiles span it, large when sigma_rel is far outside them
    or there are too few snapshots."""
    from safetensors.torch import load_file

    check_sigma_rel(sigma_rel)
    stored = snapshots(run_dir)
    if images is not None:
        stored = [s for s in stored if s[1] <= images]
    if not stored:
        raise EncdiffError(f"{Path(run_dir) / SNAPSHOT_DIR}: no post-hoc EMA snapshots"
                           + (f" up to {images} images" if images is not None else "")
                           + " (train with phema_every > 0 to store them)")
    target = stored[-1][1] if images is None else images
    in_t = [t for _, t, rels in stored for _ in rels]
    in_rel = [r for _, _, rels in stored for r in rels]
    A, b, qq = profile_products(in_t, in_rel, [target], [sigma_rel])
    x = np.linalg.lstsq(A, b, rcond=None)[0][:, 0]
    pp = float(qq[0])
    # ||q - sum_i x_i p_i||^2 = <q, q> - 2 x.b + x.A.x
    residual = max(pp - 2 * float(x @ b[:, 0]) + float(x @ A @ x), 0.0)
    state: dict[str, torch.Tensor] = {}
    k = 0
    for path, _, rels in stored:
        tensors = load_file(str(path))
        for i in range(len(rels)):
            part = {name[len(f"{i}."):]: v.double() for name, v in tensors.items() if name.startswith(f"{i}.")}
            if state and set(part) != set(state):
                raise EncdiffError(f"{path}: profile {i} holds other tensors than the earlier snapshots")
            for name, v in part.items():
                state[name] = state[name] + x[k] * v if name in state else x[k] * v
            k += 1
    record = {"sigma_rel": sigma_rel, "images": target, "snapshots": count(len(stored), "snapshot"),
              "fit_error": math.sqrt(residual / pp)}
    return {name: v.float() for name, v in state.items()}, record
