"""SafeDenoiser at sampling time: a post-CFG hook that replaces ComfyUI's x0 prediction by the safe denoiser's.

The release (``implicit_negatives.safe_denoiser``) corrects the CFG x0 prediction x̂ of a DDIM step and
re-noises it with fresh noise before the step. Here the corrected x̂ simply becomes the "denoised" every
ComfyUI sampler steps with (the safe denoiser replaces the denoiser, as the paper's derivation reads), so
deterministic samplers stay deterministic. As a post-CFG function it stacks, in node order, with other
post-CFG patches (SafeLatentGuidance, RescaleCFG, ...) and with any negative prompt, text or implicit.

The hook is stateless: it holds the projected negation set (moved once to the model's load device, never
written), the parameters and the σ window, so there is no run state to reset and clones of the patched
MODEL share nothing that changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..safe_denoiser import (MAX_NEGATION_LATENTS, NegationSet, NegationSetError, SafeDenoiserParams,
                             check_negation_latents, project_negation_latents, safe_denoised)


def encode_negation_set(vae, images: torch.Tensor) -> NegationSet:
    """The negation set of an IMAGE batch (B, H, W, C in [0, 1]), encoded by ComfyUI's VAE as VAEEncode does."""
    if images is None or images.ndim != 4 or images.shape[0] == 0:
        raise NegationSetError("No images to encode: connect a batch of images of the concept to avoid "
                               "(e.g. Load Image, or several joined with Batch Images).")
    if images.shape[0] > MAX_NEGATION_LATENTS:
        raise NegationSetError(f"{images.shape[0]} images given; a negation set holds at most "
                               f"{MAX_NEGATION_LATENTS} (memory and time per step grow with it): pass a subset.")
    latents = vae.encode(images[:, :, :, :3]).float().cpu()
    check_negation_latents(latents, vae.latent_channels)
    height, width = images.shape[1:3]
    return NegationSet(latents=latents, source=f"EncodeNegationSet: {images.shape[0]} images {width}×{height}")


@dataclass(frozen=True, eq=False)
class SafeDenoiserPatch:
    """negation: (N, C, H, W) projected negation latents in the sampler's scale, float32.
    The safe denoiser acts while sigma_end ≤ σ ≤ sigma_start (ComfyUI's timestep-range rule).
    """

    negation: torch.Tensor
    params: SafeDenoiserParams
    sigma_start: float
    sigma_end: float

    def __deepcopy__(self, memo):
        # ModelPatcher.clone() deep-copies model_options; nothing here is ever written, so clones share it
        # instead of copying N·C·H·W floats at every clone.
        return self

    def post_cfg(self, args: dict) -> torch.Tensor:
        denoised = args["denoised"]
        sigma = float(args["sigma"].max())
        if sigma > self.sigma_start or sigma < self.sigma_end:
            return denoised
        if denoised.shape[1:] != self.negation.shape[1:]:
            raise NegationSetError(
                f"The negation set holds latents of shape {tuple(self.negation.shape[1:])} (C, H, W), but this "
                f"sampler denoises {tuple(denoised.shape[1:])}: encode the negation images at the size you sample "
                "(scale them with ImageScale to the latent's width and height before EncodeNegationSet).")
        safe = safe_denoised(denoised, self.negation.to(denoised.device), self.params)
        if not torch.isfinite(safe).all():
            raise FloatingPointError(
                f"SafeDenoiser: the corrected prediction holds NaN/Inf at sigma {sigma:.4g}. Sampling stops instead "
                "of continuing without the safe denoiser. Usual cause: fp16 overflow in the UNet (run with "
                "--force-fp32 or a bf16 model).")
        return safe


def patch_safe_denoiser(model, negation_set: NegationSet, params: SafeDenoiserParams, start_percent: float,
                        end_percent: float):
    """A clone of ``model`` whose samplers denoise with the safe denoiser between the two schedule percents."""
    if not isinstance(negation_set, NegationSet):
        raise NegationSetError(
            f"Expected a NEGATION_SET from EncodeNegationSet, got {type(negation_set).__name__}.")
    check_negation_latents(negation_set.latents, model.model.latent_format.latent_channels)
    if not 0.0 <= start_percent <= end_percent <= 1.0:
        raise ValueError(f"Need 0 ≤ start_percent ≤ end_percent ≤ 1, got {start_percent} and {end_percent}.")
    if params.bandwidth <= 0.0 or params.epsilon <= 0.0:
        raise ValueError(f"bandwidth and epsilon must be positive, got {params.bandwidth} and {params.epsilon}.")
    sampling = model.get_model_object("model_sampling")
    negation = project_negation_latents(model.model.process_latent_in(negation_set.latents.float()))
    patch = SafeDenoiserPatch(negation=negation.to(model.load_device), params=params,
                              sigma_start=sampling.percent_to_sigma(start_percent),
                              sigma_end=sampling.percent_to_sigma(end_percent))
    patched = model.clone()
    patched.set_model_sampler_post_cfg_function(patch.post_cfg)
    return patched
