"""SafeLatentGuidance at sampling time: ComfyUI sampling hooks around the core SLD step.

ComfyUI's samplers see x0 ("denoised") predictions; SLD's thresholds live in ε space, so every
prediction is converted with ``ε = (x − x0)/σ``. The patch is a post-CFG function (it stacks with
other guidance patches such as RescaleCFG, SAG, PAG) that

  * evaluates the safety concept at the same x and σ: by default inside the model's own batched call
    through the calc_cond_batch slot (as diffusers does), or as one extra ``calc_cond_batch`` pass when
    asked to or when another patch holds that slot;
  * computes γ with the core, advances the momentum once per sampler step (Heun, DPM++ 2S call the
    model several times per step), and returns ``x0_cfg + s·σ·γ`` (⇔ ``ε_cfg − s·γ``) after warm-up;
  * stays out of the way when CFG is off (cfg <= 1), as diffusers does: no safety pass, plain output.

On both paths the safety pass is presented to the model as "uncond" (``transformer_options
["cond_or_uncond"]`` entry 1), so attention patches that branch on it treat it like a negative prompt.

State (the momentum) lives for one sampling run: it is reset by an OUTER_SAMPLE wrapper at the start
of every run and, as a second guard, whenever the schedule tensor or the latent shape changes.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

import comfy.model_sampling
import comfy.patcher_extension
import comfy.sampler_helpers
import comfy.samplers

from ..cfg import eps_from_denoised
from ..sld import (REFERENCE_STEPS, SLDParams, StepMomentum, sampler_step_index, sld_enabled, sld_safety_term,
                   warmup_steps_from_fraction)

WRAPPER_KEY = "implicit_negatives.safe_latent_guidance"
UNCOND = 1  # ComfyUI's cond_or_uncond value of the negative ("uncond") branch

# Conditioning options that only ComfyUI's process_conds() resolves (areas, masks, ControlNet, GLIGEN, hooks,
# timestep ranges). A model patch evaluates the safety concept without process_conds, so it refuses them
# instead of silently ignoring them.
UNSUPPORTED_SAFETY_OPTIONS = ("area", "mask", "control", "gligen", "hooks")

# Stock text encoders and the inputs that hold their text. An empty text still encodes to non-zero start/end-token
# states, so an empty text concept is recognised in the graph, not in the tensor.
TEXT_ENCODER_INPUTS = {"CLIPTextEncode": ("text",), "CLIPTextEncodeSDXL": ("text_g", "text_l"),
                       "CLIPTextEncodeSDXLRefiner": ("text",)}
STRING_PRIMITIVES = ("PrimitiveString", "PrimitiveStringMultiline")


class SafeLatentGuidanceError(ValueError):
    """SafeLatentGuidance cannot serve this model or safety concept; the message says how to fix it."""


def check_model(model) -> None:
    """Refuse models whose predictions the ε-space SLD math does not fit."""
    sampling = model.get_model_object("model_sampling")
    if not isinstance(sampling, comfy.model_sampling.EPS):
        raise SafeLatentGuidanceError(
            f"SafeLatentGuidance supports ε- and v-prediction diffusion models (SD1.x, SD2.x, SDXL); this model "
            f"samples with {type(sampling).__name__} ({', '.join(c.__name__ for c in type(sampling).__mro__[1:3])}), "
            "e.g. a flow-matching model, whose noise is not (x − x0)/σ. Use a Stable Diffusion checkpoint.")
    context_dim = model.model.model_config.unet_config.get("context_dim")
    if not context_dim:
        raise SafeLatentGuidanceError(
            "SafeLatentGuidance needs a cross-attention UNet that reads text conditioning (SD1.x, SD2.x, SDXL); "
            f"this model ({type(model.model).__name__}) has none.")


def check_safety_concept(model, safety_concept) -> list:
    """Validate the safety CONDITIONING against the model; return it converted for calc_cond_batch."""
    if not safety_concept:
        raise SafeLatentGuidanceError(
            "The safety concept is empty: connect a CONDITIONING, e.g. ImplicitNegativeConditioning's output or "
            "a CLIPTextEncode of the concept to steer away from.")
    context_dim = model.model.model_config.unet_config.get("context_dim")
    needs_pooled = bool(model.model.model_config.unet_config.get("adm_in_channels"))
    for index, (tensor, options) in enumerate(safety_concept):
        if tensor is None or tensor.ndim != 3 or tensor.shape[1] == 0:
            raise SafeLatentGuidanceError(
                f"Safety concept entry {index} holds no text embedding ({None if tensor is None else tuple(tensor.shape)}); "
                "connect the output of a text encode node.")
        if tensor.shape[-1] != context_dim:
            raise SafeLatentGuidanceError(
                f"Safety concept width {tensor.shape[-1]} does not fit this model's cross-attention width {context_dim}: "
                "encode the safety concept with the CLIP of the same checkpoint (e.g. an SD2 or SDXL CLIP on an SD1 model "
                "gives this error).")
        if not tensor.any():
            raise SafeLatentGuidanceError(
                f"Safety concept entry {index} is all zeros (e.g. the output of ConditioningZeroOut), so SLD would "
                "steer away from nothing: connect the concept itself, e.g. ImplicitNegativeConditioning's output or a "
                "CLIPTextEncode of the concept's words.")
        if needs_pooled and options.get("pooled_output") is None:
            raise SafeLatentGuidanceError(
                "This model (e.g. SDXL) needs a pooled text embedding, and the safety concept has none: encode it with "
                "the checkpoint's own CLIP node.")
        unsupported = [key for key in UNSUPPORTED_SAFETY_OPTIONS if options.get(key) is not None]
        if options.get("start_percent", 0.0) != 0.0 or options.get("end_percent", 1.0) != 1.0:
            unsupported.append("timestep range")
        if unsupported:
            raise SafeLatentGuidanceError(
                f"The safety concept carries {', '.join(unsupported)}, which a model patch cannot apply to the safety "
                "pass. Connect the plain text/implicit-negative conditioning instead (apply ControlNet, areas, masks "
                "and timestep ranges to the prompt, not to the safety concept).")
    return comfy.sampler_helpers.convert_cond(safety_concept)


def literal_text(prompt: dict, value) -> str | None:
    """The text an API-format input holds: a literal, or a String primitive's literal; None when computed."""
    if isinstance(value, list) and len(value) == 2:
        source = prompt.get(str(value[0]), {})
        value = source.get("inputs", {}).get("value") if source.get("class_type") in STRING_PRIMITIVES else None
    return value if isinstance(value, str) else None


def check_safety_source(prompt: dict, node_id: str) -> None:
    """Refuse a safety concept that a stock text encoder made from an empty text.

    ``prompt`` is the API-format graph being run and ``node_id`` the SafeLatentGuidance node in it."""
    link = prompt.get(str(node_id), {}).get("inputs", {}).get("safety_concept")
    source = prompt.get(str(link[0]), {}) if isinstance(link, list) else {}
    texts = [literal_text(prompt, source["inputs"].get(name))
             for name in TEXT_ENCODER_INPUTS.get(source.get("class_type"), ())]
    if texts and all(text is not None and not text.strip() for text in texts):
        raise SafeLatentGuidanceError(
            f"The safety concept is an empty text ({source['class_type']} with no text), which encodes only the "
            "start and end tokens, so SLD would steer away from no concept: write the concept to steer away from "
            "(e.g. 'nudity, violence, blood') or connect ImplicitNegativeConditioning's output.")


def same_text_embeddings(a: list, b: list) -> bool:
    """Whether two converted CONDITIONINGs hold the same text embeddings, entry by entry."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        ex, ey = x.get("cross_attn"), y.get("cross_attn")
        if ex is None or ey is None or ex.shape != ey.shape or not torch.equal(ex, ey.to(ex.device)):
            return False
    return True


def cfg_is_off(cfg_scale: float) -> bool:
    """diffusers runs SLD only with classifier-free guidance (``guidance_scale > 1``); ComfyUI also drops the
    uncond branch at cfg == 1 (its cfg1 optimisation). Either way there is no CFG direction to correct."""
    return cfg_scale <= 1.0 or math.isclose(cfg_scale, 1.0)


def present_as_uncond(index: int, inner=None):
    """A ``model_function_wrapper`` that reports batch entry ``index`` (the safety concept) as uncond.

    ComfyUI sets ``cond_or_uncond`` to each cond's list index, so the safety concept batched third would
    read 2, which attention patches (SAG, regional and IP-adapter style patches) do not expect. Only the
    copies handed to the model change: ComfyUI routes the outputs by its own list. ``inner``: a wrapper
    the model already has, called with the relabelled arguments."""

    def wrapper(apply_model, args: dict):
        kinds = [UNCOND if kind == index else kind for kind in args["cond_or_uncond"]]
        c = dict(args["c"])
        c["transformer_options"] = {**c.get("transformer_options", {}), "cond_or_uncond": kinds}
        relabelled = {**args, "c": c, "cond_or_uncond": kinds}
        if inner is not None:
            return inner(apply_model, relabelled)
        return apply_model(relabelled["input"], relabelled["timestep"], **relabelled["c"])

    return wrapper


@dataclass(frozen=True)
class Warmup:
    """Warm-up δ either in sampler steps, or as a fraction of the run's steps."""

    steps: int | None = None
    fraction: float | None = None

    def steps_for(self, total_steps: int) -> int:
        if self.steps is not None:
            return self.steps
        return warmup_steps_from_fraction(self.fraction, total_steps)

    @classmethod
    def of_preset(cls, params: SLDParams, unit: str) -> "Warmup":
        if unit == "steps":
            return cls(steps=params.warmup_steps)
        return cls(fraction=params.warmup_steps / REFERENCE_STEPS)


@dataclass
class SamplingRun:
    """Everything SLD remembers during one sampling run."""

    sample_sigmas: torch.Tensor
    sigmas: list[float]
    shape: torch.Size
    warmup_steps: int
    momentum: StepMomentum = field(default_factory=StepMomentum)
    safety_conds: list | None = None
    stash: tuple | None = None          # fast path: (x, sigma, safety x0) from the batched model call
    evaluations: int = 0                # post-CFG calls (model evaluations) in this run
    safety_passes: int = 0              # separate safety-concept model calls (0 on the fast path)
    guided_evaluations: int = 0         # evaluations after warm-up, where the output was changed

    @property
    def total_steps(self) -> int:
        return len(self.sigmas) - 1


class SafeLatentGuidancePatch:
    """The sampling hooks for one SafeLatentGuidance node output (shared by clones of that MODEL)."""

    def __init__(self, safety_conds: list, params: SLDParams, warmup: Warmup, fast_batched: bool):
        self.safety_conds = safety_conds
        self.params = params
        self.warmup = warmup
        self.fast_batched = fast_batched  # what the node asked for
        self.batched = False              # whether install() took the calc_cond_batch slot
        self.run: SamplingRun | None = None
        self.last_run: SamplingRun | None = None
        self.cfg_off = False              # this run's guider has cfg <= 1: SLD is off for the whole run
        self._warned_cfg_off = False
        self._warned_missing_stash = False

    def __deepcopy__(self, memo):
        # model_options are deep-copied by ModelPatcher.clone(); the hooks (and their run state) are shared,
        # and each run resets them, so a clone never sees another run's momentum.
        return self

    def install(self, model):
        """Return a clone of ``model`` carrying the hooks; ``model`` itself is left untouched.

        The batched path needs ComfyUI's single calc_cond_batch slot; when another patch already holds it
        (SkipLayerGuidanceDiTSimple, a second SafeLatentGuidance), the safety concept gets its own pass."""
        self.batched = self.fast_batched and sld_enabled(self.params)
        if self.batched and "sampler_calc_cond_batch_function" in model.model_options:
            logging.info("SafeLatentGuidance: another patch on this model already holds ComfyUI's calc_cond_batch "
                         "slot (e.g. SkipLayerGuidanceDiTSimple or another SafeLatentGuidance); the safety concept is "
                         "evaluated in a separate pass instead (same result, one more model call per step).")
            self.batched = False
        patched = model.clone()
        patched.set_model_sampler_post_cfg_function(self.post_cfg)
        if self.batched:
            patched.set_model_sampler_calc_cond_batch_function(self.calc_cond_batch)
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, self.outer_sample)
        return patched

    # ------------------------------------------------------------------ run state

    def outer_sample(self, executor, *args, **kwargs):
        self.run = None  # a new sampling run: fresh momentum
        self._warned_cfg_off = False
        cfg = getattr(executor.class_obj, "cfg", None)  # CFGGuider's scale; other guiders are checked per call
        self.cfg_off = isinstance(cfg, (int, float)) and cfg_is_off(float(cfg))
        if self.cfg_off:
            self.warn_cfg_off(float(cfg))
        return executor(*args, **kwargs)

    def warn_cfg_off(self, cfg_scale: float) -> None:
        if not self._warned_cfg_off:
            logging.warning("SafeLatentGuidance: cfg %g <= 1 turns classifier-free guidance off, and with it safety "
                            "guidance (as in diffusers); this run samples without SLD. Use cfg > 1 (diffusers: 7.5).",
                            cfg_scale)
            self._warned_cfg_off = True

    def run_for(self, model_options: dict, x: torch.Tensor) -> SamplingRun:
        sample_sigmas = model_options.get("transformer_options", {}).get("sample_sigmas")
        if sample_sigmas is None:
            raise SafeLatentGuidanceError(
                "SafeLatentGuidance needs the sampler's schedule (transformer_options['sample_sigmas'], "
                "ComfyUI >= 0.3.64) to count steps; update ComfyUI.")
        run = self.run
        if run is None or run.sample_sigmas is not sample_sigmas or run.shape != x.shape:
            sigmas = [float(s) for s in sample_sigmas.flatten().tolist()]
            run = SamplingRun(sample_sigmas=sample_sigmas, sigmas=sigmas, shape=x.shape,
                              warmup_steps=self.warmup.steps_for(len(sigmas) - 1))
            self.run = self.last_run = run
        return run

    def encoded_safety(self, run: SamplingRun, model, x: torch.Tensor) -> list:
        if run.safety_conds is None:
            run.safety_conds = comfy.samplers.encode_model_conds(
                model.extra_conds, [dict(c) for c in self.safety_conds], x, x.device, "negative")
        return run.safety_conds

    # ------------------------------------------------------------------ hooks

    def calc_cond_batch(self, args: dict) -> list:
        """Fast path: uncond, cond and safety in one batched model call (as diffusers does)."""
        x, sigma, model, model_options = args["input"], args["sigma"], args["model"], args["model_options"]
        if self.cfg_off or args["conds"][1] is None:  # CFG off (cfg1 optimisation: no uncond): plain evaluation
            return comfy.samplers.calc_cond_batch(model, args["conds"], x, sigma, model_options)
        run = self.run_for(model_options, x)
        conds = list(args["conds"]) + [self.encoded_safety(run, model, x)]
        options = {**model_options,
                   "model_function_wrapper": present_as_uncond(2, model_options.get("model_function_wrapper"))}
        out = comfy.samplers.calc_cond_batch(model, conds, x, sigma, options)
        run.stash = (x, sigma, out[2])
        return out[:2]

    def safety_denoised(self, run: SamplingRun, args: dict) -> torch.Tensor:
        x, sigma = args["input"], args["sigma"]
        if run.stash is not None and run.stash[0] is x and run.stash[1] is sigma:
            denoised = run.stash[2]
            run.stash = None
            return denoised
        if self.batched and not self._warned_missing_stash:
            logging.warning("SafeLatentGuidance: another patch replaced the calc_cond_batch hook after this node; "
                            "the safety concept is evaluated in a separate pass (correct, but slower).")
            self._warned_missing_stash = True
        run.safety_passes += 1
        # The safety concept goes in the "uncond" slot (index 1), so attention patches treat it like a negative.
        _, denoised = comfy.samplers.calc_cond_batch(
            args["model"], [None, self.encoded_safety(run, args["model"], x)], x, sigma, args["model_options"])
        return denoised

    def post_cfg(self, args: dict) -> torch.Tensor:
        denoised = args["denoised"]
        if not sld_enabled(self.params):
            return denoised
        cfg_scale = args.get("cond_scale", 1.0)
        if self.cfg_off or cfg_is_off(cfg_scale):
            self.warn_cfg_off(cfg_scale)
            return denoised
        if args.get("uncond") is None:
            raise SafeLatentGuidanceError(
                "SafeLatentGuidance needs an unconditional/negative branch, and this sampler has none: use KSampler "
                "(or a CFGGuider) with a negative conditioning.")
        x, sigma = args["input"], args["sigma"]
        run = self.run_for(args["model_options"], x)
        run.evaluations += 1
        if run.evaluations == 1 and same_text_embeddings(self.safety_conds, args["uncond"]):
            raise SafeLatentGuidanceError(
                "The safety concept is the same conditioning as the sampler's negative prompt (e.g. both an empty "
                "CLIPTextEncode, or one implicit negative wired to both), and SLD steers away from the concept "
                "relative to the negative, so it would change nothing: keep the concept as the safety concept and "
                "give the KSampler another negative (diffusers' SLD uses an empty one).")
        step = sampler_step_index(run.sigmas, float(sigma.flatten()[0]))
        momentum = run.momentum.at_step(step)

        safety = self.safety_denoised(run, args)
        if not torch.isfinite(safety).all():
            raise FloatingPointError(
                f"SafeLatentGuidance: the safety-concept pass returned NaN/Inf at step {step} (sigma "
                f"{float(sigma.flatten()[0]):.4g}). Sampling stops instead of continuing without safety guidance. "
                "Usual causes: fp16 overflow in the UNet (run with --force-fp32 or a bf16 model) or a broken "
                "embedding in the safety concept.")
        sigma32 = sigma.float()
        x32 = x.float()
        eps_uncond = eps_from_denoised(x32, args["uncond_denoised"].float(), sigma32)
        eps_cond = eps_from_denoised(x32, args["cond_denoised"].float(), sigma32)
        eps_safety = eps_from_denoised(x32, safety.float(), sigma32)
        gamma, new_momentum = sld_safety_term(eps_uncond, eps_cond, eps_safety, momentum, self.params)
        run.momentum.propose(new_momentum)
        if step < run.warmup_steps:
            return denoised
        run.guided_evaluations += 1
        shift = cfg_scale * sigma32.reshape(-1, *([1] * (x.ndim - 1))) * gamma  # ε_out = ε_cfg − s·γ
        return denoised + shift.to(denoised.dtype)
