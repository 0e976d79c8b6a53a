"""What every command shares: the one-line parser, the flags declared once (training fields, sampling, the
model), the generator a command names, and the checks of outputs and numbers made before any work."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
from pathlib import Path
from typing import Any

from ..errors import EncdiffError
from ..pipeline import DECODERS, GUIDANCE_KINDS


class OneLineParser(argparse.ArgumentParser):
    """A bad flag or value is one line on stderr and exit status 2, like every other user mistake (no usage dump)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def train_flags(parser: argparse.ArgumentParser, stage: str) -> None:
    """One flag per TrainConfig field of this stage, named after the field, its help the field's comment."""
    from ..training import TrainConfig, stage_fields

    if stage == "consistency":
        parser.add_argument("teacher", help="generator folder to distil (its U-Net starts the student)")
    parser.add_argument("data", help="image folder (class subfolders become labels)" +
                        ("; the teacher's training data" if stage == "consistency" else ""))
    parser.add_argument("--config", help="TOML file with TrainConfig fields")
    parser.add_argument("--preset", help="named training setup: cifar10, folder64")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--resume", action="store_true",
                        help="require a checkpoint in the run folder (a run resumes automatically when it has one)")
    for f in dataclasses.fields(TrainConfig):
        if f.name not in stage_fields(stage) or f.name in ("data", "teacher"):
            continue
        flag, help_ = "--" + f.name.replace("_", "-"), field_comment(TrainConfig, f.name)
        kind = str(f.type).replace(" | None", "")
        if f.name == "time_budget":
            parser.add_argument("--time", "--time-budget", dest="time_budget", type=duration, metavar="DURATION",
                                help="a time budget for the whole run (45m, 1h30m, 90s): the steps become what fits, "
                                "measured on this machine at the start")
        elif f.name == "guidance_interval":  # sampling's spelling: two levels, or none for every sigma
            either = parser.add_mutually_exclusive_group()
            either.add_argument(flag, type=finite_float, nargs=2, metavar=("LO", "HI"), help=help_)
            either.add_argument("--no-guidance-interval", dest="guidance_interval", action="store_const", const=(),
                                help="guidance at every sigma, whatever the teacher's interval")
        elif kind == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_)
        elif kind in ("int", "float", "str"):
            parser.add_argument(flag, type={"int": int, "float": finite_float, "str": str}[kind], help=help_,
                                metavar=f.name.upper())
        elif kind == "tuple[float, float]":
            parser.add_argument(flag, type=finite_float, nargs=2, help=help_, metavar=f.name.upper())
        elif kind == "tuple[float, ...]":
            parser.add_argument(flag, type=finite_float, nargs="+", help=help_, metavar=f.name.upper())
        elif kind == "tuple[str, ...]":
            parser.add_argument(flag, nargs="+", help=help_, metavar="WxH")


def duration(text: str) -> float:
    """argparse type: a duration (45m, 1h30m, 90s; a bare number is minutes) in seconds."""
    from ..training.budget import parse_duration

    try:
        seconds = parse_duration(text)
    except EncdiffError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"time budget {text!r}: expected more than 0")
    return seconds


def finite_float(text: str) -> float:
    """argparse type: a finite number (nan and inf are refused with the flag named by argparse)."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


@functools.lru_cache(maxsize=None)
def _source_lines(cls: type) -> tuple[str, ...]:
    import inspect

    return tuple(inspect.getsource(cls).splitlines())  # parsing the source is slow: once per class


def field_comment(cls: type, name: str) -> str | None:
    """The `# comment` beside a config field in its source: one definition of every option's meaning."""
    for line in _source_lines(cls):
        if line.strip().startswith(f"{name}:") and "#" in line:
            return line.split("#", 1)[1].strip().replace("%", "%%")
    return None


def train_overrides(args: argparse.Namespace, stage: str) -> dict[str, Any]:
    from ..training import stage_fields

    return {name: getattr(args, name) for name in stage_fields(stage) if hasattr(args, name)}


def sampling_flags(parser: argparse.ArgumentParser, prefix: str = "", default: str = "the generator's",
                    sigmas: bool = True, interval: bool = True) -> None:
    """The flags of `Sampling`, declared once for every command that samples (sample, eval, edit, export): each
    maps to the Sampling field of the same meaning, and an unset one is the generator's own."""
    parser.add_argument("--sampler", help=f"{prefix}sampler, one of encdiff.SAMPLERS that fits the model "
                        f"(default: {default})")
    parser.add_argument("--steps", type=int, help=f"{prefix}sampler steps (default: {default})")
    parser.add_argument("--guidance", type=finite_float, help=f"{prefix}classifier-free guidance scale, 1: none "
                        f"(default: {default})")
    if interval:
        parser.add_argument("--guidance-interval", type=finite_float, nargs=2, metavar=("LO", "HI"),
                            help=f"{prefix}guide only where LO < sigma <= HI, one network evaluation per step "
                            f"elsewhere (Kynkaenniemi et al. 2024; default: {default})")
        parser.add_argument("--decoder", choices=DECODERS,
                            help=f"{prefix}decoder: full, or light (the generator's light decoder, several times "
                            f"cheaper; default: {default})")
        parser.add_argument("--guidance-kind", choices=GUIDANCE_KINDS,
                            help=f"{prefix}what --guidance scales: classifier-free, or auto (autoguidance by the "
                            f"generator's guide model, Karras et al. 2024; any model, labelled or not; default: "
                            f"{default})")
    if sigmas:
        parser.add_argument("--sigmas", type=finite_float, nargs="+", metavar="SIGMA",
                            help=f"{prefix}explicit noise levels, one per step (overrides --steps and the schedule)")


def model_flags(parser: argparse.ArgumentParser, positional: bool = False) -> None:
    """--model and --fast, the same for every command that uses a generator (sample and serve also take the model
    as their argument)."""
    parser.add_argument("--model", dest="model_flag" if positional else "model", metavar="MODEL",
                        help="generator folder (default: the CIFAR-10 model shipped in the package)")
    parser.add_argument("--fast", action="store_true", help="the bundled model's consistency student: 2 network "
                        "evaluations per image instead of 40, guidance built in")


def generator_of(args: argparse.Namespace):
    """The generator a command names: a folder, or the bundled model (its consistency student with --fast)."""
    from ..pipeline import Generator

    model, flag = args.model, getattr(args, "model_flag", None)
    if model and flag and Path(model) != Path(flag):
        raise EncdiffError(f"two models: {model} and --model {flag} (give one)")
    model = model or flag
    if model and args.fast:
        raise EncdiffError(f"--fast picks the bundled student; {model} is another model (give one of them)")
    return Generator.from_pretrained(model) if model else Generator.bundled(student=args.fast)


def check_output(path: Path, suffixes: tuple[str, ...], flag: str) -> Path:
    """Refuse an output file that cannot be written before any work is done."""
    if path.suffix.lower() not in suffixes:
        raise EncdiffError(f"{flag} {path}: expected a file name ending in {' or '.join(suffixes)}")
    if path.is_dir():
        raise EncdiffError(f"{flag} {path}: is a folder; give a file name")
    check_writable_folder(path.parent, flag, path)
    return path


def check_writable_folder(folder: Path, flag: str, shown: Path | None = None) -> Path:
    """Refuse an output folder that cannot be made or written before any work is done: its nearest existing
    ancestor must be a folder in which a file can really be created (permission bits do not tell that for root,
    a read-only mount or /proc). Nothing is left behind."""
    import tempfile

    shown = shown or folder
    if folder.exists() and not folder.is_dir():
        raise EncdiffError(f"{flag} {shown}: {folder} is not a folder: it is a file")
    parent = next((p for p in [folder, *folder.parents] if p.exists()), Path("."))
    if not parent.is_dir():
        raise EncdiffError(f"{flag} {shown}: {parent} is not a folder: it is a file")
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".encdiff-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise EncdiffError(f"{flag} {shown}: cannot write in {parent} ({e.strerror or e})") from None
    return folder


def say_replaced(path: Path) -> None:
    """An output that already exists is replaced, as every command does, and said, not done silently."""
    if path.exists():
        print(f"encdiff: replacing {path}", file=sys.stderr)


def in_range(value: int | None, flag: str, minimum: int, maximum: int | None = None) -> None:
    """A numeric flag checked before any work: one line naming the flag and what it accepts."""
    if value is not None and (value < minimum or (maximum is not None and value > maximum)):
        raise EncdiffError(f"{flag} {value}: expected {minimum}" + (f" .. {maximum}" if maximum is not None else " or more"))
