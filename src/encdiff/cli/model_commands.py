"""The commands around a model: serve, set-autoencoder, set-light-decoder, set-guide, set-sampling, info, eval."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from ..errors import EncdiffError
from .flags import generator_of, in_range


def cmd_serve(args: argparse.Namespace) -> int:
    import ipaddress

    try:
        from ..server import ServerLimits, serve
        import fastapi  # noqa: F401  (the serve extra)
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise EncdiffError(f"encdiff serve needs FastAPI and uvicorn ({e.name} is missing): "
                           "pip install 'encdiff[serve]'") from None
    if not 0 < args.port < 65536:
        raise EncdiffError(f"--port {args.port}: expected 1..65535")
    limits = ServerLimits(max_images=args.max_images, max_steps=args.max_steps, queue_size=args.queue_size)
    for field in ("max_images", "max_steps", "queue_size"):
        if getattr(limits, field) < 1:
            raise EncdiffError(f"--{field.replace('_', '-')} {getattr(limits, field)}: expected at least 1")
    generator = generator_of(args)
    try:
        loopback = args.host == "localhost" or ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        raise EncdiffError(f"--host {args.host}: expected an IP address to bind (127.0.0.1, ::1, 0.0.0.0, ...)") from None
    if not loopback:
        print(f"encdiff: serving on {args.host}, reachable from other machines: anyone who can reach it can use "
              "this CPU/GPU; add --allowed-host NAME for each host name clients use", file=sys.stderr)
    serve(generator, args.host, args.port, limits, tuple(args.allowed_host or ()))
    return 0


def replace_part(args: argparse.Namespace, folder: str, load, attach, what: str) -> int:
    """Load a model folder, attach it to the generator (which checks it fits), write the generator in the precision
    its weights are stored in (float16 with --half)."""
    from ..pipeline import Generator, stored_dtype

    generator = Generator.from_pretrained(args.generator)
    try:
        updated = attach(generator, load(folder))
    except EncdiffError as e:
        raise EncdiffError(f"{folder}: {e}") from None
    out = Path(args.out or args.generator)
    updated.save_pretrained(out, dtype=torch.float16 if args.half else stored_dtype(args.generator))
    print(f"wrote {out} with {what} of {folder}")
    return 0


def cmd_set_light_decoder(args: argparse.Namespace) -> int:
    from ..light_decoder import LightDecoder

    what = ("the light decoder, its default decoder (--decoder full for the full one)" if args.default
            else "the light decoder (sample with --decoder light)")
    return replace_part(args, args.light_decoder, LightDecoder.from_pretrained,
                        lambda g, m: g.with_light_decoder(m, default=args.default), what)


def cmd_set_guide(args: argparse.Namespace) -> int:
    """Autoguidance's guide from another generator of the same latents (e.g. `encdiff export RUN OUT --at-step N`: the
    main run's own early version, the paper's shorter-trained degradation without a second run)."""
    from ..pipeline import Generator, guide_record

    def attach(generator: Generator, model: Generator) -> Generator:
        check_same_latents(generator, model)
        return generator.with_guide(model.unet, guide_record(model.unet, str(Path(args.model).resolve()),
                                                             args.guide_float16))

    return replace_part(args, args.model, Generator.from_pretrained, attach, "a guide (autoguidance): the U-Net")


def check_same_latents(generator, model) -> None:
    """Refuse a guide generator that denoises otherwise than `generator`, or in another latent space: its
    denoiser spec, and its encoder and latent normalisation (equal up to float16 storage; the decoders may differ,
    a guide only denoises latents)."""
    if model.spec != generator.spec:
        raise EncdiffError(f"its denoiser {dataclasses.asdict(model.spec)} differs from the generator's "
                           f"{dataclasses.asdict(generator.spec)}: a guide must denoise the same way")
    if model.distillation is not None:
        raise EncdiffError("a distilled student, not a denoiser: guide with a generator trained by `encdiff train`")
    from ..autoencoder import Autoencoder

    # a pixel-space generator holds an identity in place of an autoencoder
    ours, theirs = (a if isinstance(a, Autoencoder) else None for a in (generator.autoencoder, model.autoencoder))
    if (ours is None) != (theirs is None):
        raise EncdiffError("not in the generator's latent space (one is a pixel-space model)")
    if ours is None:
        return
    same = ours.config == theirs.config
    if same:
        a, b = ours.state_dict(), theirs.state_dict()
        same = all(torch.equal(a[k].half(), b[k].half()) for k in a if k.split(".")[0] in ("encoder", "quant_conv"))
    if not same:
        raise EncdiffError("its autoencoder encodes otherwise than the generator's (another encoder or latent "
                           "normalisation): a guide must denoise the same latents")


def cmd_set_sampling(args: argparse.Namespace) -> int:
    """Change the sampling a generator folder stores (what `sample`, `eval`, `edit` and `serve` use unless told):
    the flags of `sample`, each unset one kept; checked as a call with them would be, the weights untouched."""
    from ..pipeline import Generator, stored_dtype

    if args.no_guidance_interval and args.guidance_interval is not None:
        raise EncdiffError("--guidance-interval and --no-guidance-interval: give one of them")
    generator = Generator.from_pretrained(args.generator)
    before = generator.sampling
    sampling = before.but(sampler=args.sampler, steps=args.steps, schedule=args.schedule,
                          guidance_scale=args.guidance, sigmas=args.sigmas, guidance_interval=args.guidance_interval,
                          guidance_kind=args.guidance_kind, decoder=args.decoder)
    if args.no_guidance_interval:
        sampling = dataclasses.replace(sampling, guidance_interval=None)
    try:
        updated = generator.with_sampling(sampling)
    except EncdiffError as e:
        raise EncdiffError(f"{args.generator}: {e}") from None
    out = Path(args.out or args.generator)
    updated.save_pretrained(out, dtype=stored_dtype(args.generator))
    changed = [f"{f.name} {getattr(before, f.name)!r} -> {getattr(sampling, f.name)!r}"
               for f in dataclasses.fields(sampling) if getattr(before, f.name) != getattr(sampling, f.name)]
    print(f"wrote {out}: " + ("; ".join(changed) if changed else "sampling unchanged"))
    return 0


def cmd_set_autoencoder(args: argparse.Namespace) -> int:
    from ..autoencoder import Autoencoder

    return replace_part(args, args.autoencoder, Autoencoder.from_pretrained,
                        lambda g, m: g.with_autoencoder(m), "the decoder")


def cmd_info(args: argparse.Namespace) -> int:
    from ..pipeline import folder_kind
    from ..pipeline import Generator, bundled_path
    from ..training.state import latest_training_state, load_training_state

    path = Path(args.path) if args.path else bundled_path()
    kind = folder_kind(path)
    if kind == "generator":
        # Loaded, not read raw: info vouches for exactly what `sample` and `eval` accept, with the same message.
        generator = Generator.from_pretrained(path)
        teacher = f" (of a {generator.spec.preconditioning or 'edm'} teacher)" if generator.spec.kind == "consistency" \
            else ""
        print(f"{path}: generator ({'latent' if generator.downsample_factor > 1 else 'pixel'} diffusion), denoiser "
              f"{generator.spec.kind}{teacher}, classes: {', '.join(generator.class_names) or 'none'}")
        from ..buckets import format_shape

        print(f"  sizes (width x height): {', '.join(format_shape(size) for size in generator.sizes)}"
              + (" (aspect-ratio buckets: `encdiff sample --size WxH`)" if len(generator.sizes) > 1 else ""))
        s = generator.sampling
        print(f"  sampling: {s.sampler}, {s.steps} steps"
              + (f" at noise levels {list(s.sigmas)}" if s.sigmas else f", {s.schedule} schedule")
              + (f", guidance {s.guidance_scale}" if s.guidance_scale else "")
              + (f" ({s.guidance_kind})" if s.guidance_scale else "")
              + (f" where {s.guidance_interval[0]} < sigma <= {s.guidance_interval[1]}"
                 if s.guidance_scale and s.guidance_interval else "") + f", {s.decoder} decoder")
        from ..precision import inference_precision

        extras = [name for name, there in (("a guide (autoguidance)", generator.guide is not None),
                                           ("a light decoder", generator.light_decoder is not None)) if there]
        if extras:
            print(f"  also holds {' and '.join(extras)}")
        print(f"  inference precision here: {inference_precision('cpu')} (--precision or ENCDIFF_PRECISION: float32, bf16 or auto)")
        print(f"  compiled sampling: {'on' if generator.compiled else 'off'} (--compile or ENCDIFF_COMPILE=1)")
        if generator.distillation:
            from ..training.distillation import describe_guidance

            d = generator.distillation
            built_in = describe_guidance(d.get("guidance_scale"), d.get("guidance_interval"), d.get("guidance_kind"))
            print(f"  distilled: {built_in} built in, {d.get('images')} images, "
                  f"{d.get('intervals')} intervals, {d.get('solver')} teacher steps")
        for sub in ("unet", "autoencoder", "guide", "light_decoder"):
            if (path / sub).is_dir():
                _describe_model(path / sub)
        return 0
    if kind == "run":
        latest = latest_training_state(path)
        if latest is None:
            print(f"{path}: run folder without a complete checkpoint")
            return 0
        _, meta = load_training_state(latest)
        print(f"{path}: {meta['stage']} run, step {meta['step']} of {meta['config']['steps']}, "
              f"{meta['images_seen']} images seen, latest checkpoint {latest.name}")
        # Evaluation rows carry metrics, not the loss: the last row that has one.
        losses = [row for row in meta["history"] if "loss" in row]
        if losses:
            print(f"  last logged loss {losses[-1]['loss']:.4f} (step {losses[-1]['step']})")
        evals = [row for row in meta["history"] if "fid" in row]
        if evals:
            print(f"  last evaluation: FID {evals[-1]['fid']:.2f} (step {evals[-1]['step']})")
        print(f"  finished model: {path / 'model'}" if (path / "model").is_dir() else "  not finished")
        return 0
    if kind is not None:
        _describe_model(path)
        return 0
    raise EncdiffError(f"{path}: neither a model folder, a generator folder nor a run folder")


def _describe_model(folder: Path) -> None:
    from ..autoencoder import Autoencoder
    from ..checkpoint import CONFIG, read_json
    from ..backbones import BACKBONES, CLASS_NAMES

    raw = read_json(folder / CONFIG)
    name = raw.get("encdiff_class") or raw.get("_class_name")
    from ..light_decoder import LightDecoder

    cls = {"Autoencoder": Autoencoder, "AutoencoderKL": Autoencoder, "LightDecoder": LightDecoder,
           **{n: BACKBONES[b] for n, b in CLASS_NAMES.items()}}.get(name)
    if cls is None:
        raise EncdiffError(f"{folder / CONFIG}: not an encdiff or diffusers model config")
    config, weights = cls.verify(folder)  # the weights are there, safetensors, and match their recorded hash
    fmt = "diffusers" if "_class_name" in raw else "encdiff"
    print(f"{folder}: {cls.__name__} ({fmt} format, weights {weights.name})")
    for key, value in dataclasses.asdict(config).items():
        print(f"  {key}: {value}")


def cmd_eval(args: argparse.Namespace) -> int:
    from ..evaluate import EvalRequest, run_evaluation

    for flag, value, minimum in (("--num", args.num, 1), ("--batch-size", args.batch_size, 1),
                                 ("--kid-subsets", args.kid_subsets, 1), ("--kid-subset-size", args.kid_subset_size, 2),
                                 ("--k", args.k, 1), ("--bpd-images", args.bpd_images, 1),
                                 ("--reference-num", args.reference_num, 1), ("--steps", args.steps, 1),
                                 ("--resolution", args.resolution, 1), ("--bpd-timesteps", args.bpd_timesteps, 1)):
        in_range(value, flag, minimum)
    in_range(args.seed, "--seed", 0, 2**63 - args.num)
    in_range(args.resolution, "--resolution", 1, 4096)
    if args.out and Path(args.out).is_file():
        raise EncdiffError(f"--out {args.out}: is a file; give a folder for metrics.json and metrics.md")
    request = EvalRequest(**{f.name: getattr(args, f.name) for f in dataclasses.fields(EvalRequest)})
    json_path, md_path = run_evaluation(request)
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}")
    return 0
