"""Training checkpoints: nested states (optimizers, LR schedules) through flatten/unflatten and disk exactly,
optimizers that continue bit-identically after a reload, atomic writes (a crash never leaves a partial
checkpoint that counts), keep_last, refusal of broken checkpoints naming the file, and RNG state."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from encdiff import EncdiffError
from encdiff import checkpoint
from encdiff.training import state as train_state
from encdiff.training.state import (flatten_state, latest_training_state, load_training_state, rng_state,
                                 save_training_state, set_rng_state, unflatten_state)


def assert_same(a, b, where="state"):
    """Equal nested states: same container types (tuple vs list, int vs str keys), bit-identical tensors."""
    assert type(a) is type(b), (where, type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}.{i}")
    else:
        assert a == b, where


def save_and_load(tmp_path: Path, state, prefix: str, step: int = 1):
    """Round trip a nested state through flatten, disk (JSON skeleton in meta) and unflatten."""
    tensors, skeleton = flatten_state(state, prefix)
    path = save_training_state(tmp_path, step, tensors, {"skeleton": skeleton})
    tensors, meta = load_training_state(path)
    return unflatten_state(tensors, meta["skeleton"])


def test_flatten_round_trip_keeps_types_keys_and_dtypes(tmp_path):
    state = {
        "a": torch.randn(2, 3), 0: {"step": torch.tensor(3.0), 7: torch.arange(4)},
        "nested": [torch.ones(2, dtype=torch.bfloat16), (0.9, 0.999), None, True, "text", 1e-8, 3],
        "__tensor__": "looks like a tag", "empty": torch.zeros(0, 5), "flags": torch.tensor([True, False]),
        "scalar_int": torch.tensor(5, dtype=torch.int64), "big": 2**40, "neg": float("-inf"),
    }
    tensors, skeleton = flatten_state(state, "x.")
    assert sorted(tensors) == ["x.0.7", "x.0.step", "x.a", "x.empty", "x.flags", "x.nested.0", "x.scalar_int"]
    assert_same(unflatten_state(tensors, json.loads(json.dumps(skeleton))), state)
    assert_same(save_and_load(tmp_path, state, "x."), state)


@pytest.mark.parametrize("state, where", [
    ({"a": {"b": object()}}, "'p.a.b'"), ({(1, 2): torch.zeros(1)}, "(1, 2)"),
    ({"a.b": torch.zeros(1), "a": {"b": torch.ones(1)}}, "'p.a.b'"),
])
def test_flatten_refuses_what_it_cannot_store(state, where):
    with pytest.raises(EncdiffError, match=f"key {where}" if where.startswith("'") else r"\(1, 2\)"):
        flatten_state(state, "p.")


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.SiLU(), nn.Linear(8, 2))


def train(model: nn.Module, optimizer, scheduler, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 4, generator=g)
        loss = (model(x) - x[:, :2]).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()


def warmup(step: int) -> float:
    return min(1.0, (step + 1) / 5)


@pytest.mark.parametrize("make_optimizer", [
    lambda p: torch.optim.AdamW(p, lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1),
    lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, nesterov=True),
], ids=["adamw", "sgd-momentum"])
def test_optimizer_and_schedule_resume_bit_identically(tmp_path, make_optimizer):
    model = make_model()
    optimizer = make_optimizer(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup)
    train(model, optimizer, scheduler, steps=3, seed=1)

    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt_tensors, opt_skeleton = flatten_state(optimizer.state_dict(), "optimizer.")
    sched_tensors, sched_skeleton = flatten_state(scheduler.state_dict(), "scheduler.")
    assert not sched_tensors
    meta = {"optimizer": opt_skeleton, "scheduler": sched_skeleton}
    path = save_training_state(tmp_path, 3, {**tensors, **opt_tensors}, meta)

    loaded, meta = load_training_state(path)
    restored_opt_state = unflatten_state(loaded, meta["optimizer"])
    assert_same(restored_opt_state, optimizer.state_dict())
    assert_same(unflatten_state(loaded, meta["scheduler"]), scheduler.state_dict())
    resumed = make_model()
    resumed.load_state_dict({k.removeprefix("model."): v for k, v in loaded.items() if k.startswith("model.")})
    resumed_opt = make_optimizer(resumed.parameters())
    resumed_sched = torch.optim.lr_scheduler.LambdaLR(resumed_opt, warmup)
    resumed_opt.load_state_dict(restored_opt_state)
    resumed_sched.load_state_dict(unflatten_state(loaded, meta["scheduler"]))

    train(model, optimizer, scheduler, steps=4, seed=2)
    train(resumed, resumed_opt, resumed_sched, steps=4, seed=2)
    assert resumed_sched.get_last_lr() == scheduler.get_last_lr()
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert_same(resumed_opt.state_dict(), optimizer.state_dict())


def test_rng_state_round_trip_reproduces_the_numbers(tmp_path):
    generator = torch.Generator().manual_seed(123)
    torch.randn(10, generator=generator)
    path = save_training_state(tmp_path, 5, {"rng.noise.rank0": rng_state(generator)}, {})
    expected = torch.randn(100, generator=generator)
    other = torch.Generator().manual_seed(7)
    set_rng_state(other, load_training_state(path)[0]["rng.noise.rank0"])
    assert torch.equal(torch.randn(100, generator=other), expected)
    with pytest.raises(EncdiffError, match="RNG state"):
        set_rng_state(other, torch.zeros(3, dtype=torch.uint8))


def save_step(run: Path, step: int, **kwargs) -> Path:
    return save_training_state(run, step, {"w": torch.full((3,), float(step))}, {"step": step}, **kwargs)


def visible(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def test_layout_and_latest(tmp_path):
    assert latest_training_state(tmp_path) is None
    path = save_step(tmp_path, 12)
    assert path == tmp_path / "checkpoints" / "step-00000012"
    assert sorted(p.name for p in path.iterdir()) == ["COMPLETE", "state.json", "state.safetensors"]
    marker = json.loads((path / "COMPLETE").read_text())
    assert set(marker["sha256"]) == {"state.json", "state.safetensors"}
    save_step(tmp_path, 100_000_000)  # more than 8 digits still sorts by number
    assert latest_training_state(tmp_path).name == "step-100000000"
    tensors, meta = load_training_state(latest_training_state(tmp_path))
    assert meta == {"step": 100_000_000} and torch.equal(tensors["w"], torch.full((3,), 1e8))


@pytest.mark.parametrize("crash_at", ["marker", "rename"])
def test_a_crash_while_saving_leaves_the_previous_checkpoint(tmp_path, monkeypatch, crash_at):
    save_step(tmp_path, 1)
    real_write, real_replace = checkpoint.atomic_write_bytes, os.replace

    def write(path, data):
        if path.name == "COMPLETE":
            raise OSError("disk full")
        real_write(path, data)

    def replace(src, dst):
        if Path(src).is_dir():  # the checkpoint dir's rename into place
            raise OSError("power cut")
        real_replace(src, dst)

    if crash_at == "marker":
        monkeypatch.setattr(train_state, "atomic_write_bytes", write)
    else:
        monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError):
        save_step(tmp_path, 2)
    monkeypatch.undo()
    assert latest_training_state(tmp_path).name == "step-00000001"
    assert visible(tmp_path) == ["step-00000001"]
    assert load_training_state(latest_training_state(tmp_path))[1] == {"step": 1}


def test_a_crash_replacing_the_same_step_keeps_the_old_one(tmp_path, monkeypatch):
    save_step(tmp_path, 4)
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append(Path(src).name)
        if Path(src).name.startswith(".tmp-") and Path(src).is_dir():
            raise OSError("power cut")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError):
        save_training_state(tmp_path, 4, {"w": torch.zeros(3)}, {"step": "new"})
    monkeypatch.undo()
    assert "step-00000004" in calls  # the old dir was moved aside, then back
    assert visible(tmp_path) == ["step-00000004"]
    assert load_training_state(tmp_path / "checkpoints" / "step-00000004")[1] == {"step": 4}
    save_training_state(tmp_path, 4, {"w": torch.zeros(3)}, {"step": "new"})
    assert visible(tmp_path) == ["step-00000004"]
    assert load_training_state(tmp_path / "checkpoints" / "step-00000004")[1] == {"step": "new"}


def test_leftovers_of_a_hard_kill_are_ignored_then_cleaned(tmp_path):
    save_step(tmp_path, 1)
    root = tmp_path / "checkpoints"
    shutil.copytree(root / "step-00000001", root / ".tmp-step-00000002-abc")  # killed before the rename
    (root / "step-00000003").mkdir()  # a dir without its marker never counts
    (root / "step-00000003" / "state.json").write_text("{}")
    assert latest_training_state(tmp_path).name == "step-00000001"
    with pytest.raises(EncdiffError, match="COMPLETE"):
        load_training_state(root / "step-00000003")
    save_step(tmp_path, 2)
    assert visible(tmp_path) == ["step-00000001", "step-00000002", "step-00000003"]
    assert latest_training_state(tmp_path).name == "step-00000002"


def test_bad_meta_writes_nothing(tmp_path):
    with pytest.raises(EncdiffError, match="state.json"):
        save_training_state(tmp_path, 1, {"w": torch.zeros(1)}, {"bad": torch.zeros(1)})
    assert latest_training_state(tmp_path) is None
    assert not (tmp_path / "checkpoints").exists()


def test_keep_last(tmp_path):
    for step in range(1, 6):
        save_step(tmp_path, step, keep_last=2)
    assert visible(tmp_path) == ["step-00000004", "step-00000005"]
    save_step(tmp_path, 2, keep_last=1)  # an older step (a resume from it): kept although not the newest
    assert visible(tmp_path) == ["step-00000002", "step-00000005"]
    with pytest.raises(EncdiffError, match="keep_last"):
        save_step(tmp_path, 6, keep_last=0)


def rewrite_marker(folder: Path) -> None:
    """Record the current files' hashes, as if the damage happened before the marker was written."""
    marker = json.loads((folder / "COMPLETE").read_text())
    marker["sha256"] = {n: checkpoint.sha256_file(folder / n) for n in marker["sha256"]}
    (folder / "COMPLETE").write_text(json.dumps(marker))


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage, name, message", [
    (lambda f: flip_a_byte(f / "state.safetensors"), "state.safetensors", "sha256"),
    (lambda f: truncate(f / "state.safetensors"), "state.safetensors", "sha256"),
    (lambda f: (f / "state.json").write_text('{"step": 2}'), "state.json", "sha256"),
    (lambda f: (f / "state.json").unlink(), "state.json", "not found"),
    (lambda f: (f / "COMPLETE").unlink(), "COMPLETE", "incomplete"),
    (lambda f: (f / "COMPLETE").write_text('{"sha256": '), "COMPLETE", "JSON"),
    (lambda f: (f / "COMPLETE").write_text('{"sha256": {}}'), "COMPLETE", "state.safetensors"),
    (lambda f: (truncate(f / "state.safetensors"), rewrite_marker(f)), "state.safetensors", "safetensors"),
    (lambda f: ((f / "state.json").write_text('{"step": '), rewrite_marker(f)), "state.json", "JSON"),
], ids=["flipped-tensors", "truncated-tensors", "edited-json", "missing-json", "missing-marker", "bad-marker",
        "empty-marker", "truncated-tensors-rehashed", "bad-json-rehashed"])
def test_broken_checkpoints_are_refused_naming_the_file(tmp_path, damage, name, message):
    folder = save_training_state(tmp_path, 1, {"w": torch.randn(64), "b": torch.zeros(3)}, {"step": 1})
    damage(folder)
    with pytest.raises(EncdiffError) as info:
        load_training_state(folder)
    assert str(folder / name) in str(info.value)
    assert message in str(info.value)
