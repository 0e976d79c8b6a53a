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
import math
import os
import re
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .errors import EncdiffError

FORMAT_VERSION = 1
OUR_WEIGHTS = "model.safetensors"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
CONFIG = "config.json"
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


def shipped_file(name: str, what: str, instead: str) -> Path:
    """A file shipped inside the package under encdiff/weights/, with an error saying what to use instead."""
    path = Path(str(resources.files("encdiff") / "weights" / name))
    if not path.is_file():
        raise EncdiffError(f"{path}: the shipped {what} is missing (a broken install?); {instead}")
    return path


def check_field(ok: bool, field: str, value: Any, expected: str) -> None:
    """Config validation: raise an error naming the field, its value and what would be valid."""
    if not ok:
        raise EncdiffError(f"config field {field!r} = {value!r}: expected {expected}")


MAX_SIZE = 65536  # no channel count, image size, layer count or class count of a real model is larger


def check_int(value: Any, field: str, minimum: int = 1, maximum: int = MAX_SIZE) -> None:
    """An integer in [minimum, maximum]: the upper bound stops an absurd size before it reaches the allocator."""
    check_field(isinstance(value, int) and not isinstance(value, bool) and minimum <= value <= maximum, field, value,
                f"an integer from {minimum} to {maximum}")


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
    """positive integers up to 65536"""
    return isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_SIZE


def is_flag(v: Any) -> bool:
    """true/false values"""
    return isinstance(v, bool)


def is_finite_number(v: Any) -> bool:
    """finite numbers"""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path | str) -> None:
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
        with torch.device("meta"):
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


# ---------------------------------------------------------------------------------------------------------
# Training checkpoints: run_dir/checkpoints/step-XXXXXXXX/ with every tensor in one safetensors file, the
# rest in JSON, and a COMPLETE marker (the sha256 of both) written last. Nested states such as an
# optimizer's are split into tensors plus a JSON skeleton (`flatten_state`), so no pickle is involved.

CHECKPOINTS = "checkpoints"
STATE_TENSORS = "state.safetensors"
STATE_META = "state.json"
MARKER = "COMPLETE"
CHECKPOINT_NAME = re.compile(r"step-(\d{8,})")
# Temp and replaced-checkpoint dirs start with a dot: never mistaken for a checkpoint, deleted by the next save.
TEMP_PREFIXES = (".tmp-", ".old-")
# Skeleton tags. A dict whose keys are all strings not starting with "__" stays a plain JSON object so that
# state.json reads naturally; any other dict (the optimizer's int param ids) is stored as a list of pairs.
TENSOR_TAG, TUPLE_TAG, DICT_TAG = "__tensor__", "__tuple__", "__dict__"


def flatten_state(state: Any, prefix: str) -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested state (dicts/lists/tuples of tensors, numbers, strings, None, e.g.
    `optimizer.state_dict()`) into {prefix + dotted path: tensor} and a JSON-able skeleton in which each
    tensor is replaced by its key; `unflatten_state(tensors, skeleton)` rebuilds it exactly."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any, path: tuple[str, ...]) -> Any:
        where = prefix + ".".join(path)
        if isinstance(value, torch.Tensor):
            if where in tensors:  # e.g. {"a.b": x, "a": {"b": y}}
                raise EncdiffError(f"state key {where!r} occurs twice; keys containing '.' collide")
            tensors[where] = value
            return {TENSOR_TAG: where}
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, tuple):
            return {TUPLE_TAG: [walk(v, path + (str(i),)) for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [walk(v, path + (str(i),)) for i, v in enumerate(value)]
        if isinstance(value, dict):
            for key in value:
                if not (isinstance(key, str) or (isinstance(key, int) and not isinstance(key, bool))):
                    raise EncdiffError(f"state key {where!r}: dict key {key!r} is neither a string nor an integer")
            items = {k: walk(v, path + (str(k),)) for k, v in value.items()}
            if all(isinstance(k, str) and not k.startswith("__") for k in items):
                return items
            return {DICT_TAG: [[k, v] for k, v in items.items()]}
        raise EncdiffError(f"state key {where!r}: a {type(value).__name__} cannot be stored in a checkpoint "
                           f"(tensors, numbers, strings, None, lists, tuples and dicts can)")

    return tensors, walk(state, ())


def unflatten_state(tensors: dict[str, torch.Tensor], skeleton: Any) -> Any:
    """The nested state that `flatten_state` split into `tensors` and `skeleton`."""
    if isinstance(skeleton, list):
        return [unflatten_state(tensors, v) for v in skeleton]
    if not isinstance(skeleton, dict):
        return skeleton
    if len(skeleton) == 1 and TENSOR_TAG in skeleton:
        key = skeleton[TENSOR_TAG]
        if key not in tensors:
            raise EncdiffError(f"state key {key!r} is missing from the checkpoint's tensors")
        return tensors[key]
    if len(skeleton) == 1 and TUPLE_TAG in skeleton:
        return tuple(unflatten_state(tensors, v) for v in skeleton[TUPLE_TAG])
    if len(skeleton) == 1 and DICT_TAG in skeleton:
        return {k: unflatten_state(tensors, v) for k, v in skeleton[DICT_TAG]}
    return {k: unflatten_state(tensors, v) for k, v in skeleton.items()}


def rng_state(generator: torch.Generator) -> torch.Tensor:
    """The state of a torch generator (CPU or CUDA) as a uint8 CPU tensor, for `set_rng_state`."""
    return generator.get_state()


def set_rng_state(generator: torch.Generator, state: torch.Tensor) -> None:
    try:
        generator.set_state(state.cpu())
    except (RuntimeError, TypeError) as e:
        raise EncdiffError(f"RNG state ({state.dtype}, {state.numel()} values) does not fit a "
                           f"{generator.device} generator ({e})") from None


def fsync_dir(path: Path) -> None:
    """Make a rename or file creation inside `path` durable (the directory entry itself is data)."""
    if not hasattr(os, "O_DIRECTORY"):  # Windows cannot open a directory to fsync it
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_step(path: Path) -> int | None:
    """The step of a complete checkpoint dir (named step-N, holding the marker), else None."""
    match = CHECKPOINT_NAME.fullmatch(path.name)
    return int(match.group(1)) if match and (path / MARKER).is_file() else None


def complete_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, dir) of every complete checkpoint of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(step, p) for p in root.iterdir() if p.is_dir() and (step := checkpoint_step(p)) is not None]
    return sorted(found)


def save_training_state(run_dir: str | os.PathLike, step: int, tensors: dict[str, torch.Tensor], meta: dict,
                        keep_last: int = 3) -> Path:
    """Write run_dir/checkpoints/step-{step:08d}/ (state.safetensors, state.json, then the COMPLETE marker
    with both files' sha256) inside a temp dir renamed into place, replacing a dir of the same step; then
    delete complete checkpoints beyond the newest `keep_last` (never this one) and leftover temp dirs."""
    check_int(step, "step", minimum=0)
    check_int(keep_last, "keep_last")
    root = Path(run_dir) / CHECKPOINTS
    final = root / f"step-{step:08d}"
    bad = next((k for k, v in tensors.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))), None)
    if bad is not None:
        raise EncdiffError(f"{final}: tensors[{bad!r}] is not a tensor under a string key")
    try:  # before anything is written, so a bad meta leaves the run dir untouched
        meta_bytes = (json.dumps(meta, indent=1) + "\n").encode()
    except (TypeError, ValueError) as e:
        raise EncdiffError(f"{final / STATE_META}: meta is not JSON-serialisable ({e})") from None
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f"{TEMP_PREFIXES[0]}{final.name}-"))
    old = None
    try:
        tensors_sha = atomic_save_tensors(unshare(tensors), tmp / STATE_TENSORS)
        atomic_write_bytes(tmp / STATE_META, meta_bytes)
        marker = {"format_version": FORMAT_VERSION, "step": step,
                  "sha256": {STATE_TENSORS: tensors_sha, STATE_META: hashlib.sha256(meta_bytes).hexdigest()}}
        atomic_write_bytes(tmp / MARKER, (json.dumps(marker, indent=1) + "\n").encode())
        fsync_dir(tmp)
        if final.exists():
            # rename() cannot replace a non-empty dir: move the old one aside, and back if the swap fails.
            old = Path(tempfile.mkdtemp(dir=root, prefix=f"{TEMP_PREFIXES[1]}{final.name}-"))
            os.replace(final, old / final.name)
            try:
                os.replace(tmp, final)
            except BaseException:
                os.replace(old / final.name, final)
                raise
        else:
            os.replace(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and final.exists():  # else the old checkpoint may still be in there
            shutil.rmtree(old, ignore_errors=True)
        raise
    complete = complete_checkpoints(run_dir)
    newest = {p for _, p in complete[-keep_last:]}
    for _, path in complete:
        if path not in newest and path != final:
            shutil.rmtree(path)
    for path in root.iterdir():
        if path.is_dir() and path.name.startswith(TEMP_PREFIXES):
            shutil.rmtree(path, ignore_errors=True)
    return final


def unshare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing memory (tied weights, views): clone all but the first of each."""
    seen: set[tuple[str, int]] = set()
    out = {}
    for key, t in tensors.items():
        storage = (str(t.device), t.untyped_storage().data_ptr())
        out[key] = t.clone() if storage in seen and t.numel() else t
        seen.add(storage)
    return out


def latest_training_state(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint dir of a run (incomplete and temp dirs ignored), or None."""
    complete = complete_checkpoints(run_dir)
    return complete[-1][1] if complete else None


def load_training_state(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """The (tensors, meta) of a complete checkpoint dir, after checking both files against the marker's
    sha256; a missing marker or file, a hash mismatch, a truncated file or bad JSON raise naming the file."""
    folder = Path(path)
    if not folder.is_dir():
        raise EncdiffError(f"{folder}: not a checkpoint directory")
    marker_path = folder / MARKER
    if not marker_path.is_file():
        raise EncdiffError(f"{marker_path}: marker not found; the checkpoint is incomplete "
                           f"(interrupted while being written?)")
    digests = read_json(marker_path).get("sha256")
    for name in (STATE_TENSORS, STATE_META):
        file = folder / name
        if not isinstance(digests, dict) or not isinstance(digests.get(name), str):
            raise EncdiffError(f"{marker_path}: no sha256 recorded for {name}")
        if not file.is_file():
            raise EncdiffError(f"{file}: file not found")
        if sha256_file(file) != digests[name]:
            raise EncdiffError(f"{file}: sha256 differs from the one recorded in {MARKER} "
                               f"(the file was modified or truncated)")
    return read_weights(folder / STATE_TENSORS), read_json(folder / STATE_META)
