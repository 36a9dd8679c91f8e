"""Safe Latent Diffusion (Schramowski et al., CVPR 2023) as pure functions of noise predictions.

The math follows diffusers' ``StableDiffusionPipelineSafe`` denoising loop line by line (the inline
loop, not its ``perform_safety_guidance`` helper, which unpacks the branches in the wrong order).
Step i, elementwise over (B, C, H, W), with ε_u, ε_p, ε_S the unconditional, prompt and
safety-concept predictions:

    μ = min(1, s_S·|ε_p − ε_S|), and μ = 0 where ε_p − ε_S ≥ λ       (Eq. 5/6)
    γ = μ ⊙ (ε_S − ε_u) + s_m·ν                                       (Eq. 4/7)
    ν ← β_m·ν + (1 − β_m)·γ          (ν₀ = 0; also during warm-up)     (Eq. 8)
    ε̂ = ε_u + s·(ε_p − ε_u − [i ≥ δ]·γ)                               (Eq. 3)

Thresholds and scales are in ε space at SD1.x scale. Engines that predict x0 (ComfyUI) convert
with ``ε = (x − x0)/σ`` first; for a v-prediction model that is the ε-equivalent, whereas diffusers
thresholds the raw UNet output (v), so only ε-prediction models match diffusers exactly. Like diffusers,
SLD runs only with classifier-free guidance (cfg > 1). Nothing here imports an engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .cfg import cfg_noise

# diffusers' DEFAULT: Safe Stable Diffusion runs 50 steps; preset warm-ups count steps of such a run.
REFERENCE_STEPS = 50


@dataclass(frozen=True)
class SLDParams:
    """SLD hyperparameters, named as in diffusers (``sld_*``) and the paper.

    guidance_scale: s_S, scale of the elementwise safety weight before the clamp at 1 (≤ 1 disables SLD,
                    as in diffusers).
    warmup_steps:   δ, sampler steps before the safety term is applied (momentum accumulates meanwhile).
    threshold:      λ, elements where ε_p − ε_S ≥ λ get no safety guidance.
    momentum_scale: s_m, weight of the momentum ν in γ.
    momentum_beta:  β_m, momentum decay.
    """

    guidance_scale: float
    warmup_steps: int
    threshold: float
    momentum_scale: float
    momentum_beta: float

    def with_warmup(self, warmup_steps: int) -> "SLDParams":
        return replace(self, warmup_steps=int(warmup_steps))


# diffusers `SafetyConfig` (pipelines/stable_diffusion_safe/__init__.py). WEAK keeps diffusers' s_S = 20;
# several third-party ports use 200 instead (see web/docs/SafeLatentGuidance.md).
SLD_PRESETS: dict[str, SLDParams] = {
    "weak": SLDParams(guidance_scale=20.0, warmup_steps=15, threshold=0.0, momentum_scale=0.0, momentum_beta=0.0),
    "medium": SLDParams(guidance_scale=1000.0, warmup_steps=10, threshold=0.01, momentum_scale=0.3, momentum_beta=0.4),
    "strong": SLDParams(guidance_scale=2000.0, warmup_steps=7, threshold=0.025, momentum_scale=0.5, momentum_beta=0.7),
    "max": SLDParams(guidance_scale=5000.0, warmup_steps=0, threshold=1.0, momentum_scale=0.5, momentum_beta=0.7),
}


def sld_enabled(params: SLDParams) -> bool:
    """diffusers' switch: safety guidance runs only when ``sld_guidance_scale > 1``."""
    return params.guidance_scale > 1.0


def sld_safety_term(eps_uncond: Tensor, eps_cond: Tensor, eps_safety: Tensor, momentum: Tensor | None,
                    params: SLDParams) -> tuple[Tensor, Tensor]:
    """The safety guidance γ and the updated momentum ν.

    eps_uncond, eps_cond, eps_safety: (B, C, H, W) noise predictions ε_u, ε_p, ε_S.
    momentum: (B, C, H, W) ν from the previous step, or None for ν₀ = 0.
    Returns (γ, ν') with γ = μ ⊙ (ε_S − ε_u) + s_m·ν and ν' = β_m·ν + (1 − β_m)·γ; both (B, C, H, W).
    """
    if momentum is None:
        momentum = torch.zeros_like(eps_cond)
    difference = eps_cond - eps_safety
    scale = torch.clamp(torch.abs(difference) * params.guidance_scale, max=1.0)
    scale = torch.where(difference >= params.threshold, torch.zeros_like(scale), scale)
    gamma = torch.mul(eps_safety - eps_uncond, scale)
    gamma = gamma + params.momentum_scale * momentum
    new_momentum = params.momentum_beta * momentum + (1 - params.momentum_beta) * gamma
    return gamma, new_momentum


def sld_noise(eps_uncond: Tensor, eps_cond: Tensor, eps_safety: Tensor, cfg_scale: float, momentum: Tensor | None,
              step: int, params: SLDParams) -> tuple[Tensor, Tensor]:
    """The SLD-guided noise prediction of step ``step`` (0-based) and the new momentum.

    Equals diffusers' ``noise_pred`` handed to ``scheduler.step`` when SLD is enabled: the momentum
    is updated at every step, the safety term is subtracted from the CFG direction only once
    ``step >= params.warmup_steps``. When ``sld_enabled(params)`` is false this is plain CFG and the
    momentum is returned unchanged (diffusers' two-branch path).
    Shapes: all tensors (B, C, H, W); ``cfg_scale`` and ``step`` are plain numbers.
    """
    if not sld_enabled(params):
        return cfg_noise(eps_uncond, eps_cond, cfg_scale), momentum
    guidance = eps_cond - eps_uncond
    gamma, new_momentum = sld_safety_term(eps_uncond, eps_cond, eps_safety, momentum, params)
    if step >= params.warmup_steps:
        guidance = guidance - gamma
    return eps_uncond + cfg_scale * guidance, new_momentum


def sld_applies_at(step: int, params: SLDParams) -> bool:
    """Whether the safety term is subtracted at this 0-based step (warm-up is over)."""
    return sld_enabled(params) and step >= params.warmup_steps


def warmup_steps_from_fraction(fraction: float, total_steps: int) -> int:
    """Warm-up length in steps for a run of ``total_steps``: ``fraction`` of it, rounded half up.

    A preset's δ means δ/50 of a diffusers run; ``warmup_steps_from_fraction(δ / 50, 50) == δ``.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"warm-up fraction must lie in [0, 1], got {fraction}")
    return int(math.floor(fraction * total_steps + 0.5 + 1e-9))


def sampler_step_index(sample_sigmas: list[float], sigma: float) -> int:
    """0-based index of the sampler step a model call at noise level ``sigma`` belongs to.

    sample_sigmas: the run's schedule σ_0 > σ_1 > … > σ_N (N steps, usually σ_N = 0); for img2img it is
                   the truncated schedule, so the index counts steps actually run, as diffusers img2img.
    A call at σ_i, or at any intermediate σ in (σ_{i+1}, σ_i] (e.g. a DPM++ 2S midpoint), belongs to step i;
    a call above σ_0 (churn) to step 0. Heun's correction at σ_{i+1} therefore reports i + 1.
    """
    below_or_at = sum(1 for s in sample_sigmas[:-1] if s >= sigma * (1.0 - 1e-5))
    return max(below_or_at - 1, 0)


class StepMomentum:
    """The SLD momentum ν of one sampling run, advanced once per sampler step.

    Samplers such as Heun or DPM++ 2S evaluate the model more than once per step. Every evaluation
    of step i uses the momentum ν_i that step i started with; the update proposed by the last
    evaluation of step i becomes ν_{i+1} when the first evaluation of a later step arrives. With one
    evaluation per step (Euler, DPM++ 2M, DDIM) this is exactly diffusers' recursion.
    """

    def __init__(self):
        self.step = -1
        self.current: Tensor | None = None   # ν at the start of ``self.step``
        self.proposed: Tensor | None = None  # ν_{step+1} proposed by the latest evaluation of ``self.step``
        self.updates = 0                     # how many times ν advanced (one per completed step)

    def at_step(self, step: int) -> Tensor | None:
        """Momentum to use for an evaluation belonging to ``step``; advances ν if a new step began.

        An evaluation that reports an earlier step (noise added back above the previous σ, e.g. strong
        churn) counts as part of the current step: the momentum never runs backwards.
        """
        if step > self.step:
            if self.proposed is not None:
                self.current = self.proposed
                self.proposed = None
                self.updates += 1
            self.step = step
        return self.current

    def propose(self, new_momentum: Tensor) -> None:
        """Record the momentum the current step hands on (the last evaluation of a step wins)."""
        self.proposed = new_momentum
