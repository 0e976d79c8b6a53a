"""Side by side with diffusers' `train_unconditional` recipe at the bundled model's training budget (issue 16).

The peer is diffusers' examples/unconditional_image_generation/train_unconditional.py as the script has it:
`UNet2DModel`, `DDPMScheduler` (1000 steps, linear betas), epsilon-prediction MSE, AdamW (lr 1e-4, betas
0.95/0.999, weight decay 1e-6, eps 1e-8), cosine schedule with 500 warm-up steps, gradient clipping at 1, EMA with
warm-up (inv_gamma 1, power 3/4, max decay 0.9999), batch 16, float32, plus random horizontal flips, on CIFAR-10's
training split. Only the U-Net's size changes: the script's default (128..512 wide, 6 levels, ~110 M parameters)
could not take a single epoch in this budget. The peer gets the bundled U-Net's own shape in pixel space (widths
64/128/128, one ResNet block per level, attention at the two lower levels, 32-channel heads: 4.5 M parameters vs
the bundled U-Net's 4.96 M and 5.9 M with its autoencoder), so both sides have the same parameter class and the
comparison is latent vs pixel space at equal compute.

The budget is the bundled model's two training stages (configs/cifar10/autoencoder.toml: 1,400 steps x 64;
configs/cifar10/diffusion.toml: 8,000 steps x 128) in seconds of this machine, from step times measured in this
run, converted into the peer's optimizer steps: a busy machine later neither shortens nor lengthens it.

    python benchmarks/peer_quality.py budget --out runs/peer        # step times -> budget.json (quiet machine!)
    python benchmarks/peer_quality.py train --out runs/peer --data /tmp/cifar10/train   # resumable
    python benchmarks/peer_quality.py sample --out runs/peer --num 1000                # DDIM, 50 steps -> PNGs
    python benchmarks/peer_quality.py grid --out runs/peer --encdiff eval/peer-encdiff-samples  # side by side

`benchmarks/bundled.sh peer` runs them all with the evaluations.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from encdiff import Autoencoder, UNet, presets
from encdiff.autoencoder_loss import AutoencoderObjective
from encdiff.denoiser import EDMDenoiser, training_loss
from encdiff.images import image_grid, load_image, save_png, to_uint8
from encdiff.training.state import (latest_training_state, load_training_state, rng_state, save_training_state,
                                 set_rng_state)

try:
    from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
except ImportError as e:  # a benchmark dependency, not a runtime one
    raise SystemExit(f"this benchmark runs diffusers' recipe: pip install 'encdiff[test]' ({e})")

ROOT = Path(__file__).resolve().parent.parent
RECIPE = dict(batch_size=16, lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8, warmup_steps=500,
              grad_clip=1.0, ema_max_decay=0.9999, ema_inv_gamma=1.0, ema_power=0.75, ddpm_steps=1000,
              beta_schedule="linear", ddim_steps=50)


def peer_unet() -> UNet2DModel:
    """The bundled U-Net's shape (presets.UNETS['cifar10_latent']) on 32x32 RGB pixels, unconditional."""
    return UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(64, 128, 128), attention_head_dim=32,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"))


class Peer:
    """One optimizer step of train_unconditional.py (its loop body, without accelerate: one process)."""

    def __init__(self, total_steps: int, seed: int = 0):
        torch.manual_seed(seed)
        self.model = peer_unet()
        self.noise_scheduler = DDPMScheduler(num_train_timesteps=RECIPE["ddpm_steps"],
                                             beta_schedule=RECIPE["beta_schedule"], prediction_type="epsilon")
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=RECIPE["lr"], betas=RECIPE["betas"],
                                           weight_decay=RECIPE["weight_decay"], eps=RECIPE["eps"])
        self.lr_scheduler = get_scheduler("cosine", optimizer=self.optimizer,
                                          num_warmup_steps=RECIPE["warmup_steps"], num_training_steps=total_steps)
        self.ema = EMAModel(self.model.parameters(), decay=RECIPE["ema_max_decay"], use_ema_warmup=True,
                            inv_gamma=RECIPE["ema_inv_gamma"], power=RECIPE["ema_power"])
        self.generator = torch.Generator().manual_seed(seed)
        self.step = 0

    def train_step(self, clean: torch.Tensor) -> float:
        self.model.train()
        noise = torch.randn(clean.shape, generator=self.generator)
        timesteps = torch.randint(0, RECIPE["ddpm_steps"], (clean.shape[0],), generator=self.generator)
        noisy = self.noise_scheduler.add_noise(clean, noise, timesteps)
        loss = F.mse_loss(self.model(noisy, timesteps).sample.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), RECIPE["grad_clip"])
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad()
        self.ema.step(self.model.parameters())
        self.step += 1
        return loss.item()

    def save(self, out: Path, extra: dict) -> None:
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        tensors.update({f"ema.{i}": p.detach().clone() for i, p in enumerate(self.ema.shadow_params)})
        opt = self.optimizer.state_dict()
        for index, state in opt["state"].items():
            for name, value in state.items():
                tensors[f"opt.{index}.{name}"] = value.clone()
        tensors["rng"] = rng_state(self.generator)
        meta = {"step": self.step, "ema_step": self.ema.optimization_step, "lr_scheduler": self.lr_scheduler.state_dict(),
                "opt_param_groups": opt["param_groups"], "opt_states": sorted(opt["state"]), **extra}
        save_training_state(out, self.step, tensors, meta, keep_last=2)

    def resume(self, out: Path) -> dict | None:
        path = latest_training_state(out)
        if path is None:
            return None
        tensors, meta = load_training_state(path)
        self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        for i, p in enumerate(self.ema.shadow_params):
            p.copy_(tensors[f"ema.{i}"])
        self.ema.optimization_step = meta["ema_step"]
        state = {i: {name: tensors[f"opt.{i}.{name}"] for name in ("step", "exp_avg", "exp_avg_sq")}
                 for i in meta["opt_states"]}
        self.optimizer.load_state_dict({"state": state, "param_groups": meta["opt_param_groups"]})
        self.lr_scheduler.load_state_dict(meta["lr_scheduler"])
        set_rng_state(self.generator, tensors["rng"])
        self.step = meta["step"]
        print(f"resumed from {path} at step {self.step}", file=sys.stderr)
        return meta

    def ema_model(self) -> UNet2DModel:
        model = peer_unet()
        self.ema.copy_to(model.parameters())
        return model.eval()


# -- the budget ----------------------------------------------------------------------------------------------
def encdiff_steps() -> dict[str, callable]:
    """One optimizer step of each bundled training stage, as encdiff's trainer takes it (configs/cifar10/*.toml),
    on synthetic batches of the right shape: the step's arithmetic without data loading, like the peer's."""
    configs = {stage: tomllib.loads((ROOT / f"configs/cifar10/{stage}.toml").read_text())
               for stage in ("autoencoder", "diffusion")}
    g = torch.Generator().manual_seed(0)
    ae_cfg = configs["autoencoder"]
    autoencoder = Autoencoder(presets.AUTOENCODERS[ae_cfg["model"]])
    ae_opt = torch.optim.AdamW(autoencoder.parameters(), lr=ae_cfg["lr"], fused=True)
    objective = AutoencoderObjective(recon_loss=ae_cfg["recon_loss"], kl_weight=ae_cfg["kl_weight"], ssim_weight=0.0,
                                     fft_weight=0.0, adv_weight=0.0, fm_weight=0.0, discriminator=None,
                                     last_layer=autoencoder.decoder.conv_out.weight)
    x_ae = torch.rand(ae_cfg["batch_size"], 3, 32, 32, generator=g) * 2 - 1
    latent_shape = (ae_cfg["batch_size"], autoencoder.config.latent_channels, 8, 8)

    def ae_step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(ae_cfg.get("bf16"))):
            reconstruction, posterior = autoencoder(x_ae, noise=torch.randn(latent_shape, generator=g))
            loss = objective.loss(x_ae, reconstruction, posterior, False, None)
        loss = loss[0] if isinstance(loss, tuple) else loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(autoencoder.parameters(), 1.0)
        ae_opt.step()
        ae_opt.zero_grad(set_to_none=True)

    dm_cfg = configs["diffusion"]
    unet = UNet(presets.UNETS[dm_cfg["model"]])
    denoiser = EDMDenoiser(unet, sigma_data=dm_cfg["sigma_data"])
    dm_opt = torch.optim.AdamW(unet.parameters(), lr=dm_cfg["lr"], fused=True)
    z = torch.randn(dm_cfg["batch_size"], unet.config.in_channels, 8, 8, generator=g)
    labels = torch.randint(0, 10, (dm_cfg["batch_size"],), generator=g)

    def dm_step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(dm_cfg.get("bf16"))):
            loss = training_loss(denoiser, z, g, class_labels=labels, noise_level=dm_cfg["noise_level"],
                                 weighting=dm_cfg["weighting"], label_dropout=dm_cfg["label_dropout"],
                                 **dm_cfg["loss_options"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        dm_opt.step()
        dm_opt.zero_grad(set_to_none=True)

    return {"autoencoder": (ae_step, ae_cfg["steps"], ae_cfg["batch_size"]),
            "diffusion": (dm_step, dm_cfg["steps"], dm_cfg["batch_size"])}


def measure_budget(repeats: int = 7, steps_per_repeat: int = 5) -> dict:
    """Median seconds per optimizer step of each side, the three alternating every repeat."""
    steps = encdiff_steps()
    peer = Peer(total_steps=10_000)
    x_peer = torch.rand(RECIPE["batch_size"], 3, 32, 32) * 2 - 1
    steps["peer"] = (lambda: peer.train_step(x_peer), None, RECIPE["batch_size"])
    times: dict[str, list[float]] = {name: [] for name in steps}
    for name, (step, _, _) in steps.items():  # warm-up: allocator, oneDNN kernels
        for _ in range(2):
            step()
    for _ in range(repeats):
        for name, (step, _, _) in steps.items():
            start = time.perf_counter()
            for _ in range(steps_per_repeat):
                step()
            times[name].append((time.perf_counter() - start) / steps_per_repeat)
    per_step = {name: statistics.median(t) for name, t in times.items()}
    budget_s = sum(per_step[name] * steps[name][1] for name in ("autoencoder", "diffusion"))
    peer_steps = int(budget_s / per_step["peer"])
    return {"seconds_per_step": per_step,
            "images_per_s": {name: steps[name][2] / per_step[name] for name in steps},
            "encdiff_steps": {name: steps[name][1] for name in ("autoencoder", "diffusion")},
            "budget_s": budget_s, "peer_steps": peer_steps, "peer_images": peer_steps * RECIPE["batch_size"],
            "peer_parameters": sum(p.numel() for p in peer.model.parameters()),
            "encdiff_parameters": {"autoencoder": sum(p.numel() for p in Autoencoder(
                presets.AUTOENCODERS["cifar10_small"]).parameters()),
                "unet": sum(p.numel() for p in UNet(presets.UNETS["cifar10_latent"]).parameters())},
            "threads": torch.get_num_threads(), "recipe": RECIPE, "torch": torch.__version__}


# -- data, training, sampling ------------------------------------------------------------------------------
def load_cifar(folder: Path, cache: Path) -> torch.Tensor:
    """Every image of the class folders as uint8 (N, 3, 32, 32), cached as a plain .npy (no pickle)."""
    if cache.is_file():
        return torch.from_numpy(np.load(cache, allow_pickle=False))
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    images = np.stack([load_image(p, 32) for p in files])
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, images, allow_pickle=False)
    return torch.from_numpy(images)


def train(out: Path, data: Path, log_every: int = 100, checkpoint_every: int = 1000) -> None:
    budget = json.loads((out / "budget.json").read_text())
    total = budget["peer_steps"]
    images = load_cifar(data, out / "cifar10-train-uint8.npy")
    peer = Peer(total_steps=total)
    peer.resume(out)
    log_path = out / "metrics.jsonl"
    if log_path.is_file():  # rows after the checkpoint are about to be redone
        rows = [r for r in log_path.read_text().splitlines() if json.loads(r)["step"] <= peer.step]
        log_path.write_text("".join(r + "\n" for r in rows))
    # The data order (train_unconditional shuffles every epoch) and the flips from a stream of their own.
    order_g = torch.Generator().manual_seed(1)
    per_epoch = len(images) // RECIPE["batch_size"]  # the example's DataLoader keeps the last partial batch;
    # dropping it keeps every step at the recipe's batch size
    epoch_order, epoch = None, -1
    losses, start = [], time.perf_counter()
    with open(log_path, "a") as log:
        while peer.step < total:
            e, i = divmod(peer.step, per_epoch)
            if e != epoch:  # a resumed run redraws the same permutation: the order stream is keyed on the epoch
                order_g.manual_seed(1000 + e)
                epoch_order, flips = torch.randperm(len(images), generator=order_g), None
                flips = torch.rand(len(images), generator=order_g) < 0.5
                epoch = e
            idx = epoch_order[i * RECIPE["batch_size"]:(i + 1) * RECIPE["batch_size"]]
            x = images[idx].float() / 127.5 - 1
            x = torch.where(flips[idx].view(-1, 1, 1, 1), x.flip(-1), x)
            losses.append(peer.train_step(x))
            if peer.step % log_every == 0 or peer.step == total:
                row = {"step": peer.step, "loss": sum(losses) / len(losses), "lr": peer.lr_scheduler.get_last_lr()[0],
                       "images_per_s": len(losses) * RECIPE["batch_size"] / (time.perf_counter() - start)}
                log.write(json.dumps(row) + "\n")
                log.flush()
                print(json.dumps(row), file=sys.stderr)
                losses, start = [], time.perf_counter()
            if peer.step % checkpoint_every == 0 or peer.step == total:
                peer.save(out, {"budget": budget})
    from safetensors.torch import save_file

    model = peer.ema_model()
    (out / "model").mkdir(exist_ok=True)
    save_file(model.state_dict(), str(out / "model" / "diffusion_pytorch_model.safetensors"))
    (out / "model" / "config.json").write_text(json.dumps(dict(model.config), indent=2, default=list))


@torch.inference_mode()
def sample(out: Path, num: int, batch: int = 250, seed: int = 0) -> None:
    """DDIM, 50 steps, eta 0, from the EMA weights: PNGs under out/samples (the example's own evaluation uses
    its DDPM pipeline; DDIM at 50 steps is the cheaper sampler the issue names)."""
    from safetensors.torch import load_file

    model = peer_unet()
    model.load_state_dict(load_file(str(out / "model" / "diffusion_pytorch_model.safetensors")))
    model.eval()
    scheduler = DDIMScheduler(num_train_timesteps=RECIPE["ddpm_steps"], beta_schedule=RECIPE["beta_schedule"],
                              prediction_type="epsilon")
    scheduler.set_timesteps(RECIPE["ddim_steps"])
    folder = out / "samples"
    folder.mkdir(exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for first in range(0, num, batch):
        n = min(batch, num - first)
        x = torch.randn(n, 3, 32, 32, generator=g)
        for t in scheduler.timesteps:
            x = scheduler.step(model(x, t).sample, t, x, eta=0.0).prev_sample
        for k, img in enumerate(to_uint8(x.clamp(-1, 1))):
            save_png(img, folder / f"{first + k:06d}.png")
        print(f"{first + n}/{num} samples, {(first + n) / (time.perf_counter() - start):.1f} img/s", file=sys.stderr)


def grid(out: Path, encdiff_folders: list[Path], n: int = 50) -> None:
    """The first n samples of each side, side by side: peer | encdiff (each folder given)."""
    def first(folder: Path) -> torch.Tensor:
        files = sorted(folder.glob("*.png"))[:n]
        return torch.stack([torch.from_numpy(load_image(p, 32)) for p in files])

    panels = [first(out / "samples")] + [first(f) for f in encdiff_folders]
    gap = torch.full((3, 32 * (n // 10), 8), 255, dtype=torch.uint8)
    grids = [image_grid(p, rows=n // 10) for p in panels]
    parts = []
    for g_ in grids:
        parts += [g_, gap]
    save_png(torch.cat(parts[:-1], dim=2), out / "side-by-side.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=("budget", "train", "sample", "grid"))
    parser.add_argument("--out", type=Path, required=True, help="the peer's run folder")
    parser.add_argument("--data", type=Path, default=Path("/tmp/cifar10/train"))
    parser.add_argument("--num", type=int, default=1000)
    parser.add_argument("--encdiff", type=Path, nargs="*", default=[], help="grid: encdiff sample folders")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.stage == "budget":
        result = measure_budget()
        (args.out / "budget.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
    elif args.stage == "train":
        train(args.out, args.data)
    elif args.stage == "sample":
        sample(args.out, args.num)
    else:
        grid(args.out, args.encdiff)


if __name__ == "__main__":
    main()
