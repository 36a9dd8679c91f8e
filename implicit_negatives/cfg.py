"""Noise (ε) space: the conversion from ComfyUI's x0 predictions, and classifier-free guidance, the form every
guidance method here builds on."""

from __future__ import annotations

from torch import Tensor


def cfg_noise(eps_uncond: Tensor, eps_cond: Tensor, cfg_scale: float) -> Tensor:
    """Classifier-free guidance: ``ε_u + s·(ε_c − ε_u)``.

    eps_uncond: (B, C, H, W) prediction for the unconditional (or negative-prompt) branch.
    eps_cond:   (B, C, H, W) prediction for the prompt.
    cfg_scale:  s, the guidance scale (diffusers ``guidance_scale``, ComfyUI ``cfg``).

    A negative prompt (text or implicit negative) is simply its prediction passed as ``eps_uncond``.
    The operation order is diffusers' (``noise_pred_uncond + guidance_scale * (text - uncond)``).
    """
    return eps_uncond + cfg_scale * (eps_cond - eps_uncond)


def eps_from_denoised(x: Tensor, denoised: Tensor, sigma: Tensor) -> Tensor:
    """Noise prediction from an x0 prediction in k-diffusion scaling (``x = x0 + σ·ε``): ``(x − x0)/σ``.

    x, denoised: (B, C, H, W); sigma: (B,) noise levels. Returns (B, C, H, W). Holds for ε-, v- and
    x0-prediction models alike, since ComfyUI's ``apply_model`` (and every sampler) sees the model's x0 estimate.
    """
    return (x - denoised) / sigma.reshape(-1, *([1] * (x.ndim - 1)))
