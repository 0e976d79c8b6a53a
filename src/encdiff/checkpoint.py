"""Model folders on disk: safetensors weights plus a JSON config, ours or diffusers'.

Our folder: `config.json` ({"encdiff_class", "format_version", "config", "weights_sha256"}) and
`model.safetensors`. A diffusers folder: `config.json` with `_class_name` and
`diffusion_pytorch_model.safetensors`. Module names equal diffusers' keys, so only the config differs.
Loading validates everything before a model is returned, so nothing is ever half-loaded.
Training checkpoints (`save_training_state`) are directories of safetensors + JSON, written atomically.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch.overrides import TorchFunctionMode
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .errors import EncdiffError, config_from_dict, count

FORMAT_VERSION = 1
OUR_WEIGHTS = "model.safetensors"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
CONFIG = "config.json"
CHECKPOINTS = "checkpoints"  # a training run's checkpoint folders (training/state.py) live under RUN/checkpoints/
# The diffusers release whose folder layout `save_pretrained(..., diffusers=True)` writes.
DIFFUSERS_FORMAT_VERSION = "0.30.0"


def default_mode() -> int:
    """The permissions a plain `open(path, "w")` would give a new file: 0o666 less the umask. (mkstemp makes 0o600
    files, which other users, or a service, could not read.)"""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a crash leaves either the old file or the new one, never half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), default_mode())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> str:
    """Save tensors as safetensors atomically; returns the file's sha256."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        digest = sha256_file(Path(tmp))
        os.chmod(tmp, default_mode())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return digest


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise EncdiffError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EncdiffError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise EncdiffError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file (never pickle); a missing, truncated or corrupt file names itself."""
    if not path.is_file():
        raise EncdiffError(f"{path}: weights file not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise EncdiffError(f"{path}: not a readable safetensors file ({e})") from None


def shipped_file(name: str, what: str, instead: str) -> Path:
    """A file shipped inside the package under encdiff/weights/, with an error saying what to use instead."""
    path = Path(str(resources.files("encdiff") / "weights" / name))
    if not path.is_file():
        raise EncdiffError(f"{path}: the shipped {what} is missing (a broken install?); {instead}")
    return path


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path | str) -> None:
    """Refuse a weights file whose keys or shapes differ from the model's, naming the keys."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    problems = []
    if missing:
        problems.append(f"{count(len(missing), 'missing key')}, first {missing[0]!r}")
    if unexpected:
        problems.append(f"{count(len(unexpected), 'unexpected key')}, first {unexpected[0]!r}")
    for key in sorted(set(expected) & set(state)):
        if expected[key].shape != state[key].shape:
            problems.append(f"key {key!r} has shape {tuple(state[key].shape)}, "
                            f"the config needs {tuple(expected[key].shape)}")
            break
    for key, tensor in state.items():
        if not (tensor.is_floating_point() or key.endswith("num_batches_tracked")):
            problems.append(f"key {key!r} has dtype {tensor.dtype}, expected a floating-point tensor")
            break
    if problems:
        raise EncdiffError(f"{path}: weights do not match the config: {'; '.join(problems)}")


# torch.nn.init's random fills and the tensor methods they end in (each init function is a torch function of its own:
# a mode sees the outer call, not the fills inside it)
RANDOM_FILLS = tuple(getattr(torch.nn.init, name) for name in (
    "normal_", "uniform_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
    "xavier_normal_", "orthogonal_", "sparse_")) + (torch.Tensor.normal_, torch.Tensor.uniform_)


class SkipRandomInit(TorchFunctionMode):
    """Random initialisation as a no-op, for a model built only to receive a file's weights: the parameters are
    left uninitialised (`torch.empty`), which costs an allocation and no random numbers. Not the meta device: there
    `normal_`, `randn` and arithmetic run Python reference kernels whose first use imports torch._dynamo, 1.4-1.9 s
    of a new process (most of `encdiff sample --fast`'s loading, measured)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in RANDOM_FILLS:
            return args[0] if args else kwargs["tensor"]
        if func in (torch.randn, torch.rand):  # an uninitialised tensor of the same shape, dtype and device
            return torch.empty(*args, **{k: v for k, v in kwargs.items() if k != "generator"})
        return func(*args, **kwargs)


class Pretrained:
    """`from_pretrained` / `save_pretrained` for a model with a frozen config dataclass.

    A subclass sets `config_class` and, if diffusers has an equivalent, `diffusers_class_name` and the two converters
    of diffusers_format.py (`fields_from_diffusers`, `config_to_diffusers`); this module imports no model or format
    module, so the model files import it and the format module without a cycle.
    """

    config_class: ClassVar[type]
    diffusers_class_name: ClassVar[str | None] = None
    fields_from_diffusers: ClassVar[Any] = None  # diffusers' config dict -> our config's fields
    diffusers_config: ClassVar[Any] = None  # our config -> diffusers' config fields

    @classmethod
    def config_from_diffusers(cls, values: dict[str, Any]):
        """diffusers' config (a dict of config.json) -> our config dataclass."""
        return cls.config_class(**cls.fields_from_diffusers(values))

    @classmethod
    def config_to_diffusers(cls, config) -> dict[str, Any]:
        """Our config dataclass -> diffusers' config.json fields."""
        return cls.diffusers_config(config)

    @classmethod
    def read_config(cls, path: str | os.PathLike):
        """The config of a model folder (ours or diffusers'), and the weights file it names."""
        folder = Path(path)
        if not folder.is_dir():
            raise EncdiffError(f"{folder}: not a model folder (expected a directory with {CONFIG})")
        config_path = folder / CONFIG
        if (folder / "checkpoints").is_dir() and (folder / "model").is_dir():
            raise EncdiffError(f"{folder}: a training run folder, not a model folder: use its model "
                               f"({folder / 'model'})")
        if (folder / "checkpoints").is_dir():
            raise EncdiffError(f"{folder}: a training run folder, not a model folder, and it has not finished: "
                               f"let it finish, or `encdiff export {folder} OUT`")
        raw = read_json(config_path)
        if "_class_name" in raw:
            if raw["_class_name"] != cls.diffusers_class_name:
                raise EncdiffError(f"{config_path}: _class_name is {raw['_class_name']!r}; "
                                   f"{cls.__name__} loads {cls.diffusers_class_name!r} folders")
            try:
                config = cls.config_from_diffusers(raw)
            except EncdiffError as e:
                raise EncdiffError(f"{config_path}: {e}") from None
            except (TypeError, ValueError, ZeroDivisionError) as e:  # a value of a type no check foresaw
                raise EncdiffError(f"{config_path}: invalid {cls.diffusers_class_name} config ({e})") from None
            return config, folder / DIFFUSERS_WEIGHTS, None
        if raw.get("encdiff_class") != cls.__name__:
            raise EncdiffError(f"{config_path}: encdiff_class is {raw.get('encdiff_class')!r}, expected "
                               f"{cls.__name__!r} (or a diffusers {cls.diffusers_class_name} config)")
        if raw.get("format_version") != FORMAT_VERSION:
            raise EncdiffError(f"{config_path}: format_version {raw.get('format_version')!r} is not supported "
                               f"(this encdiff reads {FORMAT_VERSION})")
        if not isinstance(raw.get("config"), dict):
            raise EncdiffError(f"{config_path}: missing the 'config' object")
        # Our files carry every field: a missing one (sample_size, scaling_factor, ...) would silently take a default
        # and generate wrongly, so it is an error.
        missing = [f.name for f in dataclasses.fields(cls.config_class) if f.name not in raw["config"]]
        if missing:
            raise EncdiffError(f"{config_path}: config field {missing[0]!r} is missing (an encdiff model folder "
                               "records every field)")
        config = config_from_dict(cls.config_class, raw["config"], str(config_path))
        if not isinstance(raw.get("weights_sha256"), str):
            raise EncdiffError(f"{config_path}: missing 'weights_sha256' (every encdiff folder records its weights' hash)")
        return config, folder / OUR_WEIGHTS, raw["weights_sha256"]

    @classmethod
    def verify(cls, path: str | os.PathLike):
        """The config and weights file of a model folder, refused unless the weights are there, are safetensors and,
        for our format, match the recorded sha256 (a truncated, swapped or pickled file is named)."""
        config, weights_path, sha256 = cls.read_config(path)
        if not weights_path.is_file():
            raise EncdiffError(f"{weights_path}: weights file not found")
        if sha256 is not None and sha256_file(weights_path) != sha256:
            raise EncdiffError(f"{weights_path}: sha256 differs from the one recorded in {CONFIG} "
                               f"(the file was modified or truncated)")
        try:
            with safe_open(str(weights_path), framework="pt") as f:
                f.keys()
        except Exception as e:
            raise EncdiffError(f"{weights_path}: not a readable safetensors file ({type(e).__name__})") from None
        return config, weights_path

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu"):
        """Load a model folder written by encdiff or by diffusers' `save_pretrained`."""
        config, weights_path = cls.verify(path)
        state = read_weights(weights_path)
        with SkipRandomInit():  # on the CPU, not the meta device: arithmetic on meta tensors imports torch._dynamo
            model = cls(config)
        check_state_dict(model, state, weights_path)
        model.load_state_dict(state, assign=True)
        return model.to(device=device, dtype=dtype).eval()

    def save_pretrained(self, path: str | os.PathLike, *, diffusers: bool = False,
                        dtype: torch.dtype | None = None) -> Path:
        """Write a model folder: ours by default, diffusers' `from_pretrained` layout with `diffusers=True`.
        `dtype` (e.g. torch.float16) stores the floating-point weights in that precision."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        state = self.state_dict()
        if dtype is not None:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        if diffusers and self.diffusers_class_name is None:
            raise EncdiffError(f"{type(self).__name__} has no diffusers equivalent: it is saved in encdiff's format "
                               "only (export without --diffusers)")
        if diffusers:
            config = {"_class_name": self.diffusers_class_name, "_diffusers_version": DIFFUSERS_FORMAT_VERSION,
                      **self.config_to_diffusers(self.config)}
            atomic_save_tensors(state, folder / DIFFUSERS_WEIGHTS, metadata={"format": "pt"})
        else:
            digest = atomic_save_tensors(state, folder / OUR_WEIGHTS, metadata={"format": "pt"})
            config = {"encdiff_class": type(self).__name__, "format_version": FORMAT_VERSION,
                      "config": dataclasses.asdict(self.config), "weights_sha256": digest}
        # The config goes last: with our format, its sha256 vouches for the weights written before it.
        atomic_write_bytes(folder / CONFIG, (json.dumps(config, indent=2) + "\n").encode())
        return folder
