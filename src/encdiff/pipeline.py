"""A generator: denoiser (U-Net + its parameterisation), autoencoder and class names, in one folder.

Folder layout: `generator.json` (denoiser spec, class names, sampling defaults), `unet/` (a UNet folder) and,
for latent diffusion, `autoencoder/` (an Autoencoder folder). Images flow noise -> sampler -> latents
-> decoder -> uint8 pixels, each arrow one call.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .autoencoder import Autoencoder, IdentityAutoencoder
from .buckets import format_shape, parse_shape
from .checkpoint import CHECKPOINTS, CONFIG, OUR_WEIGHTS, atomic_write_bytes, read_json, shipped_file
from .errors import check_choice, check_field, check_int, check_number, config_from_dict, count
from .denoiser import (PREDICTIONS, ConsistencyDenoiser, Denoiser, EDMDenoiser, FlowConsistencyDenoiser, FlowDenoiser,
                       VPDenoiser)
from .images import to_uint8, to_unit
from .errors import EncdiffError
from .samplers import SAMPLERS, generate
from .schedules import SCHEDULES, get_alpha_bars, get_sigmas
from .backbones import CLASS_NAMES, load_backbone
from .compilation import check_compiler, compile_requested, compiled
from .light_decoder import LightDecoder
from .precision import autocast
from .unet import UNet

GENERATOR_FILE = "generator.json"
GUIDANCE_KINDS = ("classifier-free", "auto")  # Sampling.guidance_kind
DECODERS = ("full", "light")  # Sampling.decoder
DENOISER_KINDS = ("edm", "vp", "flow", "consistency")  # DenoiserSpec.kind
TRAINED_KINDS = ("edm", "vp", "flow")  # the kinds stage 2 trains (a consistency student is distilled from one of:)
CONSISTENCY_PRECONDITIONINGS = ("edm", "flow")  # DenoiserSpec.preconditioning: the teacher kinds distill takes


def samplers_for(kind: str) -> tuple[str, ...]:
    """The samplers that fit a denoiser kind: a consistency function is sampled by restarts from its own estimate
    (Song et al. 2023, Alg. 1), which an ODE solver would misread as a denoiser (blurred images); and consistency
    sampling of a denoiser jumps from noise to one blurred estimate (blocky images)."""
    return ("consistency",) if kind == "consistency" else tuple(name for name in SAMPLERS if name != "consistency")
BUNDLED = "cifar10"  # the generator folder shipped under encdiff/weights/
BUNDLED_STUDENT = "cifar10-student"  # its consistency student (2 evaluations per image, guidance built in)


@dataclass(frozen=True)
class DenoiserSpec:
    kind: str = "edm"  # "edm" (Karras et al. 2022 preconditioning), "vp" (discrete DDPM-style), "flow" (flow
    # matching, the linear interpolant and velocity: rectified flow / SD3) or "consistency" (a consistency function
    # with the boundary f(x; sigma_min) = x, Song et al. 2023: a distilled student)
    sigma_data: float = 0.5  # edm: standard deviation of the training data (pixels ~0.5; encdiff's latents 1)
    sigma_min: float = 0.002  # edm, flow: smallest noise level sampled
    sigma_max: float = 80.0  # edm, flow: largest noise level sampled (flow: t = sigma / (1 + sigma) = 0.988)
    schedule: str = "linear"  # vp: the training beta schedule (schedules.TRAIN_SCHEDULES)
    prediction: str = "epsilon"  # vp: what the network predicts: epsilon, v or x0
    options: dict[str, Any] = field(default_factory=dict)  # vp: schedule options (beta_start, ...)
    preconditioning: str | None = None  # consistency: its teacher's kind, "edm" or "flow", whose c_in, c_noise and
    # output form the student keeps with the boundary moved to sigma_min (ConsistencyDenoiser, FlowConsistencyDenoiser;
    # None: edm, the students from before the field); the other kinds: None

    def __post_init__(self):
        check_choice(self.kind, "denoiser.kind", DENOISER_KINDS)
        for name in ("sigma_data", "sigma_min", "sigma_max"):
            check_number(getattr(self, name), f"denoiser.{name}", positive=True)
        check_field(self.sigma_min < self.sigma_max, "denoiser.sigma_min", self.sigma_min, "below sigma_max")
        check_choice(self.prediction, "denoiser.prediction", PREDICTIONS)
        check_field(isinstance(self.schedule, str), "denoiser.schedule", self.schedule, "a schedule name")
        check_field(isinstance(self.options, dict), "denoiser.options", self.options, "an object")
        if self.preconditioning is not None:
            check_field(self.kind == "consistency", "denoiser.preconditioning", self.preconditioning,
                        "null unless the kind is 'consistency' (it names a student's teacher kind)")
            check_choice(self.preconditioning, "denoiser.preconditioning", CONSISTENCY_PRECONDITIONINGS)

    def build(self, net: torch.nn.Module) -> Denoiser:
        if self.kind == "consistency" and self.preconditioning == "flow":
            return FlowConsistencyDenoiser(net, sigma_min=self.sigma_min, sigma_max=self.sigma_max)
        if self.kind in ("edm", "consistency"):
            kind = EDMDenoiser if self.kind == "edm" else ConsistencyDenoiser
            return kind(net, sigma_data=self.sigma_data, sigma_min=self.sigma_min, sigma_max=self.sigma_max)
        if self.kind == "flow":
            return FlowDenoiser(net, sigma_min=self.sigma_min, sigma_max=self.sigma_max)
        if self.kind == "vp":
            return VPDenoiser(net, get_alpha_bars(self.schedule, **self.options), prediction=self.prediction)
        raise EncdiffError(f"unknown denoiser kind {self.kind!r}; valid: {', '.join(DENOISER_KINDS)}")


@dataclass(frozen=True)
class Sampling:
    """How a generator turns noise into images: stored in its folder, applied by `Generator.images` unless told
    otherwise, and the one source of the defaults of `encdiff sample`, `encdiff eval`, `encdiff serve`."""

    sampler: str = "dpmpp_2m"  # one of samplers.SAMPLERS
    steps: int = 20  # sampler steps (one network evaluation each; heun: two, less one)
    schedule: str = "karras"  # the sigma grid, one of schedules.SCHEDULES
    guidance_scale: float | None = None  # classifier-free guidance scale (class-conditional models); None or 1: none
    sigmas: tuple[float, ...] | None = None  # explicit noise levels, one per step, decreasing (a consistency
    # student's tuned levels; the final 0 is implied); None: the schedule's
    guidance_interval: tuple[float, float] | None = None  # guidance only where lo < sigma <= hi, one evaluation
    # elsewhere (Kynkaenniemi et al. 2024); None: at every noise level
    guidance_kind: str = "classifier-free"  # what guidance_scale scales: "classifier-free" (towards the class, away
    # from the unconditional model) or "auto" (away from the generator's guide model: autoguidance, Karras et al. 2024)
    decoder: str = "full"  # "full": the autoencoder's decoder; "light": the generator's light decoder (fast)

    def __post_init__(self):
        check_field(self.sampler in SAMPLERS, "sampling.sampler", self.sampler, f"one of {', '.join(SAMPLERS)}")
        check_choice(self.guidance_kind, "sampling.guidance_kind", GUIDANCE_KINDS)
        check_choice(self.decoder, "sampling.decoder", DECODERS)
        check_int(self.steps, "sampling.steps")
        check_field(self.schedule in SCHEDULES, "sampling.schedule", self.schedule, f"one of {', '.join(SCHEDULES)}")
        if self.guidance_scale is not None:
            check_number(self.guidance_scale, "sampling.guidance_scale", positive=True)
        if self.guidance_interval is not None:
            interval = self.guidance_interval
            check_field(isinstance(interval, (list, tuple)) and len(interval) == 2, "sampling.guidance_interval",
                        interval, "two noise levels [lo, hi]")
            for level in interval:
                check_number(level, "sampling.guidance_interval")
            check_field(0 <= interval[0] <= interval[1], "sampling.guidance_interval", interval, "0 <= lo <= hi")
            object.__setattr__(self, "guidance_interval", (float(interval[0]), float(interval[1])))
        if self.sigmas is not None:
            check_field(isinstance(self.sigmas, (list, tuple)) and len(self.sigmas) == self.steps,
                        "sampling.sigmas", self.sigmas, f"a list of {self.steps} noise levels (one per step)")
            for level in self.sigmas:
                check_number(level, "sampling.sigmas", positive=True)
            check_field(all(a > b for a, b in zip(self.sigmas, self.sigmas[1:])), "sampling.sigmas", self.sigmas,
                        "strictly decreasing")
            object.__setattr__(self, "sigmas", tuple(float(level) for level in self.sigmas))

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None, where: str = "sampling") -> "Sampling":
        return config_from_dict(cls, dict(values or {}), where)

    def but(self, **overrides: Any) -> "Sampling":
        """These settings with the given ones changed; a None override keeps the current value. Explicit `sigmas`
        hold for their own step count and schedule only: changing either returns to the schedule's levels."""
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if overrides.get("sigmas") is not None and "steps" not in overrides:
            overrides["steps"] = len(overrides["sigmas"])  # explicit levels are one per step
        if self.sigmas is not None and "sigmas" not in overrides and (
                overrides.get("steps", self.steps) != self.steps or overrides.get("schedule", self.schedule) != self.schedule):
            overrides["sigmas"] = None
        return dataclasses.replace(self, **overrides)

    def grid(self, denoiser) -> torch.Tensor:
        """The float64 noise levels the sampler walks, ending at 0: the explicit `sigmas`, or the schedule's."""
        if self.sigmas is not None:
            return torch.tensor([*self.sigmas, 0.0], dtype=torch.float64)
        return get_sigmas(self.schedule, self.steps, denoiser)


def check_sampler_fits(sampler: str, kind: str, name: str = "sampler") -> None:
    """Refuse a sampler that does not apply to a denoiser kind, naming the ones that do (`samplers_for`)."""
    fits = samplers_for(kind)
    if sampler not in fits:
        raise EncdiffError(f"{name} {sampler!r} does not fit a {kind!r} generator"
                           + (" (a distilled consistency student)" if kind == "consistency" else "")
                           + f": use {' or '.join(fits) if len(fits) == 1 else 'one of ' + ', '.join(fits)}")


def guide_record(guide: torch.nn.Module, source: str, float16: bool = False) -> dict[str, Any]:
    """What generator.json records of an autoguidance guide (`Generator.with_guide`'s info): the method, the guide's
    widths, where it came from, and "weights": "float16" where it is stored at half the bytes."""
    record = {"method": "autoguidance (Karras et al. 2024): a shorter-trained or smaller model of the same data",
              "block_out_channels": list(guide.config.block_out_channels), "from": source}
    if float16:
        record["weights"] = "float16"
    return record


class Generator:
    """Everything needed to turn noise into images; `images()` is the one call that does it."""

    def __init__(self, unet: UNet, spec: DenoiserSpec, autoencoder: Autoencoder | None = None,
                 class_names: list[str] | None = None, sampling: Sampling | dict[str, Any] | None = None,
                 distillation: dict[str, Any] | None = None, guide: torch.nn.Module | None = None,
                 guide_info: dict[str, Any] | None = None, light_decoder: LightDecoder | None = None,
                 sizes: list[tuple[int, int]] | None = None, compile: bool | None = None):
        self.unet = unet.eval()
        self.light_decoder = light_decoder.eval() if light_decoder is not None else None
        # Autoguidance's guide (Sampling.guidance_kind = "auto"): a smaller, shorter-trained backbone of the same
        # latent space, denoiser and labels; `guide_info` records how it was trained.
        self.guide, self.guide_info = (guide.eval() if guide is not None else None), guide_info
        if guide is not None:
            for name in ("in_channels", "out_channels", "sample_size", "num_classes", "null_class"):
                ours, theirs = getattr(unet.config, name), getattr(guide.config, name, None)
                if ours != theirs:
                    raise EncdiffError(f"the guide's {name} = {theirs!r} differs from the U-Net's {ours!r}: a guide "
                                       "works on the same latents with the same labels")
        # How a distilled student was made (teacher, guidance scale built in, grid, images): recorded, not used.
        self.distillation = distillation
        # The settings `images()` uses when not told otherwise: chosen by whoever measured the model (for the bundled
        # one, BENCHMARKS.md).
        self.sampling = sampling if isinstance(sampling, Sampling) else Sampling.from_dict(sampling)
        self.spec = spec
        self.check_guidance(self.sampling, "sampling.")
        check_sampler_fits(self.sampling.sampler, spec.kind, "sampling.sampler")
        # Sampling through torch.compile'd networks (compilation.py): asked for here, or by ENCDIFF_COMPILE. The
        # networks themselves stay as they are (saved, fine-tuned, compared); only the calls sampling makes differ.
        self.compiled = compile_requested() if compile is None else bool(compile)
        if self.compiled:
            check_compiler(next(unet.parameters()).device)
        run = compiled if self.compiled else (lambda net: net)
        self.denoiser = spec.build(run(unet))
        self.guide_denoiser = spec.build(run(self.guide)) if guide is not None else None
        if autoencoder is None and unet.config.in_channels not in (1, 3, 4):
            raise EncdiffError(f"a pixel-space generator (latent: false) makes images of the U-Net's "
                               f"{unet.config.in_channels} channels: expected 1, 3 or 4 (is an autoencoder missing?)")
        self.autoencoder = autoencoder.eval() if autoencoder is not None else IdentityAutoencoder(unet.config.in_channels)
        self.decoders = {"full": run(self.autoencoder.decode) if autoencoder is not None else self.autoencoder.decode}
        if light_decoder is not None:
            self.decoders["light"] = run(self.light_decoder.decode)
        # The image shapes (height, width) it was trained at (aspect-ratio buckets); its square is always one.
        square = (self.image_size, self.image_size)
        self.sizes: list[tuple[int, int]] = sorted({square, *(tuple(size) for size in (sizes or ()))},
                                                   key=lambda s: s[1] / s[0])
        f = self.downsample_factor
        for height, width in self.sizes:
            check_field(height % f == 0 and width % f == 0, "sizes", format_shape((height, width)),
                        f"sides that are multiples of the autoencoder's downsampling factor {f}")
        check_field(class_names is None or (isinstance(class_names, (list, tuple))
                                            and all(isinstance(n, str) for n in class_names)),
                    "class_names", class_names, "a list of names")
        self.class_names = list(class_names or [])
        check_field(not self.class_names or len(self.class_names) == unet.config.num_classes, "class_names",
                    self.class_names, f"{count(unet.config.num_classes, 'name')}, one per class of the U-Net (or none)")
        if autoencoder is not None and autoencoder.latent_channels != unet.config.in_channels:
            raise EncdiffError(f"the autoencoder has {autoencoder.latent_channels} latent channels, "
                               f"the U-Net takes {unet.config.in_channels}")
        if light_decoder is not None:
            if autoencoder is None:
                raise EncdiffError("a light decoder decodes latents: this generator works in pixel space")
            ours = (autoencoder.latent_channels, autoencoder.config.out_channels, autoencoder.downsample_factor)
            theirs = (light_decoder.config.latent_channels, light_decoder.config.out_channels,
                      light_decoder.downsample_factor)
            if ours != theirs:
                raise EncdiffError(f"the light decoder reads {theirs[0]} latent channels into {theirs[1]}-channel "
                                   f"images {theirs[2]}x larger; this generator's latents are {ours[0]} channels of "
                                   f"{ours[1]}-channel images {ours[2]}x larger")
        if self.sampling.decoder == "light" and light_decoder is None:
            raise EncdiffError("sampling.decoder = 'light': this generator has no light decoder "
                               "(`encdiff set-light-decoder GENERATOR DECODER`)")

    def check_guidance(self, settings: Sampling, prefix: str = "") -> None:
        """Refuse guidance this generator cannot give: classifier-free needs classes, autoguidance a guide."""
        if settings.guidance_scale in (None, 1):
            return
        if settings.guidance_kind == "auto" and self.guide is None:
            raise EncdiffError(f"{prefix}guidance_kind = 'auto': this generator has no guide model (train one with "
                               "`encdiff train-guide GENERATOR DATA`, or `encdiff set-guide`), or use classifier-free "
                               "guidance")
        if settings.guidance_kind == "classifier-free" and not self.unet.config.num_classes:
            raise EncdiffError(f"{prefix}guidance_scale = {settings.guidance_scale}: an unconditional model has no "
                               "classifier-free guidance" + ("; its guide gives autoguidance (guidance_kind 'auto')"
                                                              if self.guide is not None else ""))

    @property
    def guidance_kinds(self) -> list[str]:
        """The guidance kinds this generator can give: classifier-free with classes, auto with a guide model."""
        possible = {"classifier-free": bool(self.unet.config.num_classes), "auto": self.guide is not None}
        return [kind for kind in GUIDANCE_KINDS if possible[kind]]

    def guidance(self, settings: Sampling) -> dict[str, Any]:
        """The guidance arguments of `samplers.generate` for these settings: the one place a guidance kind becomes
        a guided denoiser, for sampling and editing alike."""
        return {"guidance_scale": settings.guidance_scale, "guidance_interval": settings.guidance_interval,
                "guide": self.guide_denoiser if settings.guidance_kind == "auto" else None}

    @property
    def evaluations(self) -> int:
        """Images through a network since the counts were reset (the guide's included): NFE x images."""
        return self.denoiser.evaluations + (self.guide_denoiser.evaluations if self.guide_denoiser else 0)

    def reset_evaluations(self) -> None:
        for denoiser in (self.denoiser, self.guide_denoiser):
            if denoiser is not None:
                denoiser.evaluations = 0

    @property
    def image_size(self) -> int:
        return self.unet.config.sample_size * self.autoencoder.downsample_factor

    @property
    def image_channels(self) -> int:
        ae = self.autoencoder
        return ae.config.in_channels if isinstance(ae, Autoencoder) else self.unet.config.in_channels

    @property
    def downsample_factor(self) -> int:
        return self.autoencoder.downsample_factor

    @property
    def num_classes(self) -> int:
        return self.unet.config.num_classes

    def class_index(self, name_or_index: str | int) -> int:
        """A class given by name or index -> index, with an error listing the valid ones."""
        if isinstance(name_or_index, str) and name_or_index in self.class_names:
            return self.class_names.index(name_or_index)
        try:
            index = int(name_or_index)
        except ValueError:
            index = -1
        if not 0 <= index < self.num_classes:
            valid = ", ".join(self.class_names) or f"0..{self.num_classes - 1}"
            raise EncdiffError(f"unknown class {name_or_index!r}; valid: {valid}" if self.num_classes else
                               "this model is unconditional: it takes no class")
        return index

    def labels(self, num: int, class_: str | int | None = None) -> torch.Tensor | None:
        """The class of each of `num` images: all `class_` when given; for a class-conditional model otherwise a
        spread that cycles through the classes; None for an unconditional model."""
        if class_ is not None:
            return torch.full((num,), self.class_index(class_), dtype=torch.long)
        return torch.arange(num) % self.num_classes if self.num_classes else None

    def settings(self, class_labels: torch.Tensor | None = None, sampling: Sampling | None = None,
                 **overrides: Any) -> Sampling:
        """The sampling settings a call uses: `sampling` (default: the generator's) with the non-None `overrides`;
        a default guidance scale is dropped when there are no class labels to guide towards."""
        base = sampling or self.sampling
        kind = overrides.get("guidance_kind") or base.guidance_kind
        if class_labels is None and overrides.get("guidance_scale") is None and kind == "classifier-free":
            base = dataclasses.replace(base, guidance_scale=None)
        settings = base.but(**overrides)
        check_sampler_fits(settings.sampler, self.spec.kind)
        self.check_guidance(settings)
        if settings.decoder == "light" and self.light_decoder is None:
            raise EncdiffError("decoder 'light': this generator has no light decoder "
                               "(`encdiff set-light-decoder GENERATOR DECODER`)")
        if self.spec.kind == "consistency" and settings.guidance_scale not in (None, 1):
            built_in = (self.distillation or {}).get("guidance_scale")
            raise EncdiffError(f"guidance_scale {settings.guidance_scale}: this consistency student has its guidance "
                               f"built in{f' (scale {built_in})' if built_in else ''} and takes one evaluation per "
                               "step; leave the guidance out")
        return settings

    @torch.inference_mode()
    def images(self, seeds: list[int], class_labels: torch.Tensor | None = None, sampling: Sampling | None = None, *,
               sampler: str | None = None, steps: int | None = None, guidance_scale: float | None = None,
               schedule: str | None = None, guidance_interval: tuple[float, float] | None = None,
               guidance_kind: str | None = None, decoder: str | None = None, size: tuple[int, int] | None = None,
               callback=None) -> torch.Tensor:
        """uint8 images (B, C, H, W), image i made from its own seed: its noise, and so its image, does not depend on
        the other seeds of the batch. The pixels of a batch equal those of images made one by one to within rounding:
        the CPU's convolution kernels round differently for another batch size, so a value in a few thousand may
        differ by one level (tested: at most 1 level, under 0.2 % of the values).

        The generator's own `sampling` applies unless `sampling` or a keyword changes it (guidance_scale=1 turns
        guidance off); its default guidance is used only where there are class labels to guide towards.
        `size` (height, width) is one of the shapes it was trained at (`sizes`; default its square).
        `callback(i, sigma, x, denoised)` runs after every step (see samplers)."""
        settings = self.settings(class_labels, sampling, sampler=sampler, steps=steps, guidance_scale=guidance_scale,
                                 schedule=schedule, guidance_interval=guidance_interval, guidance_kind=guidance_kind,
                                 decoder=decoder)
        c = self.unet.config
        height, width = self.check_size(size)
        f = self.downsample_factor
        device = next(self.unet.parameters()).device
        generators = [torch.Generator(device).manual_seed(int(s)) for s in seeds]
        with autocast(device):  # the precision this machine runs the networks fastest in (precision.py)
            latents = generate(self.denoiser, (len(seeds), c.in_channels, height // f, width // f), generators,
                               sampler=settings.sampler, steps=settings.steps, sigmas=settings.grid(self.denoiser),
                               class_labels=class_labels, **self.guidance(settings), device=device, callback=callback)
        return self.decode(latents, settings.decoder)

    def check_size(self, size: tuple[int, int] | None) -> tuple[int, int]:
        """(height, width) to draw at: `size` if it is one this generator was trained at, else an error listing
        them; None: its square."""
        if size is None:
            return self.image_size, self.image_size
        size = tuple(size)
        if size not in self.sizes:
            raise EncdiffError(f"size {format_shape(size)}: this generator was trained at "
                               f"{', '.join(format_shape(s) for s in self.sizes)} (width x height); draw at one of them")
        return size

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (B, C, H, W) -> the latents the U-Net works on (the posterior mean; pixels in [-1, 1] for a
        pixel-space model), float32 on the generator's device."""
        device = next(self.unet.parameters()).device
        return self.autoencoder.encode(to_unit(images.to(device)))

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, decoder: str = "full") -> torch.Tensor:
        """Latents -> uint8 images (B, C, H, W) on the CPU, through the full decoder or the light one."""
        if decoder not in self.decoders:
            raise EncdiffError(f"decoder {decoder!r}: this generator has no light decoder" if decoder == "light"
                               else f"decoder {decoder!r}: expected one of {', '.join(DECODERS)}")
        with autocast(latents.device):
            return to_uint8(self.decoders[decoder](latents.float()))

    def with_autoencoder(self, autoencoder: Autoencoder) -> "Generator":
        """The same generator with another decoder: `autoencoder` must share this one's latent space (the same
        config, so the same latent scale/shift, and bit-identical encoder weights), as a decoder-only fine-tune
        (`encdiff train-autoencoder --init ... --decoder-only`) does; anything else is refused, naming the
        field or weight that differs, since the U-Net was trained on this latent space."""
        current = self.autoencoder
        if not isinstance(current, Autoencoder):
            raise EncdiffError("a pixel-space generator has no autoencoder to replace")
        for name, value in current.config.__dict__.items():
            new = getattr(autoencoder.config, name)
            if new != value:
                raise EncdiffError(f"the new autoencoder's config field {name!r} = {new!r} differs from the "
                                   f"generator's {value!r}: not the same latent space (fine-tune the decoder only)")
        new_state = autoencoder.state_dict()
        for key, value in current.state_dict().items():
            if key.startswith(("encoder.", "quant_conv.")) and not torch.equal(new_state[key].to(value), value):
                raise EncdiffError(f"the new autoencoder's weight {key!r} differs from the generator's: another "
                                   "encoder means another latent space (fine-tune the decoder only)")
        return self._replaced(autoencoder=autoencoder)

    def with_guide(self, guide: torch.nn.Module, info: dict[str, Any] | None = None) -> "Generator":
        """The same generator with an autoguidance guide (checked to share its latents and labels); `info` is what
        generator.json records of how the guide was made ("weights": "float16" stores it in float16)."""
        return self._replaced(guide=guide, guide_info=info)

    def with_light_decoder(self, light_decoder: LightDecoder, default: bool = False) -> "Generator":
        """The same generator with a light decoder for its latents (checked to fit them); `default`: its sampling
        decodes with it unless told otherwise (Sampling.decoder = "light")."""
        sampling = dataclasses.replace(self.sampling, decoder="light") if default else self.sampling
        return self._replaced(light_decoder=light_decoder, sampling=sampling)

    def with_sampling(self, sampling: Sampling) -> "Generator":
        """The same networks with other stored sampling defaults, checked as a call with them would be (a sampler
        that fits the model, guidance it can give, a light decoder it holds)."""
        labels = torch.zeros(1, dtype=torch.long) if self.num_classes else None
        # passed as an override: a call drops a default scale it cannot use, a stored one must be refused
        self.settings(labels, sampling=sampling, guidance_scale=sampling.guidance_scale)
        return self._replaced(sampling=sampling)

    def with_compile(self, compile: bool = True) -> "Generator":
        """The same networks, sampled through torch.compile'd calls (compile=True) or eagerly (compilation.py)."""
        return self._replaced(compile=compile)

    def _replaced(self, **changes) -> "Generator":
        """A new Generator over the same parts, with `changes` to its constructor's arguments (checked as any)."""
        parts = dict(unet=self.unet, spec=self.spec,
                     autoencoder=self.autoencoder if isinstance(self.autoencoder, Autoencoder) else None,
                     class_names=self.class_names, sampling=self.sampling, distillation=self.distillation,
                     guide=self.guide, guide_info=self.guide_info, light_decoder=self.light_decoder, sizes=self.sizes,
                     compile=self.compiled)
        return Generator(**{**parts, **changes})

    def save_pretrained(self, path: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
        """Write the generator folder; `dtype` (e.g. torch.float16) stores the weights in that precision
        (they load back as float32)."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(folder / "unet", dtype=dtype)
        if isinstance(self.autoencoder, Autoencoder):
            self.autoencoder.save_pretrained(folder / "autoencoder", dtype=dtype)
        if self.guide is not None:
            # A guide recorded as float16-stored stays so (set-guide --guide-float16: a guide of the main model's own
            # size at half the bytes); otherwise it is stored as the rest.
            half = (self.guide_info or {}).get("weights") == "float16"
            self.guide.save_pretrained(folder / "guide", dtype=torch.float16 if half else dtype)
        if self.light_decoder is not None:
            self.light_decoder.save_pretrained(folder / "light_decoder", dtype=dtype)
        info = {"encdiff_class": "Generator", "format_version": 1, "denoiser": dataclasses.asdict(self.spec),
                "class_names": self.class_names, "latent": isinstance(self.autoencoder, Autoencoder),
                "sampling": dataclasses.asdict(self.sampling)}
        if self.distillation is not None:
            info["distillation"] = self.distillation
        if self.guide is not None:
            info["guide"] = self.guide_info or {}
        if len(self.sizes) > 1:  # a square-only generator's folder stays as it was before buckets
            info["sizes"] = [format_shape(size) for size in self.sizes]
        atomic_write_bytes(folder / GENERATOR_FILE, (json.dumps(info, indent=2) + "\n").encode())
        return folder

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "Generator":
        folder = Path(path)
        info_path = folder / GENERATOR_FILE
        if not info_path.is_file():
            kind = folder_kind(folder) if folder.is_dir() else None
            hint = {"run": f"a training run folder: use its model ({folder / 'model'}) or `encdiff export {folder} OUT`",
                    "autoencoder": "an autoencoder folder", "unet": "a U-Net folder without its generator.json"}
            raise EncdiffError(f"{folder}: not a generator folder (no {GENERATOR_FILE}"
                               + (f"; {hint[kind]}" if kind in hint else "") + "); a generator is written by "
                               "`encdiff train` or `encdiff export`")
        info = read_json(info_path)
        if info.get("encdiff_class") != "Generator":
            raise EncdiffError(f"{info_path}: encdiff_class is {info.get('encdiff_class')!r}, expected 'Generator'")
        if info.get("format_version") != 1:
            raise EncdiffError(f"{info_path}: format_version {info.get('format_version')!r} is not supported "
                               "(this encdiff reads 1)")
        # Every entry is required and typed: a missing one must not fall back to settings that draw other images.
        for key, kind, what in (("denoiser", dict, "an object"), ("class_names", list, "a list of names"),
                                ("latent", bool, "true or false"), ("sampling", dict, "an object")):
            if not isinstance(info.get(key), kind):
                raise EncdiffError(f"{info_path}: entry {key!r} = {info.get(key)!r}: expected {what}")
        if not all(isinstance(n, str) for n in info["class_names"]):
            raise EncdiffError(f"{info_path}: entry 'class_names' = {info['class_names']!r}: expected strings")
        unknown = sorted(set(info) - {"encdiff_class", "format_version", "denoiser", "class_names", "latent", "sampling",
                                      "distillation", "guide", "sizes"})
        if unknown:
            raise EncdiffError(f"{info_path}: unknown entry {unknown[0]!r}")
        for key in ("distillation", "guide"):
            if not isinstance(info.get(key, {}), dict):
                raise EncdiffError(f"{info_path}: entry {key!r} = {info[key]!r}: expected an object")
        sizes = info.get("sizes", [])
        if not isinstance(sizes, list):
            raise EncdiffError(f"{info_path}: entry 'sizes' = {sizes!r}: expected a list of WxH sizes")
        sizes = [parse_shape(size, f"{info_path}: entry 'sizes' item") for size in sizes]
        if "guide" in info and not (folder / "guide").is_dir():
            raise EncdiffError(f"{info_path}: entry 'guide' without a guide/ folder")
        if "guide" not in info and (folder / "guide").is_dir():
            warnings.warn(f"{folder / 'guide'}: ignored, generator.json records no guide (an interrupted "
                          "`encdiff train-guide`? run it again)", stacklevel=2)
        if not info["latent"] and (folder / "autoencoder").is_dir():
            raise EncdiffError(f"{info_path}: entry 'latent' = false, but the folder holds autoencoder/: expected true "
                               "for a latent generator")
        spec = config_from_dict(DenoiserSpec, info["denoiser"], f"{info_path} denoiser")
        unet = load_backbone(folder / "unet", device=device)
        autoencoder = Autoencoder.from_pretrained(folder / "autoencoder", device=device) if info["latent"] else None
        guide = load_backbone(folder / "guide", device=device) if "guide" in info else None
        light = (LightDecoder.from_pretrained(folder / "light_decoder", device=device)
                 if (folder / "light_decoder").is_dir() else None)
        try:
            return cls(unet, spec, autoencoder, info.get("class_names"), Sampling.from_dict(info.get("sampling"), "sampling"),
                       info.get("distillation"), guide, info.get("guide"), light, sizes)
        except EncdiffError as e:
            raise EncdiffError(f"{info_path}: {e}") from None

    @classmethod
    def bundled(cls, student: bool = False) -> "Generator":
        """The class-conditional CIFAR-10 generator shipped inside the package, or with `student` its consistency
        student: the same images' distribution in 2 network evaluations instead of 40 (BENCHMARKS.md)."""
        return cls.from_pretrained(bundled_path(student))


def bundled_path(student: bool = False) -> Path:
    return shipped_file(f"{BUNDLED_STUDENT if student else BUNDLED}/{GENERATOR_FILE}", "generator",
                        "pass a generator folder written by `encdiff train`, `encdiff distill` or `encdiff export`"
                        ).parent


def stored_dtype(folder: str | os.PathLike) -> torch.dtype | None:
    """The precision a generator folder's U-Net weights are stored in, or None for float32: what a command that
    rewrites the folder (a guide, a light decoder, a new decoder) keeps, so the bundled float16 folders stay half."""
    from safetensors import safe_open

    with safe_open(str(Path(folder) / "unet" / OUR_WEIGHTS), framework="pt") as f:
        dtype = f.get_tensor(next(iter(f.keys()))).dtype
    return None if dtype == torch.float32 else dtype


def folder_kind(path: str | os.PathLike) -> str | None:
    """What a folder holds, from its marker files alone: "generator" (generator.json), "autoencoder" or "unet" (a
    model folder, ours or diffusers'), "model" (another model's config.json), "run" (a training run's checkpoints/),
    or None. The one place `encdiff info`, `eval` and `sample` decide what they were given."""
    folder = Path(path)
    if (folder / GENERATOR_FILE).is_file():
        return "generator"
    if (folder / CHECKPOINTS).is_dir():  # before config.json: a run folder keeps its resolved config there too
        return "run"
    if (folder / CONFIG).is_file():
        raw = read_json(folder / CONFIG)
        name = raw.get("encdiff_class") or raw.get("_class_name")
        if name in (Autoencoder.__name__, Autoencoder.diffusers_class_name):
            return "autoencoder"
        return "unet" if name in CLASS_NAMES else "model"
    return None
