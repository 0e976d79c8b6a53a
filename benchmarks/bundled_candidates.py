"""Training and sampling throughput of the candidate networks for the bundled CIFAR-10 generator, on this machine.

The bundled model is trained on a fixed CPU budget, so what a candidate costs per image decides how many images
it sees in training and what a 10k-sample evaluation costs. Random inputs and weights; quick timing (2 warm-up
calls, then the mean of 3-4), each candidate in float32 and with bf16 autocast.

    PYTHONPATH=src OMP_NUM_THREADS=2 python benchmarks/bundled_candidates.py
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from encdiff import Autoencoder, AutoencoderConfig, EDMDenoiser, UNet, UNetConfig, training_loss


def timeit(fn, n: int = 4) -> float:
    fn()
    fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


def train_speed(model, loss_fn, batch: int, bf16: bool) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return batch / timeit(step)


def autoencoders(g: torch.Generator) -> None:
    candidates = {
        "f4, 32-64-64, 1 block": AutoencoderConfig(block_out_channels=(32, 64, 64), attention_levels=(False,) * 3,
                                                   layers_per_block=1, latent_channels=4, norm_num_groups=16),
        "f4, 64-128-128, 1 block": AutoencoderConfig(block_out_channels=(64, 128, 128), attention_levels=(False,) * 3,
                                                     layers_per_block=1, latent_channels=4),
        "f2, 32-64, 1 block": AutoencoderConfig(block_out_channels=(32, 64), attention_levels=(False,) * 2,
                                                layers_per_block=1, latent_channels=4, norm_num_groups=16),
        # version 0.4's candidates (BENCHMARKS.md, "Stage 1 anew")
        "f4, 32-64-64, 1 block, 8x8x16": AutoencoderConfig(block_out_channels=(32, 64, 64),
                                                           attention_levels=(False,) * 3, layers_per_block=1,
                                                           latent_channels=16, norm_num_groups=16),
        "f4, 64-128-128, 1 block, 8x8x8": AutoencoderConfig(block_out_channels=(64, 128, 128),
                                                            attention_levels=(False,) * 3, layers_per_block=1,
                                                            latent_channels=8),
    }
    print("| autoencoder | params | train img/s fp32 | train img/s bf16 |\n|---|---|---|---|")
    for name, config in candidates.items():
        model = Autoencoder(config)

        def loss_fn(batch):
            x = torch.rand(batch, 3, 32, 32, generator=g) * 2 - 1
            reconstruction, posterior = model(x, generator=g)
            return F.l1_loss(reconstruction.float(), x) + 1e-6 * posterior.kl().mean()

        fp32, bf16 = (train_speed(model, loss_fn, 64, b) for b in (False, True))
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"| {name} | {params:.2f}M | {fp32:.0f} | {bf16:.0f} |", flush=True)


def unets(g: torch.Generator) -> None:
    def config(channels, attention, blocks, size=8):
        return UNetConfig(in_channels=4, out_channels=4, block_out_channels=channels, attention_levels=attention,
                          layers_per_block=blocks, attention_head_dim=32, scale_shift=True, flip_sin_to_cos=True,
                          freq_shift=0.0, num_classes=10, sample_size=size)

    candidates = {
        "8x8, 64-128-128, 2 blocks": config((64, 128, 128), (False, True, True), 2),
        "8x8, 64-128-128, 1 block": config((64, 128, 128), (False, True, True), 1),
        "8x8, 64-128, 2 blocks": config((64, 128), (False, True), 2),
        "8x8, 96-192, 2 blocks": config((96, 192), (False, True), 2),
        "8x8, 128-128, 1 block": config((128, 128), (False, True), 1),
        "16x16 (f2), 64-128-128, 2 blocks": config((64, 128, 128), (False, True, True), 2, size=16),
    }
    print("\n| U-Net | params | train img/s fp32 | bf16 | sampling forward img/s (batch 200) fp32 | bf16 |")
    print("|---|---|---|---|---|---|")
    for name, cfg in candidates.items():
        model = UNet(cfg)
        denoiser = EDMDenoiser(model, sigma_data=1.0)
        s = cfg.sample_size

        def loss_fn(batch):
            return training_loss(denoiser, torch.randn(batch, 4, s, s, generator=g), g,
                                 class_labels=torch.randint(0, 10, (batch,), generator=g), noise_level="lognormal",
                                 weighting="edm", label_dropout=0.1)

        row = []
        for bf16 in (False, True):
            model.train()
            row.append(train_speed(model, loss_fn, 128, bf16))
        x, sigma = torch.randn(200, 4, s, s, generator=g), torch.ones(200)
        labels = torch.randint(0, 11, (200,), generator=g)
        model.eval()
        for bf16 in (False, True):
            def forward():
                with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    denoiser(x, sigma, labels)
            row.append(200 / timeit(forward, 3))
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"| {name} | {params:.2f}M | " + " | ".join(f"{v:.0f}" for v in row) + " |", flush=True)


if __name__ == "__main__":
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    autoencoders(generator)
    unets(generator)
