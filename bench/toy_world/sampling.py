"""DDIM sampling of the toy model with the guidance variants under test.

The guidance itself is the project's own core code: plain CFG and negative prompting call
`implicit_negatives.cfg.cfg_noise` (a negative prompt is the eps of the negative conditioning used as
eps_uncond), Safe Latent Diffusion calls `implicit_negatives.sld.sld_noise`. This module only adapts the
toy model to them: it batches the UNet branches and runs the DDIM update. The Safe Denoiser
(`implicit_negatives.safe_denoiser.safe_denoised`) corrects the x0 prediction of the guided eps, as the pack's
node does with ComfyUI's post-CFG denoised, on the steps whose DDPM timestep is in its window.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from implicit_negatives.cfg import cfg_noise
from implicit_negatives.safe_denoiser import SafeDenoiserParams, safe_denoised
from implicit_negatives.sld import REFERENCE_STEPS, SLD_PRESETS, SLDParams, sld_noise, warmup_steps_from_fraction

from .model import ToyDiffusion


@dataclass(frozen=True)
class Guidance:
    """How eps is combined at each step.

    kind: "cfg" (uncond + text), "negative" (the negative conditioning replaces uncond) or "sld"
    (uncond, text and safety branches). `context`: (1, L, D) negative / safety conditioning, or (B, L, D)
    one per prompt; None for cfg. `negation` (N, 3, 16, 16): with `safe`, the Safe Denoiser's projected
    negation set, acting on steps with DDPM timestep t >= `safe_min_t` (SGF's early window).
    """

    kind: str = "cfg"
    context: torch.Tensor | None = None
    sld: SLDParams | None = None
    negation: torch.Tensor | None = None
    safe: SafeDenoiserParams | None = None
    safe_min_t: int = 800


def sld_params_for_steps(preset: str, steps: int) -> SLDParams:
    """The diffusers SLD preset with its warm-up rescaled from 50 steps to `steps` (same fraction)."""
    params = SLD_PRESETS[preset]
    return params.with_warmup(warmup_steps_from_fraction(params.warmup_steps / REFERENCE_STEPS, steps))


def ddim_timesteps(steps: int, T: int = ToyDiffusion.T) -> torch.Tensor:
    """Descending timesteps of a `steps`-step DDIM run ("leading" spacing + offset 1, as SD's scheduler)."""
    return (torch.arange(steps) * (T // steps)).flip(0) + 1


def initial_noise(n: int, seed: int, size: int = 16) -> torch.Tensor:
    """x_T for image j = N(0, I) from generator seed `seed * 100_003 + j`, so the same (seed, j) gets the
    same noise in every condition and model: the pairing that preservation (PP) is measured on."""
    return torch.stack([torch.randn(3, size, size, generator=torch.Generator().manual_seed(seed * 100_003 + j))
                        for j in range(n)])


@torch.no_grad()
def sample(model: ToyDiffusion, cond: torch.Tensor, noise: torch.Tensor, guidance: Guidance = Guidance(),
           cfg_scale: float = 7.5, steps: int = 25, batch_size: int = 256) -> torch.Tensor:
    """Images (B, 3, 16, 16) in [-1, 1] for text conditioning `cond` (B, L, D) from x_T = `noise`."""
    def part(i: int) -> Guidance:
        per_prompt = guidance.context is not None and guidance.context.shape[0] > 1
        return replace(guidance, context=guidance.context[i:i + batch_size]) if per_prompt else guidance

    out = [_sample_batch(model, cond[i:i + batch_size], noise[i:i + batch_size], part(i), cfg_scale, steps)
           for i in range(0, cond.shape[0], batch_size)]
    return torch.cat(out)


def _sample_batch(model, cond, x, guidance, cfg_scale, steps):
    b = cond.shape[0]
    uncond = model.encode([""]).expand(b, -1, -1)
    if guidance.kind == "cfg":
        contexts = [uncond, cond]
    elif guidance.kind == "negative":
        contexts = [guidance.context.expand(b, -1, -1), cond]
    elif guidance.kind == "sld":
        contexts = [uncond, cond, guidance.context.expand(b, -1, -1)]
    else:
        raise ValueError(f"unknown guidance kind {guidance.kind!r}; use 'cfg', 'negative' or 'sld'")
    context = torch.cat(contexts)
    ab = model.alphas_cumprod
    ts = ddim_timesteps(steps)
    momentum = None  # SLD's nu_0 = 0
    for i, t in enumerate(ts.tolist()):
        tt = torch.full((b * len(contexts),), t, dtype=torch.long)
        eps = model.unet(x.repeat(len(contexts), 1, 1, 1), tt, context).chunk(len(contexts))
        if guidance.kind == "sld":
            e, momentum = sld_noise(eps[0], eps[1], eps[2], cfg_scale, momentum, i, guidance.sld)
        else:
            e = cfg_noise(eps[0], eps[1], cfg_scale)
        if guidance.negation is not None and t >= guidance.safe_min_t:
            e = safe_denoised_eps(x, e, t, ab, guidance.negation, guidance.safe)
        x = ddim_step(x, e, t, int(ts[i + 1]) if i + 1 < len(ts) else -1, ab)
    return x.clamp(-1, 1)


def safe_denoised_eps(x: torch.Tensor, eps: torch.Tensor, t: int, alphas_cumprod: torch.Tensor,
                      negation: torch.Tensor, params: SafeDenoiserParams) -> torch.Tensor:
    """eps whose x0 prediction is the Safe Denoiser's correction of the one `eps` implies at timestep t."""
    a_t = alphas_cumprod[t]
    x0 = safe_denoised((x - (1 - a_t).sqrt() * eps) / a_t.sqrt(), negation, params)
    return (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()


def ddim_step(x: torch.Tensor, eps: torch.Tensor, t: int, t_prev: int, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) from timestep t to t_prev (-1 = the clean image)."""
    a_t = alphas_cumprod[t]
    a_prev = alphas_cumprod[t_prev] if t_prev >= 0 else torch.tensor(1.0)
    x0 = ((x - (1 - a_t).sqrt() * eps) / a_t.sqrt()).clamp(-1, 1)  # images live in [-1, 1]
    # Re-derive eps from the clipped x0 so the step stays on a consistent trajectory; keeping the raw
    # eps (diffusers' clip_sample) collapses this pixel-space model's samples to grey noise.
    eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
    return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
