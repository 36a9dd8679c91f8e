"""SafeLatentGuidance: Safe Latent Diffusion as a MODEL patch for the stock KSampler.

Node ID, input names and input order are public API (saved workflows store them): append new
inputs at the end, never rename or reorder.
"""

from __future__ import annotations

import logging

from comfy_api.latest import io

from implicit_negatives.sld import REFERENCE_STEPS, SLD_PRESETS, SLDParams, sld_enabled
from implicit_negatives.comfyui.sld_patch import (SafeLatentGuidancePatch, Warmup, check_model, check_safety_concept,
                                                 check_safety_source)

PRESETS = ("weak", "medium", "strong", "max", "custom")
WARMUP_UNITS = ("fraction_of_run", "steps")
CUSTOM_ONLY = " Used only when preset is 'custom'."


def preset_table() -> str:
    return "; ".join(f"{name}: s_S {p.guidance_scale:g}, δ {p.warmup_steps}, λ {p.threshold:g}, s_m {p.momentum_scale:g}, "
                     f"β_m {p.momentum_beta:g}" for name, p in SLD_PRESETS.items())


class SafeLatentGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SafeLatentGuidance",
            display_name="Safe Latent Guidance (SLD)",
            category="sampling/safety",
            description=(
                "Safe Latent Diffusion (Schramowski et al., CVPR 2023) for the stock KSampler: at every step the model "
                "is also evaluated on the safety concept, and where the prompt's prediction agrees with it the image "
                "is steered away from it (elementwise, in noise space, as diffusers' StableDiffusionPipelineSafe: "
                "exactly for ε-prediction models; on v-prediction models the thresholds act on the ε-equivalent, "
                "where diffusers uses the raw v output). Off when cfg <= 1, as in diffusers. Feed an implicit negative (ImplicitNegativeConditioning) as the safety "
                "concept: on concept-erased models it works where the words no longer do. Costs one extra model "
                "evaluation per step, batched with the prompt's by default (as in diffusers). Presets are diffusers' "
                "SafetyConfig; Weak uses diffusers' s_S = 20 (some ports use 200: pick custom for that). The safety "
                "pass gets no ControlNet, areas or masks."),
            inputs=[
                io.Model.Input("model", tooltip="The model to protect (SD1.x, SD2.x or SDXL). It is cloned, not changed."),
                io.Conditioning.Input(
                    "safety_concept",
                    tooltip=("The concept to steer away from: ImplicitNegativeConditioning's output, or a text encode "
                             "such as diffusers' default 'an image showing hate, harassment, violence, …'.")),
                io.Combo.Input(
                    "preset", options=list(PRESETS), default="medium",
                    tooltip=("diffusers SafetyConfig values (" + preset_table() + "). custom uses the fields below. "
                             "Weak's s_S is diffusers' 20; several third-party ports use 200.")),
                io.Combo.Input(
                    "warmup_unit", options=list(WARMUP_UNITS), default="fraction_of_run",
                    tooltip=("How the warm-up δ is counted. fraction_of_run: a preset's δ means δ/50 of this run "
                             "(its meaning in diffusers' 50-step runs; identical at 50 steps), custom uses "
                             "sld_warmup_fraction. steps: a preset's δ in sampler steps of this run, custom uses "
                             "sld_warmup_steps. img2img (denoise < 1) counts the steps actually run.")),
                io.Float.Input("sld_guidance_scale", default=1000.0, min=0.0, max=100000.0, step=1.0,
                               tooltip="s_S: safety weight = min(1, s_S·|ε_prompt − ε_safety|); ≤ 1 turns SLD off "
                                       "(as in diffusers)." + CUSTOM_ONLY),
                io.Int.Input("sld_warmup_steps", default=10, min=0, max=10000,
                             tooltip="δ in sampler steps before guidance starts (momentum builds up meanwhile); "
                                     "with warmup_unit = steps." + CUSTOM_ONLY),
                io.Float.Input("sld_warmup_fraction", default=10 / REFERENCE_STEPS, min=0.0, max=1.0, step=0.01,
                               tooltip="δ as a fraction of this run's steps; with warmup_unit = fraction_of_run."
                                       + CUSTOM_ONLY),
                io.Float.Input("sld_threshold", default=0.01, min=-10.0, max=10.0, step=0.001,
                               tooltip="λ: no safety guidance where ε_prompt − ε_safety ≥ λ." + CUSTOM_ONLY),
                io.Float.Input("sld_momentum_scale", default=0.3, min=0.0, max=10.0, step=0.01,
                               tooltip="s_m: weight of the accumulated safety momentum." + CUSTOM_ONLY),
                io.Float.Input("sld_mom_beta", default=0.4, min=0.0, max=1.0, step=0.01,
                               tooltip="β_m: momentum decay, ν ← β_m·ν + (1 − β_m)·γ." + CUSTOM_ONLY),
                io.Boolean.Input(
                    "fast_batched", default=True,
                    tooltip=("On (default): evaluate uncond, prompt and safety concept in one batched model call, as "
                             "diffusers does (same result, faster; about 1.5x the separate pass's peak activation "
                             "memory, and ComfyUI splits the batch when memory is short). When another patch already "
                             "holds ComfyUI's single calc_cond_batch slot (e.g. SkipLayerGuidanceDiTSimple), the node "
                             "logs it and uses a separate pass. Off: always a separate safety pass.")),
            ],
            outputs=[io.Model.Output(tooltip="The model with Safe Latent Guidance; connect it to a KSampler.")],
            hidden=[io.Hidden.prompt, io.Hidden.unique_id],  # to recognise an empty text encode upstream
        )

    @classmethod
    def execute(cls, model, safety_concept, preset, warmup_unit, sld_guidance_scale, sld_warmup_steps,
                sld_warmup_fraction, sld_threshold, sld_momentum_scale, sld_mom_beta, fast_batched) -> io.NodeOutput:
        params, warmup = resolve_settings(preset, warmup_unit, sld_guidance_scale, sld_warmup_steps,
                                          sld_warmup_fraction, sld_threshold, sld_momentum_scale, sld_mom_beta)
        check_model(model)
        safety_conds = check_safety_concept(model, safety_concept)
        if cls.hidden is not None and cls.hidden.prompt is not None:
            check_safety_source(cls.hidden.prompt, cls.hidden.unique_id)
        if not sld_enabled(params):
            logging.warning("SafeLatentGuidance: sld_guidance_scale %g <= 1 turns safety guidance off (diffusers' "
                            "rule); the model samples with plain CFG.", params.guidance_scale)
        return io.NodeOutput(SafeLatentGuidancePatch(safety_conds, params, warmup, fast_batched).install(model))


def resolve_settings(preset, warmup_unit, sld_guidance_scale, sld_warmup_steps, sld_warmup_fraction, sld_threshold,
                     sld_momentum_scale, sld_mom_beta) -> tuple[SLDParams, Warmup]:
    """The SLD parameters and warm-up rule the node's widgets select."""
    if warmup_unit not in WARMUP_UNITS:
        raise ValueError(f"Unknown warmup_unit {warmup_unit!r}; choose one of {', '.join(WARMUP_UNITS)}")
    if preset == "custom":
        params = SLDParams(guidance_scale=float(sld_guidance_scale), warmup_steps=int(sld_warmup_steps),
                           threshold=float(sld_threshold), momentum_scale=float(sld_momentum_scale),
                           momentum_beta=float(sld_mom_beta))
        if warmup_unit == "steps":
            return params, Warmup(steps=params.warmup_steps)
        return params, Warmup(fraction=float(sld_warmup_fraction))
    if preset not in SLD_PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    params = SLD_PRESETS[preset]
    return params, Warmup.of_preset(params, warmup_unit)
