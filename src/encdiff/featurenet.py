"""The feature network: a compact CIFAR-10 ResNet whose penultimate features define encdiff's metric space.

FID-style metrics need an image embedding. The standard one (Inception-v3, Szegedy et al. 2016, as used by
Heusel et al. 2017) must be downloaded, which fails offline; encdiff instead ships a small ResNet trained
here on CIFAR-10 (`encdiff train-feature-net DATA`), stored as fp16 safetensors inside the package, so
evaluation works right after install. Its numbers are NOT comparable to Inception FID: compare models
with each other on the same feature net, never with published FIDs (use `--inception PATH` for those).

Architecture: a ResNet-9-style net (Page 2018, "How to train your ResNet"): a stem conv, three stages
that each widen and halve the resolution (conv + max-pool), with a two-conv residual block after stages
1 and 3, global max-pool -> `feature_dim` features -> linear classifier. Training: seeded random crop
(4 px reflect padding) + flip, SGD with Nesterov momentum, a one-cycle (linear up, linear down) learning
rate, label smoothing, optional bf16 autocast (faster on CPUs with AVX512-BF16; weights stay float32).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import atomic_save_tensors, read_weights, shipped_file
from .errors import EncdiffError, count
from .images import to_unit

SHIPPED_WEIGHTS = "featurenet-cifar10.safetensors"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclass(frozen=True)
class FeatureNetConfig:
    widths: tuple[int, int, int, int] = (32, 64, 128, 256)  # stem, stage 1, stage 2, stage 3 channels
    num_classes: int = 10
    resolution: int = 32  # input images are resized to this before the net (bilinear, antialiased)
    class_names: tuple[str, ...] = CIFAR10_CLASSES
    logit_scale: float = 0.125  # scales the classifier output (Page 2018): keeps high-LR SGD stable
    # multiplies `features()`: set after training so that mean |f|^2 / feature_dim = 1 on the training images,
    # which keeps KID's kernel (x.y / d + 1)^3 in the range it was designed for (an O(1) x.y / d)
    feature_scale: float = 1.0
    # eval mode: features are the mean over the image and its mirror image. CIFAR-10 is mirror-symmetric (and
    # training flips it), so a metric should not tell a sample from its reflection; it also lifts test accuracy
    # (benchmarks/featurenet.md: 89.4% -> 90.3%). Training always sees single, randomly flipped images.
    flip_average: bool = True

    @property
    def feature_dim(self) -> int:
        return self.widths[3]


def conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class Residual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(conv_bn(channels, channels), conv_bn(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class FeatureNet(nn.Module):
    """Images in [-1, 1] (B, 3, H, W) -> `features()` (B, feature_dim) or logits (B, num_classes)."""

    name = "encdiff-featurenet"

    # Per-channel CIFAR-10 training-set mean/std of images in [0, 1]: the net normalises its own input,
    # so callers pass images exactly as the rest of encdiff represents them.
    MEAN = (0.4914, 0.4822, 0.4465)
    STD = (0.2470, 0.2435, 0.2616)

    def __init__(self, config: FeatureNetConfig = FeatureNetConfig()):
        super().__init__()
        self.config = config
        c0, c1, c2, c3 = config.widths
        self.stem = conv_bn(3, c0)
        self.stage1 = nn.Sequential(conv_bn(c0, c1), nn.MaxPool2d(2), Residual(c1))
        self.stage2 = nn.Sequential(conv_bn(c1, c2), nn.MaxPool2d(2))
        self.stage3 = nn.Sequential(conv_bn(c2, c3), nn.MaxPool2d(2), Residual(c3))
        self.classifier = nn.Linear(c3, config.num_classes, bias=False)
        self.register_buffer("mean", torch.tensor(self.MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.STD).view(1, 3, 1, 1), persistent=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features: the embedding every encdiff metric is computed in."""
        return self.pooled(x) * self.config.feature_scale

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] == 4:  # RGBA: seen as it is shown on white, as images read without alpha are
            alpha = (x[:, 3:] + 1) / 2
            x = x[:, :3] * alpha + (1 - alpha)
        r = self.config.resolution
        if x.shape[-2:] != (r, r):
            x = F.interpolate(x, size=(r, r), mode="bilinear", align_corners=False, antialias=True)
        x = ((x + 1) / 2 - self.mean) / self.std
        mirrored = self.config.flip_average and not self.training
        if mirrored:
            x = torch.cat([x, x.flip(-1)])
        x = torch.amax(self.stage3(self.stage2(self.stage1(self.stem(x)))), dim=(2, 3)).float()
        return (x[:len(x) // 2] + x[len(x) // 2:]) / 2 if mirrored else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pooled(x)) * self.config.logit_scale

    # --- files ---------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, dtype: torch.dtype = torch.float16, extra: dict | None = None) -> str:
        """Weights as safetensors with the config (and `extra`, e.g. accuracy) as JSON in the metadata."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in self.state_dict().items()}
        meta = {"encdiff_class": "FeatureNet", "config": json.dumps(asdict(self.config)),
                "info": json.dumps(extra or {})}
        return atomic_save_tensors(state, path, metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> "FeatureNet":
        """A FeatureNet from a file written by `save` (default: the weights shipped in the package), float32, eval."""
        if path is None:
            path = shipped_weights_path()
        path = Path(path)
        from safetensors import safe_open

        state = read_weights(path)
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("encdiff_class") != "FeatureNet" or "config" not in meta:
            raise EncdiffError(f"{path}: not an encdiff feature-net file (metadata encdiff_class is "
                               f"{meta.get('encdiff_class')!r}, expected 'FeatureNet'); write one with "
                               "`encdiff train-feature-net`")
        try:
            values = json.loads(meta["config"])
            values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
            config = FeatureNetConfig(**values)
        except (json.JSONDecodeError, TypeError) as e:
            raise EncdiffError(f"{path}: bad feature-net config in the metadata ({e})") from None
        net = cls(config)
        missing, unexpected = set(net.state_dict()) - set(state), set(state) - set(net.state_dict())
        if missing or unexpected:
            raise EncdiffError(f"{path}: weights do not match the config: missing {sorted(missing)[:5]}, "
                               f"unexpected {sorted(unexpected)[:5]}")
        for key, value in net.state_dict().items():
            if state[key].shape != value.shape:
                raise EncdiffError(f"{path}: {key} has shape {tuple(state[key].shape)}, expected {tuple(value.shape)}")
        net.load_state_dict({k: v.to(net.state_dict()[k].dtype) for k, v in state.items()})
        net.info = json.loads(meta.get("info", "{}"))
        return net.eval()


def shipped_weights_path() -> Path:
    return shipped_file(SHIPPED_WEIGHTS, "feature-net weights", "pass a file from `encdiff train-feature-net`")


# --- training ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FeatureNetTraining:
    epochs: int = 18
    batch_size: int = 512
    lr: float = 0.4  # peak of the one-cycle schedule (SGD, mean loss)
    warmup_fraction: float = 0.25  # of all steps, rising linearly from lr/10; then linear decay to 0
    momentum: float = 0.9
    weight_decay: float = 5e-4  # on conv/linear weights only; BatchNorm parameters are not decayed
    label_smoothing: float = 0.2
    seed: int = 0
    bf16: bool = True  # bf16 autocast for the forward/backward (CPU with AVX512-BF16, or CUDA)
    eval_every: int = 6  # epochs between test-split accuracies (and always after the last)


def augment(images: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """uint8 (B, C, H, W) -> randomly cropped (reflect padding `pad`) and flipped copies, seeded."""
    B, C, H, W = images.shape
    padded = F.pad(images.float(), (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (B,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (B,), generator=generator)
    flip = torch.rand(B, generator=generator) < 0.5
    cols = dx[:, None] + torch.arange(W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    rows = dy[:, None] + torch.arange(H)
    b = torch.arange(B)[:, None, None, None]
    c = torch.arange(C)[None, :, None, None]
    return padded[b, c, rows[:, None, :, None], cols[:, None, None, :]]


@torch.inference_mode()
def accuracy(net: FeatureNet, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000,
             bf16: bool = False) -> float:
    """Top-1 accuracy of `net` on uint8 images (N, C, H, W)."""
    net.eval()
    correct = 0
    for s in range(0, len(images), batch_size):
        x = to_unit(images[s:s + batch_size])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            correct += (net(x).argmax(1) == labels[s:s + batch_size]).sum().item()
    return correct / len(images)


@torch.inference_mode()
def calibrate_feature_scale(net: FeatureNet, images: torch.Tensor, n: int = 5000, seed: int = 0) -> FeatureNet:
    """A copy of `net` whose features have mean |f|^2 / feature_dim = 1 on a seeded subset of `images`."""
    from dataclasses import replace

    net.eval()
    idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]
    f = torch.cat([net.pooled(to_unit(images[idx[s:s + 500]])).double() for s in range(0, len(idx), 500)])
    scale = float((f.square().sum(1).mean() / f.shape[1]) ** -0.5)
    calibrated = FeatureNet(replace(net.config, feature_scale=scale))
    calibrated.load_state_dict(net.state_dict())
    return calibrated.eval()


def train_feature_net(train_images: torch.Tensor, train_labels: torch.Tensor, out: str | os.PathLike,
                      settings: FeatureNetTraining = FeatureNetTraining(),
                      config: FeatureNetConfig = FeatureNetConfig(),
                      test_images: torch.Tensor | None = None, test_labels: torch.Tensor | None = None,
                      log: Callable[[str], None] | None = None, init: str | os.PathLike | None = None) -> FeatureNet:
    """Train a FeatureNet on uint8 images (N, 3, H, W) with integer labels; deterministic for a seed.

    After every epoch the weights (float32) and optimiser state go to `out`.ckpt (atomic), so a run that
    is cut off resumes from its last epoch and, in the meantime, still leaves usable weights. The final
    weights are written to `out` in fp16 with the training settings and test accuracy in the metadata.
    `init`: start from the weights of a feature-net file (a second, shorter cycle: fine-tuning).
    """
    log = log or (lambda line: print(line, flush=True))  # flushed: the log of a background run stays current
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if train_images.ndim != 4 or train_images.dtype != torch.uint8 or train_images.shape[1] != 3:
        raise EncdiffError(f"training images have shape {tuple(train_images.shape)} dtype {train_images.dtype}; "
                           "expected uint8 (N, 3, H, W)")
    num_classes = int(train_labels.max()) + 1
    if num_classes > config.num_classes:
        raise EncdiffError(f"the data has {count(num_classes, 'class', 'classes')}, the config {config.num_classes}")
    torch.manual_seed(settings.seed)
    # bf16 autocast in NCHW measured fastest on the CPU (487 img/s vs 264 fp32 channels_last, 84 fp32 NCHW;
    # bf16 channels_last 150): see benchmarks/featurenet.md.
    net = FeatureNet(config)
    if init is not None:
        start = FeatureNet.load(init)
        if start.config.widths != config.widths or start.config.num_classes != config.num_classes:
            raise EncdiffError(f"{init}: widths {start.config.widths} / {start.config.num_classes} classes do not "
                               f"match the config's {config.widths} / {config.num_classes}")
        net.load_state_dict(start.state_dict())
    decay = [p for n, p in net.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in net.named_parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": settings.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=settings.lr, momentum=settings.momentum, nesterov=True)
    n = len(train_images)
    steps_per_epoch = n // settings.batch_size  # drop the last partial batch: every step has the same size
    total = settings.epochs * steps_per_epoch
    warm = max(1, int(settings.warmup_fraction * total))

    def lr_at(step: int) -> float:
        if step < warm:
            return settings.lr * (0.1 + 0.9 * step / warm)
        return settings.lr * max(0.0, (total - step) / max(1, total - warm))

    ckpt = out.with_name(out.name + ".ckpt")
    start_epoch = 0
    if ckpt.is_file():
        from safetensors import safe_open

        state = read_weights(ckpt)
        with safe_open(str(ckpt), "pt") as f:
            start_epoch = int(f.metadata()["epoch"])
        net.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("net.")})
        params = [p for g in opt.param_groups for p in g["params"]]
        for i, p in enumerate(params):
            opt.state[p]["momentum_buffer"] = state[f"momentum.{i}"]
        log(f"resumed from {ckpt} after epoch {start_epoch}")
    history = []
    started = time.perf_counter()
    for epoch in range(start_epoch, settings.epochs):
        # One generator per epoch, seeded by (seed, epoch): a resumed run sees the same batches.
        g = torch.Generator().manual_seed(settings.seed * 1000003 + epoch)
        order = torch.randperm(n, generator=g)
        net.train()
        t0, loss_sum = time.perf_counter(), 0.0
        for i in range(steps_per_epoch):
            idx = order[i * settings.batch_size:(i + 1) * settings.batch_size]
            x = to_unit(augment(train_images[idx], g))
            for group in opt.param_groups:
                group["lr"] = lr_at(epoch * steps_per_epoch + i)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=settings.bf16):
                logits = net(x)
            loss = F.cross_entropy(logits.float(), train_labels[idx], label_smoothing=settings.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item()
        record = {"epoch": epoch + 1, "loss": loss_sum / steps_per_epoch, "epoch_s": time.perf_counter() - t0}
        last = epoch + 1 == settings.epochs
        if test_images is not None and ((epoch + 1) % settings.eval_every == 0 or last):
            record["test_accuracy_bf16"] = accuracy(net, test_images, test_labels, bf16=settings.bf16)
        history.append(record)
        log(json.dumps(record))
        params = [p for grp in opt.param_groups for p in grp["params"]]
        tensors = {f"net.{k}": v for k, v in net.state_dict().items()}
        tensors.update({f"momentum.{i}": opt.state[p]["momentum_buffer"] for i, p in enumerate(params)})
        atomic_save_tensors(tensors, ckpt, metadata={"epoch": str(epoch + 1)})
        net.save(out.with_name(out.stem + ".last.safetensors"), dtype=torch.float32,
                 extra={"epochs_done": epoch + 1})
    info = {"settings": asdict(settings), "train_images": n, "history": history, "init": str(init) if init else None,
            "train_seconds_this_run": round(time.perf_counter() - started, 1)}
    if test_images is not None:
        net.eval()
        info["test_accuracy_fp32"] = accuracy(net, test_images, test_labels)
        info["test_images"] = len(test_images)
    net = calibrate_feature_scale(net, train_images)
    info["feature_scale"] = net.config.feature_scale
    net.save(out, dtype=torch.float16, extra=info)
    shipped = FeatureNet.load(out)
    if test_images is not None:
        info["test_accuracy_fp16_file"] = accuracy(shipped, test_images, test_labels)
        net.save(out, dtype=torch.float16, extra=info)
        log(f"test accuracy: {info['test_accuracy_fp32']:.4f} (float32), "
            f"{info['test_accuracy_fp16_file']:.4f} (fp16 file)")
    return FeatureNet.load(out)
