"""Classifier-free guidance in noise (ε) space, the form every guidance method here builds on."""

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
