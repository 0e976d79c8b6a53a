"""Training on any image folder, resumable bit for bit, on one process or under torchrun: one loop, one recipe per stage.

    config.py        TrainConfig (every field checked), presets, loading, which fields a stage reads
    loop.py          processes, the run lock, optimizer groups, checkpoints, logs; `train_loop` runs a `Recipe`
    state.py         the training state on disk (atomic, exact)
    latents.py       latent statistics, latents encoded once and cached
    hooks.py         sample grids and evaluations while a generator trains
    autoencoder.py   stage 1: train_autoencoder
    diffusion.py     stage 2: train_diffusion
    distillation.py  train_consistency: a few-step student
    light_decoder.py train_light_decoder: a decoder a fifth of the cost for an autoencoder's latents
    guide.py         train_guide: autoguidance's guide for a generator
    export.py        export_run: a checkpoint (or a post-hoc EMA) as a model folder
"""

from .autoencoder import train_autoencoder
from .config import TrainConfig, load_config, stage_fields
from .diffusion import train_diffusion
from .distillation import train_consistency
from .light_decoder import train_light_decoder
from .export import export_run

__all__ = ["TrainConfig", "load_config", "stage_fields", "train_autoencoder", "train_diffusion", "train_consistency",
           "train_light_decoder", "export_run"]
