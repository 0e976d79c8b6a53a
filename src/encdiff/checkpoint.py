"""Model folders on disk: safetensors weights plus a JSON config, ours or diffusers'.

Our folder: `config.json` ({"encdiff_class", "format_version", "config", "weights_sha256"}) and
`model.safetensors`. A diffusers folder: `config.json` with `_class_name` and
`diffusion_pytorch_model.safetensors`. Module names equal diffusers' keys, so only the config differs.
Loading validates everything before a model is returned, so nothing is ever half-loaded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import EncdiffError

FORMAT_VERSION = 1
OUR_WEIGHTS = "model.safetensors"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
CONFIG = "config.json"
# The diffusers release whose folder layout `save_pretrained(..., diffusers=True)` writes.
DIFFUSERS_FORMAT_VERSION = "0.30.0"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a crash leaves either the old file or the new one, never half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
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


def config_from_dict(config_class: type, values: dict[str, Any], where: str):
    """Build a frozen config dataclass from JSON values; unknown fields are an error, lists become tuples."""
    names = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise EncdiffError(f"{where}: unknown field {unknown[0]!r} for {config_class.__name__} "
                           f"(known: {', '.join(sorted(names))})")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    try:
        return config_class(**values)
    except EncdiffError as e:
        raise EncdiffError(f"{where}: {e}") from None
    except TypeError as e:
        raise EncdiffError(f"{where}: {e}") from None


def check_field(ok: bool, field: str, value: Any, expected: str) -> None:
    """Config validation: raise an error naming the field, its value and what would be valid."""
    if not ok:
        raise EncdiffError(f"config field {field!r} = {value!r}: expected {expected}")


def check_int(value: Any, field: str, minimum: int = 1) -> None:
    check_field(isinstance(value, int) and not isinstance(value, bool) and value >= minimum, field, value,
                f"an integer >= {minimum}")


def check_number(value: Any, field: str, *, positive: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    check_field(ok and (value > 0 or not positive), field, value, "a positive finite number" if positive else
                "a finite number")


def check_bool(value: Any, field: str) -> None:
    check_field(isinstance(value, bool), field, value, "true or false")


def check_tuple(value: Any, field: str, length: int | None, item_check) -> None:
    """A list/tuple (of `length` items, if given) whose every item passes `item_check(item) -> bool`."""
    ok = isinstance(value, (tuple, list)) and len(value) > 0 and (length is None or len(value) == length)
    check_field(ok and all(item_check(v) for v in value), field, value,
                f"a list of {length or 'one or more'} {item_check.__doc__}")


def is_positive_int(v: Any) -> bool:
    """positive integers"""
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def is_flag(v: Any) -> bool:
    """true/false values"""
    return isinstance(v, bool)


def is_finite_number(v: Any) -> bool:
    """finite numbers"""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse a weights file whose keys or shapes differ from the model's, naming the keys."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s), first {missing[0]!r}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s), first {unexpected[0]!r}")
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


class Pretrained:
    """`from_pretrained` / `save_pretrained` for a model with a frozen config dataclass.

    A subclass sets `config_class` and `diffusers_class_name` and converts its config to and from
    diffusers' (`config_from_diffusers`, `config_to_diffusers`).
    """

    config_class: ClassVar[type]
    diffusers_class_name: ClassVar[str]

    @classmethod
    def config_from_diffusers(cls, values: dict[str, Any]):
        raise NotImplementedError

    @staticmethod
    def config_to_diffusers(config) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def read_config(cls, path: str | os.PathLike):
        """The config of a model folder (ours or diffusers'), and the weights file it names."""
        folder = Path(path)
        if not folder.is_dir():
            raise EncdiffError(f"{folder}: not a model folder (expected a directory with {CONFIG})")
        config_path = folder / CONFIG
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
        config = config_from_dict(cls.config_class, raw["config"], str(config_path))
        if not isinstance(raw.get("weights_sha256"), str):
            raise EncdiffError(f"{config_path}: missing 'weights_sha256' (every encdiff folder records its weights' hash)")
        return config, folder / OUR_WEIGHTS, raw["weights_sha256"]

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu"):
        """Load a model folder written by encdiff or by diffusers' `save_pretrained`."""
        config, weights_path, sha256 = cls.read_config(path)
        if sha256 is not None and weights_path.is_file() and sha256_file(weights_path) != sha256:
            raise EncdiffError(f"{weights_path}: sha256 differs from the one recorded in {CONFIG} "
                               f"(the file was modified or truncated)")
        state = read_weights(weights_path)
        with torch.device("meta"):
            model = cls(config)
        check_state_dict(model, state, weights_path)
        model.load_state_dict(state, assign=True)
        return model.to(device=device, dtype=dtype).eval()

    def save_pretrained(self, path: str | os.PathLike, *, diffusers: bool = False) -> Path:
        """Write a model folder: ours by default, diffusers' `from_pretrained` layout with `diffusers=True`."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        state = self.state_dict()
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


def refuse_unsupported(values: dict[str, Any], supported: dict[str, Any], where: str) -> dict[str, Any]:
    """Take diffusers config fields, with defaults; an unknown field is refused, never ignored.
    Keys starting with "_" are bookkeeping (diffusers' own `_class_name`, ours `_encdiff_*`)."""
    values = {k: v for k, v in values.items() if not k.startswith("_")}
    unknown = sorted(set(values) - set(supported))
    if unknown:
        raise EncdiffError(f"{where} field {unknown[0]!r} = {values[unknown[0]]!r} is not supported by encdiff")
    return {**supported, **values}
