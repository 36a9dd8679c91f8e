"""Concept inversion: learn token vectors that make a frozen text-to-image model reproduce a concept.

The paper's recipe (Shin et al. 2025, after Pham et al.'s Concept Inversion): textual inversion on the
*unlearned* model, every weight frozen, only the embedding trained, with the plain denoising loss

    c* = argmin_c  E_{x0, eps, t} || eps - eps_theta(x_t, c, t) ||^2,    x_t = x0 + sigma_t * eps

(k-diffusion scaling; equal to DDPM's sqrt(a) x0 + sqrt(1 - a) eps up to the model's input scaling),
Adam with lr 5e-3, batch 1, 3000 steps, one vector.

This module is the engine-agnostic half: the optimisation loop over a ``loss_fn(vectors, step)`` the
caller builds for its engine (ComfyUI: ``trainer/comfy_inversion.py``), plus the small pure pieces every
engine needs (eps from an x0 prediction, the loss, timestep sampling, per-step random streams, caption
templates). Read top to bottom: configuration, pure helpers, the loop, resume state.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch

from .atomic_write import atomic_path
from .loss_scale import LossScale, unscale_gradient, update_loss_scale

# --------------------------------------------------------------------------- configuration


@dataclass
class InversionConfig:
    """Hyper-parameters of one inversion run. Defaults are the paper's (arXiv 2511.04834, §3.2)."""

    steps: int = 3000
    learning_rate: float = 5e-3
    seed: int = 0
    num_vectors: int = 1
    batch_size: int = 1
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    timestep_min: int = 0          # inclusive bounds of the training timestep range (of 1000 DDPM steps)
    timestep_max: int = 999
    max_grad_norm: Optional[float] = None  # clip the vectors' gradient norm; None = no clipping

    def __post_init__(self):
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"learning_rate must be a positive number, got {self.learning_rate}")
        if self.num_vectors < 1 or self.batch_size < 1:
            raise ValueError("num_vectors and batch_size must be at least 1")
        if not 0 <= self.timestep_min <= self.timestep_max <= 999:
            raise ValueError(f"need 0 <= timestep_min <= timestep_max <= 999, got "
                             f"{self.timestep_min}..{self.timestep_max}")
        self.adam_betas = tuple(self.adam_betas)

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- pure helpers


def denoising_loss(eps_pred: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Mean squared error between predicted and true noise, in float32 (scalar).

    eps_pred, noise: (B, C, H, W). The eps-prediction loss of textual inversion / Concept Inversion.
    """
    return torch.nn.functional.mse_loss(eps_pred.float(), noise.float(), reduction="mean")


def step_seed(seed: int, step: int) -> int:
    """A 63-bit seed for training step ``step`` of run ``seed``, independent of every other step.

    Drawing each step's noise, timesteps and data indices from a generator seeded by (seed, step)
    makes a step's randomness a pure function of its index: resuming at step k replays exactly
    what an uninterrupted run would have drawn, on any device.
    """
    digest = hashlib.sha256(f"implicit-negatives/{int(seed)}/{int(step)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def step_generator(seed: int, step: int) -> torch.Generator:
    """A CPU ``torch.Generator`` for one training step (draw on the CPU, then move to the device)."""
    return torch.Generator(device="cpu").manual_seed(step_seed(seed, step))


def sample_timesteps(batch_size: int, generator: torch.Generator, t_min: int = 0, t_max: int = 999) -> torch.Tensor:
    """Uniform integer DDPM timesteps in [t_min, t_max], shape (batch_size,), int64 on the CPU."""
    return torch.randint(t_min, t_max + 1, (batch_size,), generator=generator)


# Caption templates: "{}" is where the learned vectors go. "object" and "style" are the textual
# inversion templates of diffusers' example (ImageNet prompts); "bare" is the vectors alone.
CAPTION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "bare": ("{}",),
    "object": (
        "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
        "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
        "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}",
        "a cropped photo of a {}", "a photo of the {}", "a good photo of the {}", "a photo of one {}",
        "a close-up photo of the {}", "a rendition of the {}", "a photo of the clean {}",
        "a rendition of a {}", "a photo of a nice {}", "a good photo of a {}", "a photo of the nice {}",
        "a photo of the small {}", "a photo of the weird {}", "a photo of the large {}",
        "a photo of a cool {}", "a photo of a small {}",
    ),
    "style": (
        "a painting in the style of {}", "a rendering in the style of {}", "a cropped painting in the style of {}",
        "the painting in the style of {}", "a clean painting in the style of {}",
        "a dirty painting in the style of {}", "a dark painting in the style of {}",
        "a picture in the style of {}", "a cool painting in the style of {}",
        "a close-up painting in the style of {}", "a bright painting in the style of {}",
        "a good painting in the style of {}", "a close-up painting in the style of {}",
        "a rendition in the style of {}", "a nice painting in the style of {}",
        "a small painting in the style of {}", "a weird painting in the style of {}",
        "a large painting in the style of {}",
    ),
}
PLACEHOLDER = "{}"


def caption_parts(caption: str) -> tuple[str, str]:
    """Split a caption at its placeholder: ("a photo of a ", "") for "a photo of a {}".

    A caption without a placeholder gets the vectors in front, as Concept Inversion does for
    I2P prompts ("{} " + prompt). More than one placeholder is an error.
    """
    count = caption.count(PLACEHOLDER)
    if count == 0:
        return "", " " + caption.strip() if caption.strip() else ""
    if count > 1:
        raise ValueError(f"Caption {caption!r} has {count} '{{}}' placeholders; use at most one")
    before, after = caption.split(PLACEHOLDER)
    return before, after


NORM_FACTOR = 10.0  # "far outside": a learned vector 10x longer (or shorter) than every word's embedding


def norm_warning(vectors: torch.Tensor, token_table: torch.Tensor, factor: float = NORM_FACTOR) -> str:
    """"" when every learned vector's L2 norm lies within the token table's range widened by ``factor``
    ([min / factor, max * factor] over its finite, non-zero rows); otherwise a warning naming the norms.

    vectors: (N, D); token_table: (vocab, D). A vector far outside that range is not something the text
    encoder was ever trained on (e.g. a learning rate of 1e6 gives norms around 1e7): it usually means the
    training diverged, and the embedding dominates any prompt it is put in.
    """
    rows = token_table.detach().float().norm(dim=1)
    rows = rows[torch.isfinite(rows) & (rows > 0)]
    if rows.numel() == 0:
        return ""
    low, high = float(rows.min()), float(rows.max())
    norms = vectors.detach().float().norm(dim=1).tolist()
    if all(low / factor <= n <= high * factor for n in norms):
        return ""
    return (f"learned vector norms {', '.join(f'{n:.3g}' for n in norms)} lie far outside the token embeddings' "
            f"{low:.3g}..{high:.3g}: the training probably diverged; retrain with a lower learning rate")


# --------------------------------------------------------------------------- the loop


@dataclass
class InversionProgress:
    """What ``on_step`` receives after each optimiser step.

    step: number of completed steps (1-based); loss: that step's loss; vectors: (N, D) detached copy;
    state: a resume state for exactly this point (see ``save_state`` / ``load_state``);
    loss_scale: the loss scaling state after this step (None without loss scaling).
    """

    step: int
    total_steps: int
    loss: float
    vectors: torch.Tensor
    state: dict
    loss_scale: Optional[LossScale] = None


@dataclass
class InversionResult:
    """vectors: (N, D) float32, detached, on the device of ``init_vectors``; losses: one per step run;
    loss_scale: the final loss scaling state (scale, skipped steps), None without loss scaling."""

    vectors: torch.Tensor
    losses: list[float]
    steps_done: int
    state: dict = field(repr=False, default_factory=dict)
    loss_scale: Optional[LossScale] = None


LossFn = Callable[[torch.Tensor, int], torch.Tensor]


def invert_concept(loss_fn: LossFn, init_vectors: torch.Tensor, config: InversionConfig,
                   on_step: Optional[Callable[[InversionProgress], None]] = None,
                   state: Optional[dict] = None, loss_scale: Optional[LossScale] = None) -> InversionResult:
    """Optimise token vectors with Adam so that ``loss_fn`` falls; everything else stays frozen.

    loss_fn(vectors, step) -> scalar loss. ``vectors`` is the (N, D) float32 leaf being trained
        (requires_grad); ``step`` is the 0-based step index. The caller samples its data, noise and
        timesteps (ideally from ``step_generator(config.seed, step)``), builds the conditioning from
        the vectors and runs its frozen model.
    init_vectors: (N, D), e.g. the token embedding of an initialiser word.
    on_step: called after every step with an ``InversionProgress``; raise from it to stop
        (ComfyUI's interrupt, KeyboardInterrupt): the last progress' state resumes exactly.
    state: a state from a previous ``InversionProgress.state`` / ``InversionResult.state``;
        training continues from its step, vectors, optimiser moments, losses and loss scale.
    loss_scale: dynamic loss scaling for a float16 backward (``loss_scale.LossScale``, GradScaler's
        rule): the loss is multiplied by the scale, the gradient unscaled in float32 before clipping
        and Adam; a step whose scaled gradient is inf/NaN is skipped (the vectors and Adam's moments
        stay as they were) and the scale lowered. None: no scaling, and an inf/NaN gradient is an error.

    Gradients are taken with ``torch.autograd.grad`` with respect to the vectors only, so no
    ``.grad`` is ever written into the model's parameters.
    """
    if init_vectors.dim() != 2:
        raise ValueError(f"init_vectors must be (N, D), got shape {tuple(init_vectors.shape)}")
    vectors = init_vectors.detach().to(torch.float32).clone().requires_grad_(True)
    optimizer = torch.optim.Adam([vectors], lr=config.learning_rate, betas=config.adam_betas,
                                 eps=config.adam_eps, weight_decay=config.weight_decay)
    losses: list[float] = []
    start = 0
    if state is not None:
        start, losses, loss_scale = _restore(state, vectors, optimizer, config, loss_scale)

    for step in range(start, config.steps):
        loss = loss_fn(vectors, step)
        if loss.dim() != 0:
            raise ValueError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)}")
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise FloatingPointError(
                f"Loss became {loss_value} at step {step}; lower the learning rate or use float32 "
                "(the vectors are untouched by this step).")
        scale = 1.0 if loss_scale is None else loss_scale.scale
        (grad,) = torch.autograd.grad(loss * scale, [vectors])
        grad, finite = unscale_gradient(grad, scale)
        if finite:
            if config.max_grad_norm is not None:
                grad = grad * torch.clamp(config.max_grad_norm / (grad.norm() + 1e-12), max=1.0)
            vectors.grad = grad
            optimizer.step()
            vectors.grad = None
        elif loss_scale is None:
            raise FloatingPointError(
                f"The gradient became inf/NaN at step {step} (the loss was {loss_value}); train in float32, "
                "or in float16 with loss scaling (the vectors are untouched by this step).")
        if loss_scale is not None:
            loss_scale = update_loss_scale(loss_scale, finite)
        losses.append(loss_value)
        if on_step is not None:
            on_step(InversionProgress(step=step + 1, total_steps=config.steps, loss=loss_value,
                                      vectors=vectors.detach().clone(),
                                      state=_capture(step + 1, vectors, optimizer, losses, config, loss_scale),
                                      loss_scale=loss_scale))

    return InversionResult(vectors=vectors.detach().clone(), losses=losses, steps_done=config.steps,
                           state=_capture(config.steps, vectors, optimizer, losses, config, loss_scale),
                           loss_scale=loss_scale)


# --------------------------------------------------------------------------- resume state

STATE_FORMAT = "implicit-negatives-inversion-state/1"


def _capture(step: int, vectors: torch.Tensor, optimizer: torch.optim.Optimizer, losses: list[float],
             config: InversionConfig, loss_scale: Optional[LossScale]) -> dict:
    """A self-contained snapshot: tensors cloned to the CPU, plain Python otherwise."""
    opt = optimizer.state_dict()
    moments = {str(k): {name: (v.detach().cpu().clone() if torch.is_tensor(v) else v) for name, v in s.items()}
               for k, s in opt["state"].items()}
    snapshot = {
        "format": STATE_FORMAT,
        "step": int(step),
        "vectors": vectors.detach().cpu().clone(),
        "adam": moments,
        "losses": torch.tensor(losses, dtype=torch.float64),
        "config": config.to_dict(),
        "loss_scale": None if loss_scale is None else loss_scale.to_dict(),
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        snapshot["cuda_rng"] = torch.cuda.get_rng_state_all()
    return snapshot


def _restore(state: dict, vectors: torch.Tensor, optimizer: torch.optim.Optimizer, config: InversionConfig,
             loss_scale: Optional[LossScale]) -> tuple[int, list[float], Optional[LossScale]]:
    """Load ``state`` into the vectors, Adam and the RNGs; (step, losses, loss scale) to continue with.
    A scaled run continues from the state's loss scale, or starts ``loss_scale`` afresh when the state
    was trained without scaling (another precision)."""
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"Not an inversion state (format {state.get('format')!r}, expected {STATE_FORMAT!r})")
    saved = state["vectors"]
    if tuple(saved.shape) != tuple(vectors.shape):
        raise ValueError(f"The state holds vectors of shape {tuple(saved.shape)} but this run trains "
                         f"{tuple(vectors.shape)}; resume with the same number of vectors and model")
    for key in ("learning_rate", "seed", "num_vectors", "batch_size"):
        if key in state.get("config", {}) and state["config"][key] != getattr(config, key):
            raise ValueError(f"Cannot resume: the state was trained with {key}={state['config'][key]!r}, "
                             f"this run has {key}={getattr(config, key)!r}")
    step = int(state["step"])
    if step > config.steps:
        raise ValueError(f"The state is at step {step}, beyond this run's {config.steps} steps")
    with torch.no_grad():
        vectors.copy_(saved.to(vectors.device, vectors.dtype))
    opt = optimizer.state_dict()
    opt["state"] = {int(k): {name: (v.to(vectors.device) if torch.is_tensor(v) and v.dim() > 0 else v)
                             for name, v in s.items()} for k, s in state["adam"].items()}
    optimizer.load_state_dict(opt)
    torch.set_rng_state(state["torch_rng"])
    if "python_rng" in state:
        version, internal, gauss = state["python_rng"]
        random.setstate((version, tuple(internal), gauss))
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    if loss_scale is not None and state.get("loss_scale"):
        loss_scale = LossScale(**state["loss_scale"])
    return step, [float(x) for x in state["losses"].tolist()], loss_scale


def save_state(path: str, state: dict) -> None:
    """Write a resume state atomically (``torch.save`` of tensors and plain values only)."""
    with atomic_path(path) as temp:
        torch.save(state, temp)


def load_state(path: str) -> dict:
    """Read a resume state with ``torch.load(weights_only=True)``: no code in the file can run."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path} is not an inversion resume state")
    return state
