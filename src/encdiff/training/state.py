"""Training state on disk: run_dir/checkpoints/step-XXXXXXXX/ folders written atomically, resumable exactly.

Every tensor (weights, EMA, optimizer moments, every RNG) goes in one safetensors file, the rest in JSON, and a
COMPLETE marker holding the sha256 of both is written last: a folder without it is never resumed from. Nested states
such as an optimizer's are split into tensors plus a JSON skeleton (`flatten_state`), so no pickle is involved.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import (CHECKPOINTS, FORMAT_VERSION, atomic_save_tensors, atomic_write_bytes, read_json, read_weights,
                          sha256_file)
from ..errors import EncdiffError, check_int


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


def training_state_meta(path: str | os.PathLike) -> dict:
    """The meta (state.json) of a complete checkpoint dir alone, unverified: what a dry run says of a resume."""
    return read_json(Path(path) / STATE_META)


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
