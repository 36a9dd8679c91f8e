"""Erasure audit inside a graph: prompt a MODEL with C* and with the concept word, in caption templates, at
several seeds, with ComfyUI's own sampling; the node scores the images (``nodes/audit_nodes.py``).

C* sits where a template writes ``{}``, packed exactly as ComfyUI packs ``"... embedding:NAME ..."`` (the
tests compare with CLIPTextEncode bit for bit); the images equal KSampler + VAEDecode's for the same prompt
and seed. ComfyUI's Cancel is checked at every sampler step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..embedding_io import ImplicitNegative
from .clip import TEMPLATE_SLOT, CaptionTemplateError, template_tokens


def parse_templates(text: str) -> list[str]:
    """One template per non-empty line, each with ``{}`` exactly once (where C* or the word goes)."""
    templates = [line.strip() for line in text.splitlines() if line.strip()]
    if not templates:
        raise CaptionTemplateError("templates is empty: write one caption per line with {} where the concept goes, "
                                   "e.g. '{}' (C* alone) and 'a photo of {}'")
    bad = [t for t in templates if t.count(TEMPLATE_SLOT) != 1]
    if bad:
        raise CaptionTemplateError(f"templates {bad} must hold '{{}}' exactly once (where C* or the word goes)")
    return templates


@dataclass(frozen=True)
class AuditPrompt:
    kind: str        # "cstar" or "word"
    slot: int        # template index
    template: str
    seed: int


def audit_prompts(templates: list[str], count: int, seed: int) -> list[AuditPrompt]:
    """C* in every template, then the word in every template, each at seeds seed .. seed + count - 1."""
    return [AuditPrompt(kind, slot, template, seed + k) for kind in ("cstar", "word")
            for slot, template in enumerate(templates) for k in range(count)]


def sample_image(model, vae, positive, negative, seed: int, steps: int, cfg: float, sampler_name: str,
                 scheduler: str, width: int, height: int, on_step: Callable[[], None]) -> torch.Tensor:
    """One image (1, H, W, 3) exactly as EmptyLatentImage -> KSampler (denoise 1) -> VAEDecode make it;
    ``on_step()`` runs after every sampler step."""
    import comfy.model_management
    import comfy.sample
    latent = torch.zeros([1, 4, height // 8, width // 8], device=comfy.model_management.intermediate_device())
    latent = comfy.sample.fix_empty_latent_channels(model, latent)
    noise = comfy.sample.prepare_noise(latent, seed, None)
    samples = comfy.sample.sample(model, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent,
                                  denoise=1.0, callback=lambda step, x0, x, total: on_step(), disable_pbar=True,
                                  seed=seed)
    images = vae.decode(samples)
    return images.reshape(-1, *images.shape[-3:]) if images.dim() == 5 else images


def generate_audit_images(model, clip, vae, negative: ImplicitNegative, concept: str, prompts: list[AuditPrompt],
                          steps: int, cfg: float, sampler_name: str, scheduler: str, width: int, height: int,
                          on_step: Callable[[], None]) -> torch.Tensor:
    """(len(prompts), H, W, 3): each prompt's image, the negative the empty prompt (diffusers' unconditional).
    ComfyUI's interrupt flag is checked before every step, so Cancel stops within one step."""
    import comfy.model_management

    def step():
        comfy.model_management.throw_exception_if_processing_interrupted()
        on_step()

    empty = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    conditioning = {}
    for prompt in prompts:
        if (prompt.kind, prompt.slot) not in conditioning:
            tokens = (template_tokens(clip, negative, prompt.template) if prompt.kind == "cstar"
                      else clip.tokenize(prompt.template.replace(TEMPLATE_SLOT, concept)))
            conditioning[(prompt.kind, prompt.slot)] = clip.encode_from_tokens_scheduled(tokens)
    comfy.model_management.throw_exception_if_processing_interrupted()
    return torch.cat([sample_image(model, vae, conditioning[(p.kind, p.slot)], empty, p.seed, steps, cfg,
                                   sampler_name, scheduler, width, height, step) for p in prompts])
