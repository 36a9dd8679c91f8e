"""The pack's own socket types, declared once: every node that takes or gives one uses these."""

from comfy_api.latest import io

ImplicitNegativeType = io.Custom("IMPLICIT_NEGATIVE")

NegationSetType = io.Custom("NEGATION_SET")
"""Latents of images to steer away from (``implicit_negatives.safe_denoiser.NegationSet``)."""
