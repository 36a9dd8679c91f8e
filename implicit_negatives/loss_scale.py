"""Dynamic loss scaling for a float16 backward: ``torch.amp.GradScaler``'s rule, for the one tensor we train.

In float16 the gradients flowing back through a frozen UNet fall below the smallest float16 numbers
(the denoising loss is a mean over every latent element, so each element's gradient is tiny) and are
flushed to zero or lose most of their bits before they reach the token vectors. Multiplying the loss
by a large ``scale`` before backward lifts them into float16's range; multiplying the float32 gradient
by ``1 / scale`` afterwards gives the true gradient back, so Adam sees the unscaled gradient and its
update does not depend on the scale. A step whose scaled gradient overflowed (inf/NaN) is skipped and
the scale lowered; after ``growth_interval`` finite steps in a row it is raised again.

Defaults and update rule are GradScaler's (init_scale 2**16, growth 2, backoff 0.5, interval 2000), so
a run with Adam matches ``GradScaler.scale / step / update`` step for step (tests/test_loss_scale.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch


@dataclass(frozen=True)
class LossScale:
    """The state of dynamic loss scaling.

    scale: the factor the loss is multiplied by; good_steps: finite steps since the scale last changed
    (GradScaler's growth tracker); skipped_steps: steps skipped for an inf/NaN gradient so far.
    """

    scale: float = 2.0 ** 16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000
    good_steps: int = 0
    skipped_steps: int = 0

    def __post_init__(self):
        if not (self.scale > 0 and math.isfinite(self.scale)):
            raise ValueError(f"loss scale must be a positive number, got {self.scale}")
        if not (self.growth_factor > 1 and 0 < self.backoff_factor < 1 and self.growth_interval >= 1):
            raise ValueError("need growth_factor > 1, 0 < backoff_factor < 1 and growth_interval >= 1, got "
                             f"{self.growth_factor}, {self.backoff_factor}, {self.growth_interval}")

    def to_dict(self) -> dict:
        return asdict(self)


def unscale_gradient(grad: torch.Tensor, scale: float) -> tuple[torch.Tensor, bool]:
    """(the gradient of ``loss`` from the gradient of ``loss * scale``, whether every element is finite).

    grad: any shape; returned in float32, multiplied by the float32 reciprocal of ``scale`` as
    GradScaler's unscale does (exact for power-of-two scales, so scale 1 returns ``grad`` unchanged).
    """
    inverse = torch.tensor(scale, dtype=torch.float32).double().reciprocal().float()
    unscaled = grad.float() * inverse.to(grad.device)
    return unscaled, bool(torch.isfinite(unscaled).all())


def update_loss_scale(state: LossScale, finite: bool) -> LossScale:
    """The state after one step: backed off (and the step counted as skipped) when the gradient was
    not finite, grown after ``growth_interval`` finite steps in a row, else one more good step."""
    if not finite:
        return replace(state, scale=state.scale * state.backoff_factor, good_steps=0,
                       skipped_steps=state.skipped_steps + 1)
    if state.good_steps + 1 >= state.growth_interval:
        return replace(state, scale=state.scale * state.growth_factor, good_steps=0)
    return replace(state, good_steps=state.good_steps + 1)
