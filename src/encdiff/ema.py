"""Exponential moving average of a model's weights, with the decay set by a half-life in training images
(EDM, Karras et al. 2022). Every rank keeps its own identical copy, so no communication is needed."""

from __future__ import annotations

import copy

import torch
from torch import nn

from .checkpoint import check_state_dict
from .errors import EncdiffError, is_finite_number


class AveragedCopy:
    """A frozen copy of a model (`model`: eval mode, no grad) that moves toward the live one: every parameter
    `average.lerp_(param, weight)`, every buffer (e.g. norm statistics) copied. What `EMA` and the post-hoc EMA's
    profiles (phema.PowerEMA) share.

    The update is one fused call per kind of tensor (`torch._foreach_lerp_`, as torch.optim.swa_utils' EMA does)
    over parameter lists gathered once per live model: walking a U-Net's module tree and updating its ~200 tensors
    one by one each step cost more host time than its forward pass at small batches (profiled in session 25), and
    on a GPU every one of those updates is a kernel launch. The fused update gives the same bits as the loop."""

    def __init__(self, model: nn.Module):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self._source: nn.Module | None = None
        self._lists: tuple[list[torch.Tensor], ...] = ()

    @torch.no_grad()
    def lerp_(self, model: nn.Module, weight: float) -> None:
        if model is not self._source:
            mine, theirs = list(self.model.parameters()), list(model.parameters())
            my_buffers, their_buffers = list(self.model.buffers()), list(model.buffers())
            if len(mine) != len(theirs) or len(my_buffers) != len(their_buffers):
                raise EncdiffError(f"weight average of a model with {len(mine)} parameters and {len(my_buffers)} "
                                   f"buffers updated from one with {len(theirs)} and {len(their_buffers)}")
            self._source, self._lists = model, (mine, theirs, my_buffers, their_buffers)
        mine, theirs, my_buffers, their_buffers = self._lists
        torch._foreach_lerp_(mine, theirs, weight)
        if my_buffers:
            torch._foreach_copy_(my_buffers, their_buffers)


class EMA:
    """Exponential moving average of a model's weights (EDM, Karras et al. 2022: the decay is set by a half-life
    in training images, beta = 0.5 ** (batch_images / halflife_images), with an optional ramp-up that caps the
    half-life at rampup_ratio * images_seen early in training).

    `model` is a deep copy in eval mode without grad: the EMA weights, usable for sampling directly.
    """

    def __init__(self, model: nn.Module, halflife_images: float, rampup_ratio: float | None = 0.05):
        if not (is_finite_number(halflife_images) and halflife_images > 0):
            raise EncdiffError(f"EMA halflife_images = {halflife_images!r}: expected a positive finite number")
        if rampup_ratio is not None and not (is_finite_number(rampup_ratio) and rampup_ratio > 0):
            raise EncdiffError(f"EMA rampup_ratio = {rampup_ratio!r}: expected a positive finite number or None")
        self.halflife_images = float(halflife_images)
        self.rampup_ratio = rampup_ratio
        self._average = AveragedCopy(model)
        self.model = self._average.model

    def beta(self, images_seen: int, batch_images: int) -> float:
        """The weight kept by the average in the update after a batch of `batch_images` that brought the
        total to `images_seen`."""
        halflife = self.halflife_images
        if self.rampup_ratio is not None:
            halflife = min(halflife, images_seen * self.rampup_ratio)
        # max(): a zero half-life (images_seen = 0) means "copy the weights", not a division by zero.
        return 0.5 ** (batch_images / max(halflife, 1e-8))

    @torch.no_grad()
    def update(self, model: nn.Module, images_seen: int, batch_images: int) -> None:
        """After an optimizer step; `images_seen` counts all images so far including this batch (global, all
        ranks). Every parameter: ema.lerp_(param, 1 - beta); buffers (e.g. norm statistics) are copied."""
        if batch_images < 1 or images_seen < batch_images:
            raise EncdiffError(f"EMA update with images_seen = {images_seen!r}, batch_images = {batch_images!r}: "
                               f"expected 1 <= batch_images <= images_seen")
        self._average.lerp_(model, 1.0 - self.beta(images_seen, batch_images))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy saved EMA weights in; keys and shapes must match the model's exactly."""
        check_state_dict(self.model, state, "EMA state")
        self.model.load_state_dict(state)
