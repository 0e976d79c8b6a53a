"""The `encdiff` command: train, distil, sample, edit, evaluate, serve, export and inspect models.

A user mistake (bad path, value or file) prints one line `encdiff: error: ...` and exits with status 2.

    flags.py              the parser, flags declared once, output and number checks
    training_commands.py  train-autoencoder, train, distill, train-guide, export, posthoc-ema, train-feature-net
    image_commands.py     sample, reconstruct, edit
    model_commands.py     serve, set-autoencoder, set-light-decoder, set-guide, set-sampling, info, eval
"""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import EncdiffError, TrainingInterrupted
from ..evaluate import CLASS_MIXES
from ..compilation import ENV as COMPILE_ENV
from ..precision import PRECISIONS, inference_precision
from ..schedules import SCHEDULES
from .flags import OneLineParser, finite_float, model_flags, sampling_flags, train_flags
from .image_commands import cmd_edit, cmd_reconstruct, cmd_sample
from .model_commands import (cmd_eval, cmd_info, cmd_serve, cmd_set_autoencoder, cmd_set_guide,
                             cmd_set_light_decoder, cmd_set_sampling)
from .training_commands import cmd_export, cmd_posthoc_ema, cmd_train, cmd_train_feature_net, cmd_train_guide


EXAMPLES = """examples:
  encdiff sample                                   # the bundled CIFAR-10 model: samples.png, a row per class
  encdiff sample --class cat --num 16 --seed 7
  encdiff train-autoencoder data/cifar10/train --preset cifar10 --run-dir runs/ae
  encdiff train data/cifar10/train --autoencoder runs/ae/model --preset cifar10 --run-dir runs/ldm
  encdiff train my_images/ --pixel --model pixel_small --resolution 32 --steps 20000
  torchrun --nproc-per-node=4 -m encdiff train data/ --autoencoder runs/ae/model --run-dir runs/ldm
  encdiff sample runs/ldm/model --num 16 --class cat --guidance 2 --out samples.png
  encdiff distill runs/ldm/model data/cifar10/train --run-dir runs/student --steps 1000
  encdiff sample runs/student/model                  # 2 steps, guidance built in
  encdiff train-guide runs/ldm/model data/cifar10/train  # autoguidance: a small guide, into the generator folder
  encdiff sample runs/ldm/model --guidance-kind auto --guidance 2
  encdiff reconstruct runs/ae/model photos/ --out recon/
  encdiff export runs/ldm exported/ --diffusers
  encdiff info runs/ldm
  encdiff train-feature-net /tmp/cifar10 --out featurenet.safetensors
  encdiff eval runs/ldm/model --reference data/cifar10/test --num 10000 --out eval/"""


EDIT_EXAMPLES = """examples:
  encdiff edit img2img photo.png --class cat --strength 0.3 --out cat.png
  encdiff edit inpaint photo.png --mask centre.png --class dog --resample 4
  encdiff edit invert photo.png --class cat --to-class dog --out swap.png
  encdiff edit interpolate --seeds 1 2 --class horse --frames 8 --out strip.png --gif strip.gif"""


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="encdiff", description="Encoder-decoder diffusion models.",
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", choices=PRECISIONS,
                        help="what the networks run in at inference on a CPU: float32, bf16 (autocast; weights stay "
                        "float32), or auto (bf16 where the CPU computes it natively and a probe measures it faster); "
                        "default: ENCDIFF_PRECISION, else auto. `encdiff info` says what runs")
    parser.add_argument("--compile", action="store_true",
                        help="sample through torch.compile'd networks (sample, eval, edit, serve): each batch shape "
                        "compiles once (minutes the first time, seconds from the on-disk cache), then runs faster; "
                        "pays for long runs and servers (default: ENCDIFF_COMPILE, else off; needs a C++ compiler)")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("train-autoencoder", help="stage 1: train a KL autoencoder on an image folder",
                            epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    train_flags(p, "autoencoder")

    p = commands.add_parser("train", help="stage 2: train a diffusion U-Net (latent or pixel space)",
                            epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    train_flags(p, "diffusion")
    p.add_argument("--pixel", action="store_true", help="diffusion in pixel space")

    p = commands.add_parser("distill", help="consistency-distil a generator into a 1-4 step student (guidance built in)",
                            epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    train_flags(p, "consistency")

    p = commands.add_parser("train-guide", help="train autoguidance's guide for a generator (a smaller, "
                            "shorter-trained model of its data), stored in the generator folder",
                            epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("generator", help="generator folder to guide (the guide is written into it)")
    train_flags(p, "diffusion")

    p = commands.add_parser("sample", help="generate images", epilog=EXAMPLES,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", help="generator folder (default: the CIFAR-10 model shipped in the package)")
    model_flags(p, positional=True)
    p.add_argument("--num", type=int, help="number of images (default: 10 per class, one row each; "
                   "16 for an unconditional model or with --class)")
    p.add_argument("--class", dest="class_", help="class name or index")
    sampling_flags(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i")
    p.add_argument("--out", help="grid PNG (default samples.png unless --out-dir)")
    p.add_argument("--out-dir", help="also write one PNG per image here (alone: no grid, any --num)")
    p.add_argument("--batch-size", type=int, default=100, help="images generated at once (memory)")
    p.add_argument("--size", metavar="WxH", help="image size, one the model was trained at (aspect-ratio buckets; "
                   "`encdiff info MODEL` lists them; default: its square)")

    p = commands.add_parser("reconstruct", help="encode and decode images; side-by-side PNGs and PSNR")
    p.add_argument("model", help="autoencoder folder (encdiff or diffusers)")
    p.add_argument("input", help="an image or a folder of images")
    p.add_argument("--out", default="reconstructions", help="output folder")
    p.add_argument("--resolution", type=int, help="resize/crop to this size (default: the model's sample_size)")

    p = commands.add_parser("export", help="write a run's EMA weights as a model folder")
    p.add_argument("run", help="run folder")
    p.add_argument("out", help="output folder")
    p.add_argument("--diffusers", action="store_true", help="diffusers' folder format")
    p.add_argument("--half", action="store_true", help="store the weights as float16 (half the size; they load "
                   "back as float32)")
    sampling_flags(p, "the generator's stored default: ", "the run's")
    p.add_argument("--sigma-rel", type=finite_float, help="export the post-hoc EMA of this relative width "
                   "(EDM2), reconstructed from the run's snapshots, instead of its EMA")
    when = p.add_mutually_exclusive_group()
    when.add_argument("--at-step", type=int, metavar="N", help="the run as it stood at step N (a kept checkpoint's "
                      "EMA, or with --sigma-rel the snapshots up to N): an early version of the model, e.g. "
                      "autoguidance's guide (`encdiff set-guide`)")
    when.add_argument("--at-fraction", metavar="F", help="with --sigma-rel: the run at its post-hoc EMA snapshot "
                      "nearest F (0 < F <= 1) of its length, e.g. 0.25 for a guide")

    p = commands.add_parser("posthoc-ema", help="reconstruct a run's EMA at any widths after training (EDM2 "
                            "post-hoc EMA): one model folder per --sigma-rel")
    p.add_argument("run", help="run folder trained with --phema-every N")
    p.add_argument("--sigma-rel", type=finite_float, nargs="+", required=True, metavar="S",
                   help="relative widths to reconstruct, in (0, 0.2887); EDM2's best are often 0.05-0.15")
    p.add_argument("--out", default="posthoc-ema", help="folder for the sigma-rel-S/ model folders")
    p.add_argument("--half", action="store_true", help="store the weights as float16")

    p = commands.add_parser("edit", help="edit real images: img2img, inpaint, invert (class swap), interpolate",
                            epilog=EDIT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = p.add_subparsers(dest="mode", required=True)
    for mode, help_ in (("img2img", "SDEdit: noise the encoded image part of the way and denoise it"),
                        ("inpaint", "repaint where a mask is white; every other pixel is kept exactly"),
                        ("invert", "ODE inversion to noise and back; --to-class regenerates under another class"),
                        ("interpolate", "a strip between two seeds' noises or two images' inversions")):
        m = modes.add_parser(mode, help=help_, epilog=EDIT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
        if mode != "interpolate":
            m.add_argument("image", help="the image to edit (resized and centre-cropped to the model's size)")
        model_flags(m)
        m.add_argument("--class", dest="class_", help="class name or index (default: none, the null class)")
        default = {"invert": "the inversion's own: euler, 50 steps",
                   "interpolate": "the generator's; with --images the inversion's: euler, 50 steps"}
        sampling_flags(m, default=default.get(mode, "the generator's"), sigmas=False,
                        interval=mode != "invert")
        m.add_argument("--seed", type=int, default=0, help="seed of the noise")
        m.add_argument("--out", default=f"{mode}.png", help="output PNG")
        if mode == "img2img":
            m.add_argument("--strength", type=finite_float, default=0.5,
                           help="0 keeps the image (autoencoder round trip), 1 ignores it; runs int(steps x strength) steps")
        if mode == "inpaint":
            m.add_argument("--mask", required=True, help="PNG of the image's size: white = repaint, black = keep")
            m.add_argument("--resample", type=int, default=1, help="RePaint resamplings per step (cost x this)")
        if mode == "invert":
            m.add_argument("--to-class", help="regenerate under this class instead (class swap)")
        if mode == "interpolate":
            m.add_argument("--seeds", type=int, nargs=2, help="two seeds: interpolate their noises")
            m.add_argument("--images", nargs=2, help="two images: interpolate their inversions")
            m.add_argument("--frames", type=int, default=8, help="images in the strip, both ends included")
            m.add_argument("--gif", help="also write an animated GIF here")

    p = commands.add_parser("serve", help="an HTTP API and a web page for a generator (needs encdiff[serve])")
    p.add_argument("model", nargs="?", help="generator folder (default: the bundled CIFAR-10 model)")
    model_flags(p, positional=True)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-images", type=int, default=16, help="images per request")
    p.add_argument("--max-steps", type=int, default=100, help="sampler steps per request")
    p.add_argument("--queue-size", type=int, default=4, help="requests running or waiting; more get 429")
    p.add_argument("--allowed-host", action="append", help="a host name clients use (Host/Origin check); repeatable")

    p = commands.add_parser("train-light-decoder", help="train a light decoder (a fifth of the cost) for an "
                            "autoencoder's latents", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    train_flags(p, "light_decoder")
    p = commands.add_parser("set-light-decoder", help="put a light decoder into a generator (sample with --decoder "
                            "light)")
    p.add_argument("generator", help="generator folder")
    p.add_argument("light_decoder", help="light decoder folder (train-light-decoder's RUN/model)")
    p.add_argument("--default", action="store_true", help="make it the generator's default decoder (where its FID "
                   "is measured close enough to the full one's; --decoder full still picks the full one)")
    p.add_argument("--out", help="write the result here instead of replacing the generator folder")
    p.add_argument("--half", action="store_true",
                   help="store the weights as float16 (default: the precision the generator is stored in)")

    p = commands.add_parser("set-guide", help="put autoguidance's guide into a generator: another generator of the "
                            "same latents, e.g. its own run at an early step (`encdiff export RUN OUT --at-step N`, or "
                            "`--sigma-rel S --at-fraction F`)")
    p.add_argument("generator", help="generator folder")
    p.add_argument("model", help="generator folder whose U-Net becomes the guide (same denoiser, latents and labels)")
    p.add_argument("--out", help="write the result here instead of replacing the generator folder")
    p.add_argument("--half", action="store_true",
                   help="store the weights as float16 (default: the precision the generator is stored in)")
    p.add_argument("--guide-float16", action="store_true", help="store the guide alone as float16, now and whenever "
                   "the folder is rewritten (a guide of the main model's size at half the bytes)")

    p = commands.add_parser("set-sampling", help="change the sampling a generator stores (its defaults for sample, "
                            "eval, edit and serve)")
    p.add_argument("generator", help="generator folder")
    sampling_flags(p, default="unchanged")
    p.add_argument("--schedule", choices=SCHEDULES, help="the sigma grid (default: unchanged)")
    p.add_argument("--no-guidance-interval", action="store_true", help="guide at every noise level")
    p.add_argument("--out", help="write the result here instead of replacing the generator folder's files")

    p = commands.add_parser("set-autoencoder", help="put a fine-tuned decoder into a generator (same latent space)")
    p.add_argument("generator", help="generator folder")
    p.add_argument("autoencoder", help="autoencoder folder sharing the generator's encoder (a decoder-only fine-tune)")
    p.add_argument("--out", help="write the new generator here (default: replace the generator folder's files)")
    p.add_argument("--half", action="store_true",
                   help="store all weights as float16 (default: the precision the generator is stored in)")

    p = commands.add_parser("info", help="describe a model, generator or run folder")
    p.add_argument("path", nargs="?", help="the folder (default: the bundled CIFAR-10 generator)")

    p = commands.add_parser("train-feature-net", help="train the CIFAR-style classifier whose features the "
                            "metrics use (its figures are not comparable to Inception FID)")
    p.add_argument("data", help="folder with train/ and test/ class subfolders, or one folder of class subfolders")
    p.add_argument("--test", help="held-out folder for test accuracy (default DATA/test when present)")
    p.add_argument("--out", default="featurenet.safetensors", help="output weights (fp16 safetensors)")
    p.add_argument("--epochs", type=int, default=18,
                   help="training epochs; 0 with --init re-calibrates and re-tests that net without training")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=0.4, help="peak learning rate (one-cycle, SGD Nesterov)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast")
    p.add_argument("--cache-dir", help="cache the decoded images here (safetensors)")
    p.add_argument("--init", help="start from this feature-net file (a further, shorter cycle)")

    p = commands.add_parser("eval", help="measure a generator, a folder of generated images or an autoencoder "
                            "(FID, KID, precision/recall, class accuracy, PSNR/SSIM, bits/dim)", epilog=EXAMPLES,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", help="generator folder, folder of generated images, or autoencoder folder")
    p.add_argument("--reference", help="reference image folder (e.g. a split) or reference-*.safetensors statistics")
    p.add_argument("--num", type=int, default=10000, help="samples to generate (autoencoder: images to reconstruct)")
    p.add_argument("--reference-num", type=int, help="use a seeded random subset of this many reference images")
    sampling_flags(p)
    p.add_argument("--classes", help="comma-separated class names or indices to generate (default: all)")
    p.add_argument("--class-mix", choices=CLASS_MIXES,
                   help="how often each class is drawn: in the reference folder's proportions (the default where the "
                        "reference has the model's class subfolders) or equally")
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed + i; also seeds subsets")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--resolution", type=int, help="resize and centre-crop reference (and sample folder) images to this")
    p.add_argument("--feature-net", help="feature-net file from `encdiff train-feature-net` (default: the shipped one)")
    p.add_argument("--inception", help="pytorch-fid's Inception weights (.pth): the standard Inception FID instead")
    p.add_argument("--cache-dir", help="cache decoded images and reference statistics here")
    p.add_argument("--kid-subsets", type=int, default=100)
    p.add_argument("--kid-subset-size", type=int, default=1000)
    p.add_argument("--k", type=int, default=3, help="neighbours for precision/recall")
    p.add_argument("--bpd", action="store_true", help="also bits/dim of the reference images (pixel-space VP models)")
    p.add_argument("--bpd-images", type=int, default=1000)
    p.add_argument("--bpd-timesteps", type=int, help="per-image timestep draws (unbiased estimate; default all T)")
    p.add_argument("--workers", type=int, help="image decoding processes")
    p.add_argument("--out", help="output folder for metrics.json and metrics.md (default eval-<target name>)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    import warnings

    # A warning (skipped files, a cache rebuilt) is one line, like an error, not Python's file:line form.
    warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: print(
        f"encdiff: warning: {message}", file=sys.stderr)
    if args.precision:  # the one setting precision.py reads, so every command and the processes it starts agree
        os.environ["ENCDIFF_PRECISION"] = args.precision
        inference_precision.cache_clear()
    if args.compile:  # read where a generator is built (pipeline.py), as the precision is
        os.environ[COMPILE_ENV] = "1"
    try:
        stages = {"train-autoencoder": "autoencoder", "train": "diffusion", "distill": "consistency",
                  "train-light-decoder": "light_decoder"}
        if args.command in stages:
            return cmd_train(args, stages[args.command])
        return {"sample": cmd_sample, "reconstruct": cmd_reconstruct, "export": cmd_export, "info": cmd_info,
                "edit": cmd_edit, "posthoc-ema": cmd_posthoc_ema, "serve": cmd_serve,
                "set-autoencoder": cmd_set_autoencoder, "set-light-decoder": cmd_set_light_decoder,
                "set-guide": cmd_set_guide, "set-sampling": cmd_set_sampling,
                "train-feature-net": cmd_train_feature_net,
                "train-guide": cmd_train_guide, "eval": cmd_eval}[args.command](args)
    except TrainingInterrupted as e:
        print(f"encdiff: {e}", file=sys.stderr)
        return 128 + int(e.signum)  # 130 after Ctrl-C, 143 after SIGTERM: `a && b` does not carry on
    except EncdiffError as e:
        print(f"encdiff: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `encdiff info ... | head`: the reader has gone. Python's documented remedy: point stdout at devnull so the
        # flush at exit does not fail again, and exit like a process killed by SIGPIPE.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13
