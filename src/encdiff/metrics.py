"""The metrics' maths, on features and images already at hand (evaluate.py runs them):

- FID, Fréchet distance between Gaussians fitted to features (Heusel et al. 2017, "GANs trained by a two
  time-scale update rule converge to a local Nash equilibrium").
- KID, unbiased squared MMD with the cubic polynomial kernel, mean +- std over random subsets
  (Bińkowski et al. 2018, "Demystifying MMD GANs").
- Precision and recall from k-NN manifolds, k = 3 (Kynkäänniemi et al. 2019, "Improved precision and
  recall metric for assessing generative models").
- Negative log-likelihood in bits/dim from the variational bound L_vlb with the discretised Gaussian
  decoder (Ho et al. 2020, "Denoising diffusion probabilistic models", eq. 5 and sec. 3.3).
- PSNR and SSIM (Wang et al. 2004) of reconstructions, through torchmetrics.

Why our own FID/KID/P&R rather than torchmetrics' classes: one feature pass feeds all three metrics, and FID's
matrix square root uses a symmetric eigendecomposition in float64 (exact for the PSD matrices involved, never
complex, no scipy). The tests check both against torchmetrics' FID and KID.
"""

from __future__ import annotations

import math

import torch

from .errors import EncdiffError, count

KID_SUBSET_SIZE = 1000  # Bińkowski et al.'s default; smaller sets use all their images per subset
KID_SUBSETS = 100
PR_K = 3  # Kynkäänniemi et al.'s recommended neighbourhood size



# --- FID -----------------------------------------------------------------------------------------------
def min_images_for_fid(feature_dim: int) -> int:
    # Below D + 1 images the covariance is singular and FID mostly measures the sample size, not quality.
    return feature_dim + 1


def gaussian_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased covariance, in float64: float32 sums over 10^4-10^5 samples lose the digits
    that the small FIDs between similar sets are made of."""
    f = features.double()
    mu = f.mean(0)
    centred = f - mu
    return mu, centred.T @ centred / (len(f) - 1)


def sqrtm_psd(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), in float64.

    tr (S1 S2)^(1/2) = tr (S1^(1/2) S2 S1^(1/2))^(1/2): the right side is a symmetric PSD matrix, so its
    square root's trace is the sum of sqrt(eigenvalues) from eigvalsh, real and exact up to rounding
    (scipy's general sqrtm on the non-symmetric S1 S2 can return complex parts that must be discarded)."""
    mu1, mu2, sigma1, sigma2 = (t.double() for t in (mu1, mu2, sigma1, sigma2))
    root1 = sqrtm_psd(sigma1)
    inner = root1 @ sigma2 @ root1
    trace_sqrt = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp(min=0).sqrt().sum()
    value = (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt
    return max(float(value), 0.0)


# --- KID -----------------------------------------------------------------------------------------------
def kid(real: torch.Tensor, fake: torch.Tensor, subsets: int = KID_SUBSETS, subset_size: int = KID_SUBSET_SIZE,
        seed: int = 0) -> tuple[float, float]:
    """Kernel inception distance: mean and std over `subsets` random subsets of the unbiased MMD^2 estimate
    with k(x, y) = (x.y / d + 1)^3. Unbiased: the diagonal k(x_i, x_i) is left out of the within-set sums,
    so a model equal to the data scores 0 in expectation at any sample size (FID is biased upwards for small N)."""
    m = min(subset_size, len(real), len(fake))
    if m < 2:
        raise EncdiffError(f"KID needs at least 2 images per set; got {len(real)} reference and {count(len(fake), 'sample')}")
    g = torch.Generator().manual_seed(seed)
    d = real.shape[1]
    values = []
    for _ in range(subsets):
        x = real[torch.randperm(len(real), generator=g)[:m]].double()
        y = fake[torch.randperm(len(fake), generator=g)[:m]].double()
        kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        off = m * (m - 1)
        mmd = (kxx.sum() - kxx.diagonal().sum()) / off + (kyy.sum() - kyy.diagonal().sum()) / off \
            - 2 * kxy.mean()
        values.append(float(mmd))
    values_t = torch.tensor(values, dtype=torch.float64)
    return float(values_t.mean()), float(values_t.std()) if subsets > 1 else 0.0


# --- precision / recall --------------------------------------------------------------------------------
def _kth_neighbour_radii(features: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    radii = []
    for s in range(0, len(features), chunk):
        dist = torch.cdist(features[s:s + chunk], features)
        # the k+1-th smallest: the nearest one is the point itself (distance 0)
        radii.append(dist.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def _inside_manifold(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    inside = []
    for s in range(0, len(points), chunk):
        dist = torch.cdist(points[s:s + chunk], centres)
        inside.append((dist <= radii[None, :]).any(dim=1))
    return torch.cat(inside)


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = PR_K) -> tuple[float, float]:
    """Precision: the fraction of samples inside the real manifold (the union of balls around each real
    feature reaching its k-th nearest real neighbour); recall: the fraction of real features inside the
    sample manifold. Distances in float64 so identical points are at distance exactly 0."""
    if len(real) <= k or len(fake) <= k:
        raise EncdiffError(f"precision/recall with k = {k} needs more than {k} images per set; got "
                           f"{len(real)} reference and {count(len(fake), 'sample')}")
    real, fake = real.double(), fake.double()
    precision = _inside_manifold(fake, real, _kth_neighbour_radii(real, k)).double().mean()
    recall = _inside_manifold(real, fake, _kth_neighbour_radii(fake, k)).double().mean()
    return float(precision), float(recall)


# --- reconstructions -----------------------------------------------------------------------------------
SSIM_CHUNK_VALUES = 256 * 3 * 32 * 32  # pixel values per SSIM chunk: its float64 window statistics take ~1.6 GB


def psnr_from_mse(mse: torch.Tensor, values: int) -> torch.Tensor:
    """PSNR (dB) of uint8 images, data range 255, from their mean squared errors over `values` pixel values each.
    A perfect match counts as the smallest error uint8 can show, one value one level off (MSE 1 / values): its PSNR
    would otherwise be infinite, and a single such image (an opaque image's alpha channel, which a clamped decoder
    often gets exactly) would make the mean over thousands infinite."""
    return 10 * torch.log10(255.0 ** 2 / mse.double().clamp_min(1.0 / values))


def psnr_ssim(reconstructions: torch.Tensor, targets: torch.Tensor, chunk: int | None = None) -> tuple[float, float]:
    """Mean per-image PSNR (dB; `psnr_from_mse`) and SSIM (11x11 Gaussian window, sigma 1.5, via torchmetrics) of
    uint8 images, in chunks of `chunk` images (default: as many as keep the memory bounded whatever the size)."""
    try:
        from torchmetrics.functional.image import structural_similarity_index_measure
    except ImportError:
        raise EncdiffError("PSNR/SSIM need torchmetrics: pip install 'encdiff[eval]'") from None
    if reconstructions.shape != targets.shape:
        raise EncdiffError(f"reconstructions have shape {tuple(reconstructions.shape)}, targets "
                           f"{tuple(targets.shape)}")
    psnr, ssim = [], []
    # Per-image values, in chunks: SSIM's float64 window statistics take ~5 MB per 32x32x3 image, 4x that at 64x64.
    chunk = chunk or max(1, SSIM_CHUNK_VALUES // max(1, targets[0].numel()))
    for s in range(0, len(targets), chunk):
        x, y = reconstructions[s:s + chunk].double(), targets[s:s + chunk].double()
        psnr.append(psnr_from_mse((x - y).square().flatten(1).mean(1), targets[0].numel()))
        ssim.append(structural_similarity_index_measure(x, y, data_range=255.0, reduction="none"))
    return float(torch.cat(psnr).mean()), float(torch.cat(ssim).mean())


# --- likelihood ----------------------------------------------------------------------------------------
def _approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log P(x) per element for 8-bit data scaled to [-1, 1] (bins of width 2/255) under N(mean, exp(log_scale)^2),
    the edge bins extended to -inf / +inf (Ho et al. 2020, eq. 13)."""
    centred = x - mean
    inv = torch.exp(-log_scale)
    cdf_plus = _approx_standard_normal_cdf(inv * (centred + 1 / 255))
    cdf_minus = _approx_standard_normal_cdf(inv * (centred - 1 / 255))
    log_cdf_plus = cdf_plus.clamp(min=1e-300).log()
    log_one_minus_cdf_minus = (1 - cdf_minus).clamp(min=1e-300).log()
    delta = (cdf_plus - cdf_minus).clamp(min=1e-300)
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_minus, delta.log()))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) per element, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def vp_alpha_bars(denoiser) -> torch.Tensor:
    sigmas = denoiser.train_sigmas.double()
    return 1 / (1 + sigmas**2)


@torch.inference_mode()
def bits_per_dim(denoiser, x0: torch.Tensor, *, class_labels: torch.Tensor | None = None, variance: str = "small",
                 timesteps: int | None = None, seed: int = 0, clip_denoised: bool = True) -> dict:
    """The variational bound -log p(x0) <= L_T + sum_{t>=2} L_{t-1} + L_0 (Ho et al. 2020, eq. 5) per image,
    in bits per dimension, for a discrete VP model (`VPDenoiser`) on pixels x0 in [-1, 1] (8-bit values).

    p(x_{t-1} | x_t) = N(posterior mean given the model's x0 estimate, fixed variance): `variance` "small"
    uses the posterior variance beta~_t, "large" uses beta_t (the two choices of Ho et al. sec. 3.2); at t = 1
    both use beta~_2 as log beta~_1 = -inf (as in Nichol & Dhariwal's code). L_0 is the discretised Gaussian
    decoder. `timesteps`: None sums all T terms (the exact bound, T network calls per image); an integer K
    draws K timesteps uniformly per image and scales their sum by (T-1)/K (an unbiased estimate, K calls).
    Returns per-image totals and the mean of each term, in bits/dim."""
    if variance not in ("small", "large"):
        raise EncdiffError(f"variance = {variance!r}; valid: small (beta tilde), large (beta)")
    ab = vp_alpha_bars(denoiser).to(x0.device)
    T = len(ab)
    ab_prev = torch.cat([torch.ones(1, dtype=ab.dtype, device=ab.device), ab[:-1]])
    betas = 1 - ab / ab_prev
    post_var = betas * (1 - ab_prev) / (1 - ab)
    post_var_clipped = torch.cat([post_var[1:2], post_var[1:]])
    log_var = (post_var_clipped if variance == "small" else torch.cat([post_var[1:2], betas[1:]])).log()
    coef_x0 = betas * ab_prev.sqrt() / (1 - ab)
    coef_xt = (1 - ab_prev) * (1 - betas).sqrt() / (1 - ab)
    x0 = x0.double()
    B = x0.shape[0]
    dims = x0[0].numel()
    g = torch.Generator(device=x0.device).manual_seed(seed)
    log2 = math.log(2.0)

    shape = (B,) + (1,) * (x0.ndim - 1)

    def model_mean(xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The mean of p(x_{t-1} | x_t) for per-image timesteps t (B,)."""
        # float64 sigma so that sigma -> t lands exactly on the integer training step t; the denoiser takes the
        # variance-exploding scaling x = x_t / sqrt(alpha_bar_t) and casts to the network's dtype itself.
        sigma = denoiser.train_sigmas.to(x0.device)[t]
        x0_hat = denoiser(xt / ab[t].sqrt().view(shape), sigma, class_labels).double()
        if clip_denoised:
            x0_hat = x0_hat.clamp(-1, 1)
        return coef_x0[t].view(shape) * x0_hat + coef_xt[t].view(shape) * xt

    def noisy(t: torch.Tensor) -> torch.Tensor:
        eps = torch.randn(x0.shape, generator=g, device=x0.device, dtype=torch.float64)
        return ab[t].sqrt().view(shape) * x0 + (1 - ab[t]).sqrt().view(shape) * eps

    def per_image_bits(nats: torch.Tensor) -> torch.Tensor:
        return nats.flatten(1).sum(1) / (dims * log2)

    # L_T: KL(q(x_T | x0) || N(0, I)), no network involved
    prior = per_image_bits(normal_kl(ab[-1].sqrt() * x0, (1 - ab[-1]).log().expand_as(x0), torch.zeros_like(x0),
                                     torch.zeros_like(x0)))
    # L_0 = -log p(x0 | x1): the t = 0 step (DDPM's t = 1), a discretised Gaussian around the model mean
    zero = torch.zeros(B, dtype=torch.long, device=x0.device)
    decoder = -per_image_bits(discretized_gaussian_log_likelihood(x0, model_mean(noisy(zero), zero),
                                                                  0.5 * log_var[0]))
    # L_{t-1} = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) for t = 1 .. T-1 (0-based): every t, or K draws
    # of t per image (independent across images, so the batch mean averages over timesteps too)
    t_gen = torch.Generator().manual_seed(seed + 1)
    rounds = T - 1 if timesteps is None else timesteps
    scale = 1.0 if timesteps is None else (T - 1) / timesteps
    diffusion = torch.zeros(B, dtype=torch.float64, device=x0.device)
    for r in range(rounds):
        t = (zero + r + 1) if timesteps is None else torch.randint(1, T, (B,), generator=t_gen).to(x0.device)
        xt = noisy(t)
        true_mean = coef_x0[t].view(shape) * x0 + coef_xt[t].view(shape) * xt
        kl = normal_kl(true_mean, post_var[t].log().view(shape), model_mean(xt, t), log_var[t].view(shape))
        diffusion += scale * per_image_bits(kl)
    total = prior + diffusion + decoder
    return {"bits_per_dim": float(total.mean()), "bits_per_dim_std_err": float(total.std() / math.sqrt(B)) if B > 1
            else None, "prior_bpd": float(prior.mean()), "diffusion_bpd": float(diffusion.mean()),
            "decoder_bpd": float(decoder.mean()), "per_image": total,
            "settings": {"variance": variance, "timesteps": "all" if timesteps is None else timesteps,
                         "num_train_timesteps": T, "clip_denoised": clip_denoised, "seed": seed,
                         "num_images": B}}


