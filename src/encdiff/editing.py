"""Editing real images through the encoder: img2img, inpainting, ODE inversion, class swap and interpolation.

Every edit starts from `Generator.encode` (the autoencoder's posterior mean; the identity for pixel models) and
ends with `Generator.decode`, and runs the generator's own samplers over its own sigma grid:

- img2img (SDEdit, Meng et al. 2022, "SDEdit: Guided Image Synthesis and Editing with Stochastic Differential
  Equations", sec. 3): the latent is noised to sigma_{t_start} and the last min(int(steps * strength), steps) steps
  of the grid are run, with diffusers' meaning of `strength` (t_start = steps - that many).
- Inpainting: at every step the known region of the model's input is replaced by the noised encoding of the image at
  that step's noise level, x <- m * x + (1 - m) * (z0 + sigma * eps) (the replacement method of Song et al. 2021,
  "Score-Based Generative Modeling through SDEs", app. I.2); RePaint resampling (Lugmayr et al. 2022, Alg. 1)
  re-noises each step's result back to its start `resample - 1` more times. The unmasked pixels are pasted back at
  the end, so they equal the input exactly.
- Inversion: the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma (EDM eq. 3) integrated upwards from
  sigma_min to sigma_max (DDIM inversion, Song et al. 2021a sec. 4.3; Mokady et al. 2023), unguided; regenerating from
  the result under another class is a class swap.
- Interpolation: spherical interpolation (Shoemake 1985) of Gaussian noises, which keeps their norm where a straight
  line would shrink it towards the middle.

Images are uint8 (B, C, H, W); a file is read with the training rule (`data.load_image`: shorter side resized
with Lanczos, centre crop) at the generator's image size.
"""

from __future__ import annotations

import math

import torch

from .denoiser import GuidedDenoiser
from .errors import EncdiffError, check_int, check_number, count
from .samplers import draws_fresh_noise, generate, noise, ode_step

ODE_SAMPLERS = ("euler", "ddim", "heun")  # deterministic one-step methods: inversion and RePaint steps use them
# Inversion's own ODE settings: an exact inverse needs a one-step method (a multistep solver's step depends on the
# steps before it) and a finer grid than sampling does (the round trip's error falls with the step size).
INVERSION_SAMPLER = "euler"
INVERSION_STEPS = 50


def check_strength(strength: float) -> float:
    check_number(strength, "strength", minimum=0, maximum=1, what="", note="0 keeps the image, 1 repaints it all")
    return float(strength)


def steps_run(steps: int, strength: float) -> int:
    """The number of sampler steps img2img runs: min(int(steps * strength), steps), as diffusers does."""
    return min(int(steps * check_strength(strength)), steps)


def check_images(generator, images: torch.Tensor) -> None:
    size, channels = generator.image_size, generator.image_channels
    if images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != (channels, size, size):
        raise EncdiffError(f"images of shape {tuple(images.shape)} and dtype {images.dtype}: this generator edits "
                           f"uint8 B x {channels} x {size} x {size} images (files are resized and centre-cropped)")


def seeded(seeds: list[int], device) -> list[torch.Generator]:
    return [torch.Generator(device).manual_seed(int(s)) for s in seeds]


def img2img(generator, images: torch.Tensor, seeds: list[int], class_labels: torch.Tensor | None = None,
            strength: float = 0.5, sampler: str | None = None, steps: int | None = None,
            guidance_scale: float | None = None, schedule: str | None = None,
            guidance_interval: tuple[float, float] | None = None, guidance_kind: str | None = None,
            decoder: str | None = None, callback=None) -> torch.Tensor:
    """SDEdit: noise the encoded images to the level where the last `steps_run(steps, strength)` steps of the
    sampling grid begin, then run those steps. Strength 0 is the autoencoder round trip; strength 1 ignores the image
    and equals `Generator.images` for the same seeds, labels and sampling, bit for bit. Unset sampling settings are
    the generator's (`Generator.settings`), its stored noise levels included."""
    check_images(generator, images)
    s = generator.settings(class_labels, sampler=sampler, steps=steps, guidance_scale=guidance_scale, schedule=schedule,
                           guidance_interval=guidance_interval, guidance_kind=guidance_kind,
                           decoder=decoder)
    steps = s.steps
    n = steps_run(steps, strength)
    if len(seeds) != len(images):
        raise EncdiffError(f"{count(len(seeds), 'seed')} for {count(len(images), 'image')}: give one seed per image")
    with torch.inference_mode():
        z0 = generator.encode(images)
        if n == 0:
            return generator.decode(z0, s.decoder)
        # The generator's own grid (its stored levels, or its schedule's), of which the last n steps are run.
        sigmas = s.grid(generator.denoiser)[steps - n:]
        # One stream per image, as `Generator.images` draws it: the starting noise first, then whatever fresh noise
        # the sampler needs, so no draw is replayed and strength 1 is exactly generation from the same seed.
        gens = seeded(seeds, z0.device)
        eps = noise(z0.shape, gens, z0.dtype, z0.device)
        x = eps * sigmas[0].item() if n == steps else z0 + sigmas[0].item() * eps
        latents = generate(generator.denoiser, z0.shape, gens, sampler=s.sampler, steps=n, sigmas=sigmas,
                           class_labels=class_labels, **generator.guidance(s), x=x, callback=callback)
        return generator.decode(latents, s.decoder)


class KnownRegion:
    """A denoiser that sees, in the known region (mask 0), the encoded image noised to the current level with a fixed
    noise per image: x <- m * x + (1 - m) * (z0 + sigma * eps). Other attributes are the wrapped denoiser's."""

    def __init__(self, denoiser, z0: torch.Tensor, eps: torch.Tensor, mask: torch.Tensor):
        self.denoiser, self.z0, self.eps, self.mask = denoiser, z0, eps, mask

    def __getattr__(self, name):
        return getattr(self.__dict__["denoiser"], name)

    def __call__(self, x, sigma, class_labels=None):
        sigma_value = float(sigma) if not torch.is_tensor(sigma) or sigma.numel() == 1 else None
        if sigma_value is None:
            raise EncdiffError("inpainting runs one noise level per call")
        known = self.z0 + sigma_value * self.eps
        return self.denoiser(self.mask * x + (1 - self.mask) * known, sigma, class_labels)


def latent_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """A pixel mask (B, 1, H, W) of 0/1 -> the latent mask: a latent cell is repainted when any of its pixels is
    (max-pooling), so no latent that must change is held fixed."""
    return torch.nn.functional.max_pool2d(mask.float(), factor) if factor > 1 else mask.float()


def inpaint(generator, images: torch.Tensor, mask: torch.Tensor, seeds: list[int],
            class_labels: torch.Tensor | None = None, sampler: str | None = None, steps: int | None = None,
            guidance_scale: float | None = None, schedule: str | None = None,
            guidance_interval: tuple[float, float] | None = None, resample: int = 1,
            guidance_kind: str | None = None, decoder: str | None = None, callback=None) -> torch.Tensor:
    """Repaint where `mask` is 1 (B or 1, 1, H, W; 0/1 values), keep the rest: the unmasked pixels of the result
    equal the input exactly. `resample` > 1 is RePaint: each step is redone after re-noising its result back to the
    step's starting level, `resample` times in all, for steps x resample model evaluations (one-step samplers:
    euler, ddim, heun). Unset sampling settings are the generator's."""
    check_images(generator, images)
    mask = check_mask(mask, images)
    s = generator.settings(class_labels, sampler=sampler, steps=steps, guidance_scale=guidance_scale, schedule=schedule,
                           guidance_interval=guidance_interval, guidance_kind=guidance_kind,
                           decoder=decoder)
    sampler, steps, guidance_scale = s.sampler, s.steps, s.guidance_scale
    check_int(resample, "resample", 1, what="", note="1: no resampling")
    if len(seeds) != len(images):
        raise EncdiffError(f"{count(len(seeds), 'seed')} for {count(len(images), 'image')}: give one seed per image")
    with torch.inference_mode():
        z0 = generator.encode(images)
        device = z0.device
        m = latent_mask(mask.to(device), generator.downsample_factor).expand_as(z0)
        gens = seeded(seeds, device)
        eps = noise(z0.shape, gens, z0.dtype, device)
        # Guidance inside, the replacement outside: the guided denoiser evaluates both halves at the same input.
        guidance = generator.guidance(s)
        guided = (GuidedDenoiser(generator.denoiser, guidance_scale, s.guidance_interval, guidance["guide"])
                  if guidance_scale not in (None, 1)
                  else generator.denoiser)
        known = KnownRegion(guided, z0, eps, m)
        sigmas = s.grid(generator.denoiser)
        x = noise(z0.shape, gens, z0.dtype, device) * sigmas[0].item()
        if resample == 1:
            latents = generate(known, z0.shape, gens, sampler=sampler, steps=steps, sigmas=sigmas,
                               class_labels=class_labels, x=x, callback=callback)
        else:
            if sampler not in ODE_SAMPLERS:
                raise EncdiffError(f"RePaint resampling steps one noise level at a time: use a one-step sampler "
                                   f"({', '.join(ODE_SAMPLERS)}), not {sampler!r}")
            latents = repaint(known, x, sigmas, gens, class_labels, sampler, resample, callback)
        # The known region of the final state is the clean encoding (sigma = 0), then the pixels themselves.
        latents = m * latents + (1 - m) * z0
        out = generator.decode(latents, s.decoder)
        keep = (mask.to(out.device) < 0.5).expand_as(out)
        return torch.where(keep, images.to(out.device), out)


def repaint(denoiser, x, sigmas, generators, class_labels, sampler, resample, callback=None):
    """RePaint (Lugmayr et al. 2022, Alg. 1, jump length 1): every step is taken `resample` times, re-noising its
    result from sigma_next back to sigma in between with fresh noise of std sqrt(sigma^2 - sigma_next^2)."""
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1].tolist(), sigmas[1:].tolist())):
        for r in range(resample):
            x_next = generate(denoiser, x.shape, generators, sampler=sampler, steps=1,
                              sigmas=torch.tensor([sigma, sigma_next], dtype=torch.float64),
                              class_labels=class_labels, x=x)
            if r < resample - 1:
                x = x_next + math.sqrt(sigma**2 - sigma_next**2) * noise(x.shape, generators, x.dtype, x.device)
            else:
                x = x_next
        if callback is not None:
            callback(i, sigma, x, x)
    return x


def check_mask(mask: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """A binary mask (1 = repaint) of shape (H, W), (1, H, W), (B or 1, 1, H, W) matching the images."""
    if not torch.is_tensor(mask):
        raise EncdiffError(f"mask of type {type(mask).__name__}: expected a tensor (or a PNG file in the CLI)")
    while mask.ndim < 4:
        mask = mask[None]
    B, _, H, W = images.shape
    if mask.shape[1] != 1 or mask.shape[2:] != (H, W) or mask.shape[0] not in (1, B):
        raise EncdiffError(f"mask of shape {tuple(mask.shape)}: expected 1 x {H} x {W} (or {B} x 1 x {H} x {W}), the "
                           "images' size")
    values = torch.unique(mask)
    if not all(v in (0, 1) for v in values.tolist()):
        raise EncdiffError(f"mask values {values.tolist()[:6]}: expected a binary mask of 0 (keep) and 1 (repaint)")
    return mask.float()


def invert(generator, images: torch.Tensor, class_labels: torch.Tensor | None = None,
           sampler: str = INVERSION_SAMPLER, steps: int = INVERSION_STEPS, schedule: str = "karras", iterations: int = 2) -> torch.Tensor:
    """Images -> the noise that regenerates them: the probability-flow ODE run upwards over the reversed sampling
    grid, from sigma_min (where x is the clean latent) to sigma_max, unguided, in float64. `regenerate` undoes it.

    Euler/DDIM steps are inverted exactly rather than approximately: the sampler's step down from sigma_next takes
    its slope at the point it starts from, x = x_next + (sigma - sigma_next) d(x_next, sigma_next), so the inverse is
    the fixed point x_next = x + (sigma_next - sigma) d(x_next, sigma_next), reached by `iterations` refinements of
    the explicit (DDIM-inversion) guess (as in Pan et al. 2023, "Effective Real Image Editing with Accelerated
    Iterative Diffusion Inversion"): (1 + iterations) evaluations a step. On the bundled model at 50 steps the round
    trip's latent error falls from 1.2e-2 of the latent variance (explicit) to below 1e-3. Heun's steps are
    second-order accurate already and are inverted explicitly."""
    check_images(generator, images)
    check_int(iterations, "iterations", 0, what="", note="0: plain DDIM inversion")
    if sampler not in ODE_SAMPLERS:
        raise EncdiffError(f"inversion integrates the ODE deterministically: sampler one of {', '.join(ODE_SAMPLERS)}, "
                           f"not {sampler!r}")
    with torch.inference_mode():
        z0 = generator.encode(images).double()
        sigmas = generator.settings(None, sampler=sampler, steps=steps, schedule=schedule).grid(generator.denoiser)
        # Upwards over the levels the sampler walks down, starting at the smallest non-zero one: the ODE's slope is
        # undefined at 0, and at sigma_min (0.002) the clean latent is already the state to within its precision.
        upward = (sigmas[:-1] if sigmas[-1] == 0 else sigmas).flip(0)
        x = z0
        for sigma, sigma_next in zip(upward[:-1].tolist(), upward[1:].tolist()):
            x_next, _ = ode_step(generator.denoiser, x, sigma, sigma_next, class_labels,
                                 "heun" if sampler == "heun" else "euler")
            for _ in range(iterations if sampler != "heun" else 0):
                x_next = x + (sigma_next - sigma) * (x_next - generator.denoiser(x_next, sigma_next, class_labels)) / sigma_next
            x = x_next
        return x


def regenerate(generator, noise_latents: torch.Tensor, class_labels: torch.Tensor | None = None,
               sampler: str = INVERSION_SAMPLER, steps: int = INVERSION_STEPS, schedule: str = "karras",
               guidance_scale: float | None = None) -> torch.Tensor:
    """Inverted noise -> uint8 images: the same ODE walked down over the same grid (`regenerate_latents`)."""
    return generator.decode(regenerate_latents(generator, noise_latents, class_labels, sampler, steps, schedule,
                                               guidance_scale))


def regenerate_latents(generator, noise_latents: torch.Tensor, class_labels: torch.Tensor | None = None,
                       sampler: str = INVERSION_SAMPLER, steps: int = INVERSION_STEPS, schedule: str = "karras",
                       guidance_scale: float | None = None) -> torch.Tensor:
    """Inverted noise -> latents, in float64 (the ODE is integrated in the precision `invert` used)."""
    with torch.inference_mode():
        sigmas = generator.settings(class_labels, sampler=sampler, steps=steps, schedule=schedule).grid(generator.denoiser)
        return generate(generator.denoiser, noise_latents.shape, None, sampler=sampler, steps=steps, sigmas=sigmas,
                        class_labels=class_labels, guidance_scale=guidance_scale, x=noise_latents.double()).float()


def interpolate_seeds(generator, seeds: tuple[int, int], frames: int, class_labels: torch.Tensor | None = None,
                      sampling=None, callback=None, **overrides) -> torch.Tensor:
    """`frames` uint8 images between what seeds A and B generate: their starting noises (drawn as
    `Generator.images` draws them) interpolated on the great circle, each frame sampled with the generator's own
    settings (`Generator.settings`), so the first and last frames are exactly `images([A])` and `images([B])`.
    A sampler that draws fresh noise on the way (ancestral, multistep consistency) is refused: its frames would
    not lie on one path."""
    if len(seeds) != 2:
        raise EncdiffError(f"{count(len(seeds), 'seed')}: give two seeds, the two ends")
    settings = generator.settings(class_labels, sampling, **overrides)
    if draws_fresh_noise(settings.sampler, settings.steps):
        raise EncdiffError(f"sampler {settings.sampler!r} at {count(settings.steps, 'step')} draws fresh noise on the "
                           "way, so the frames between two seeds would not lie on one path: use a sampler that "
                           "draws none (dpmpp_2m, euler, heun, ddim; a consistency student at 1 step)")
    c = generator.unet.config
    shape = (1, c.in_channels, c.sample_size, c.sample_size)
    sigmas = settings.grid(generator.denoiser)
    device = next(generator.unet.parameters()).device
    ends = [noise(shape, seeded([s], device), torch.float32, device) for s in seeds]
    path = interpolate_noise(ends[0], ends[1], frames) * sigmas[0].item()
    # One frame at a time, as `encdiff sample --seed A` makes one image: a convolution's rounding can depend on the
    # batch size, and the ends must be those images exactly.
    with torch.inference_mode():
        latents = [generate(generator.denoiser, shape, None, sampler=settings.sampler, steps=settings.steps,
                            sigmas=sigmas, class_labels=class_labels, **generator.guidance(settings), x=frame[None],
                            callback=callback)
                   for frame in path]
        return torch.cat([generator.decode(z, settings.decoder) for z in latents])


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation between a and b (per batch item, over all other dims): at t = 0 a, at t = 1 b;
    for a and b of equal norm, every point has that norm. Nearly parallel vectors fall back to the straight line."""
    a64, b64 = a.double().flatten(1), b.double().flatten(1)
    cos = (a64 * b64).sum(1) / (a64.norm(dim=1) * b64.norm(dim=1)).clamp_min(1e-30)
    omega = torch.arccos(cos.clamp(-1, 1))[:, None]
    sin = torch.sin(omega)
    straight = sin.abs() < 1e-6
    wa = torch.where(straight, 1 - t, torch.sin((1 - t) * omega) / torch.where(straight, 1.0, sin))
    wb = torch.where(straight, t, torch.sin(t * omega) / torch.where(straight, 1.0, sin))
    return (wa * a64 + wb * b64).reshape(a.shape).to(a.dtype)


def interpolate_noise(start: torch.Tensor, end: torch.Tensor, frames: int) -> torch.Tensor:
    """`frames` noises from start to end (both ends included) on the great circle between them."""
    check_int(frames, "frames", 2, what="", note="both ends included")
    return torch.cat([slerp(start, end, i / (frames - 1)) for i in range(frames)])

