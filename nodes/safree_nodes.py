"""SafreeConditioning and SafreeLatentReAttention: SAFREE (ICLR 2025) for the stock KSampler.

SafreeConditioning turns CLIP + prompt + concept (text keywords and/or an implicit negative)
into a positive CONDITIONING of two entries: the filtered prompt for the first part of the
timestep range (the self-validating filter's steps, set like ConditioningSetTimestepRange)
and the original prompt for the rest (ConditioningCombine). SafreeLatentReAttention patches
the MODEL so that, while the filtered prompt is active, the UNet also runs the original
prompt on the same latents and re-attends the filtered branch's skip features in Fourier
space. The math lives in ``implicit_negatives.safree``.

Node IDs, input names and input order are public API: append new inputs, never reorder.
"""

from __future__ import annotations

from comfy_api.latest import io

from implicit_negatives.comfyui.safree_patch import (CONCEPT_NEGATIVE_MODES, IMPLICIT_NEGATIVE_USES,
                                                     patch_latent_reattention, safree_conditioning)
from implicit_negatives.safree import NUDITY_KEYWORDS, SAFREE_ALPHA, SAFREE_SKIP_SCALES, SAFREE_STEPS, SAFREE_UP_T, SVF_PRESETS

from .socket_types import ImplicitNegativeType


class SafreeConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SafreeConditioning",
            display_name="SAFREE Conditioning",
            category="conditioning/implicit negatives",
            description=(
                "SAFREE (Yoon et al., ICLR 2025), training-free: finds the prompt tokens that pull toward a concept "
                "(text keywords, or an implicit negative in their place as the paper runs SAFREE + C*, or both), "
                "projects them away from the concept subspace within "
                "the prompt's own span, and uses that filtered prompt only for the first denoising steps chosen by "
                "the self-validating filter (as start/end percent, like ConditioningSetTimestepRange). On SDXL, "
                "as the official SAFREE SDXL pipeline, CLIP-G's part of the prompt is filtered with CLIP-G's "
                "projected pooled outputs; CLIP-L's part and the pooled output stay the original's. Feed "
                "'positive' and 'negative' to a stock KSampler."),
            inputs=[
                io.Clip.Input("clip", tooltip=("The model's CLIP: SD1.x/SD2.x (one text encoder) or SDXL (only "
                                               "CLIP-G's part of the prompt is filtered, as in the official "
                                               "SAFREE SDXL pipeline).")),
                io.String.Input("prompt", multiline=True, default="",
                                tooltip="The positive prompt to filter."),
                io.String.Input("concept_keywords", multiline=True, default=", ".join(NUDITY_KEYWORDS),
                                tooltip=("Words spanning the concept to keep away from, separated by commas or new "
                                         "lines; each is encoded on its own. Default: SAFREE's 17 nudity keywords. "
                                         "Not used when an implicit negative is connected with "
                                         "implicit_negative_use = replace (the default).")),
                io.Float.Input("alpha", default=SAFREE_ALPHA, min=0.0, max=1.0, step=0.001,
                               tooltip=("Trigger threshold: a token is filtered when removing it moves the prompt "
                                        "(1 + alpha) times farther from the concept than removing the others does "
                                        "on average. SAFREE: 0.01; higher flags fewer tokens.")),
                io.Boolean.Input("self_validating_filter", default=True,
                                 tooltip=("On: the filtered prompt is used only for steps 0..t' (t' from how much "
                                          "the filter changed the prompt). Off: for the whole sampling.")),
                io.Int.Input("up_t", default=SAFREE_UP_T, min=0, max=1000,
                             tooltip="Upper bound of t', in steps of schedule_steps. SAFREE: 10 (of 50)."),
                io.Combo.Input("svf_preset", options=list(SVF_PRESETS), default="default",
                               tooltip=("Sigmoid of the self-validating filter. default: k 2.5, t0 5.333 (SAFREE's "
                                        "nudity and general setting); artist: k 3.5, t0 5.5.")),
                io.Int.Input("schedule_steps", default=SAFREE_STEPS, min=1, max=10000,
                             tooltip=("The step count t' refers to. 50 (SAFREE's) filters the same share of the noise "
                                      "schedule as the paper at any KSampler step count; set your KSampler's steps "
                                      "to filter exactly steps 0..t'. Exact for schedulers spaced evenly in "
                                      "timestep (simple, normal, sgm_uniform).")),
                io.Combo.Input("concept_negative", options=list(CONCEPT_NEGATIVE_MODES), default="concept",
                               tooltip=("concept: 'negative' is the concept as a prompt (the joined keywords, "
                                        "the implicit negative, or 'keywords, implicit negative' with add), as "
                                        "SAFREE uses its concept as the CFG negative prompt. empty: an empty "
                                        "negative prompt.")),
                ImplicitNegativeType.Input(
                    "implicit_negative", optional=True,
                    tooltip=("A learned concept embedding (LoadImplicitNegative). Its pooled text-encoder output "
                             "is a concept direction and it is (part of) the negative prompt; "
                             "implicit_negative_use says whether it replaces or joins the keywords.")),
                io.Combo.Input("implicit_negative_use", options=list(IMPLICIT_NEGATIVE_USES), default="replace",
                               optional=True,
                               tooltip=("Only with an implicit negative connected. replace (default): it is the "
                                        "whole concept, subspace and negative prompt, and the keywords are not "
                                        "used, as the paper runs SAFREE + C*. add: one more direction next to "
                                        "the keywords, and the negative is 'keywords, implicit negative' (what "
                                        "this node did before this input existed).")),
            ],
            outputs=[
                io.Conditioning.Output(display_name="positive",
                                       tooltip="Filtered prompt for the SVF steps, original prompt afterwards."),
                io.Conditioning.Output(display_name="negative",
                                       tooltip="Negative prompt per concept_negative, for the KSampler's negative."),
                io.String.Output(display_name="report",
                                 tooltip="Flagged tokens, beta, t' and the filtered share of the schedule."),
            ],
        )

    @classmethod
    def execute(cls, clip, prompt, concept_keywords, alpha, self_validating_filter, up_t, svf_preset,
                schedule_steps, concept_negative, implicit_negative=None,
                implicit_negative_use="replace") -> io.NodeOutput:
        return io.NodeOutput(*safree_conditioning(clip, prompt, concept_keywords, alpha, self_validating_filter, up_t,
                                                  svf_preset, schedule_steps, concept_negative, implicit_negative,
                                                  implicit_negative_use))


class SafreeLatentReAttention(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SafreeLatentReAttention",
            display_name="SAFREE Latent Re-Attention",
            category="model_patches/unet",
            description=(
                "SAFREE's latent re-attention, as the paper's text describes it (not what its released numbers "
                "ran: published SAFREE results have it off): while the filtered prompt is active, the "
                "UNet also runs the original prompt on the same latents, and in the decoder's two FreeU stages the "
                "low-frequency skip-feature components that the filtered prompt amplifies beyond the original are "
                "scaled by s1 / s2. (The official SAFREE release never reaches this filter: its '-lra' only enlarges "
                "the batch.) Costs one extra UNet pass per step while filtering. SD1.x/SD2.x; refused on SDXL (the "
                "official SDXL pipeline has no re-attention)."),
            inputs=[
                io.Model.Input("model", tooltip="The model the KSampler uses (SD1.x/SD2.x; SDXL is refused)."),
                io.Conditioning.Input("safree_positive",
                                      tooltip="The 'positive' output of SAFREE Conditioning that feeds the KSampler."),
                io.Boolean.Input("enabled", default=True, tooltip="Off: the model passes through unpatched."),
                io.Float.Input("s1", default=SAFREE_SKIP_SCALES[0], min=0.0, max=10.0, step=0.01,
                               tooltip="Scale at the stage with 4x the base channels (1280 in SD1.x). SAFREE: 0.9."),
                io.Float.Input("s2", default=SAFREE_SKIP_SCALES[1], min=0.0, max=10.0, step=0.01,
                               tooltip="Scale at the stage with 2x the base channels (640 in SD1.x). SAFREE: 0.2."),
            ],
            outputs=[io.Model.Output(tooltip="The model with re-attention (or unchanged when disabled).")],
        )

    @classmethod
    def execute(cls, model, safree_positive, enabled, s1, s2) -> io.NodeOutput:
        return io.NodeOutput(patch_latent_reattention(model, safree_positive, s1, s2) if enabled else model)
