"""EncodeNegationSet, LoadNegationSet and SafeDenoiser: Safe Denoiser (NeurIPS 2025) for the stock KSampler,
with SGF's window.

EncodeNegationSet turns images of what to avoid into a NEGATION_SET of latents with the model's VAE;
LoadNegationSet does it for a folder of images (the trainer's reader and checks, cached) or reads the set
a training run exported next to its embedding;
SafeDenoiser patches the MODEL so that, inside a window of the schedule, every sampler step uses the safe
denoiser's x0 prediction. The math lives in ``implicit_negatives.safe_denoiser``.

Node IDs, input names and input order are public API: append new inputs, never reorder.
"""

from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io

from implicit_negatives.comfyui.negation_sets import load_negation_source, resolve_negation_path, source_stamp
from implicit_negatives.comfyui.safe_denoiser_patch import encode_negation_set, patch_safe_denoiser
from implicit_negatives.safe_denoiser import NegationSetError
from implicit_negatives.safe_denoiser import MAX_NEGATION_LATENTS, SAFE_DENOISER_RELEASE, SGF_WINDOW, SafeDenoiserParams

from .socket_types import NegationSetType


class EncodeNegationSet(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EncodeNegationSet",
            display_name="Encode Negation Set",
            category="sampling/safety",
            description=(
                "Encodes images of what the sampler should steer away from (the concept images the trainer learns "
                "from, or any examples) into a negation set for SafeDenoiser. Use the VAE of the checkpoint you "
                f"sample with, and images of the size you sample (at most {MAX_NEGATION_LATENTS})."),
            inputs=[
                io.Image.Input("images", tooltip="A batch of images of the concept to avoid, at the sampling size."),
                io.Vae.Input("vae", tooltip="The VAE of the checkpoint you sample with."),
            ],
            outputs=[NegationSetType.Output(display_name="negation_set",
                                            tooltip="The images' latents; connect to SafeDenoiser.")],
        )

    @classmethod
    def execute(cls, images, vae) -> io.NodeOutput:
        return io.NodeOutput(encode_negation_set(vae, images))


class LoadNegationSet(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoadNegationSet",
            display_name="Load Negation Set",
            category="sampling/safety",
            description=(
                "A negation set for SafeDenoiser from a folder of images of the concept to avoid (read and checked "
                "as the trainer reads its --images folder, fitted to the resolution, encoded with the VAE once and "
                "cached), or from the *.negation_set.safetensors a training run exported next to its embedding "
                "(refused unless made with this VAE at this resolution)."),
            inputs=[
                io.String.Input("path", default="",
                                tooltip=("A folder of images (png/jpg/webp/bmp/gif) or an exported "
                                         "*.negation_set.safetensors: an absolute path, or relative to ComfyUI's "
                                         "input folder, models/negation_sets or the embeddings folders.")),
                io.Vae.Input("vae", tooltip="The VAE of the checkpoint you sample with."),
                io.Int.Input("resolution", default=512, min=64, max=2048, step=8,
                             tooltip=("Square size the images are resized and center-cropped to: the size you "
                                      "sample at (SD1.x: 512).")),
                io.Boolean.Input("skip_bad_images", default=False,
                                 tooltip=("Leave out unreadable or too small images (listed in the output text) "
                                          "instead of stopping.")),
            ],
            outputs=[NegationSetType.Output(display_name="negation_set",
                                            tooltip="The images' latents; connect to SafeDenoiser.")],
        )

    @classmethod
    def fingerprint_inputs(cls, path, vae, resolution, skip_bad_images):
        try:
            return source_stamp(resolve_negation_path(path))
        except (NegationSetError, OSError):
            return float("nan")  # never equal: execute runs and raises the readable error

    @classmethod
    def execute(cls, path, vae, resolution, skip_bad_images) -> io.NodeOutput:
        cache = os.path.join(folder_paths.get_output_directory(), "implicit_negative_training", "negation_cache")
        negation_set, receipt = load_negation_source(vae, resolve_negation_path(path), resolution, skip_bad_images,
                                                     cache)
        return io.NodeOutput(negation_set, ui={"text": [receipt]})


class SafeDenoiser(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SafeDenoiser",
            display_name="Safe Denoiser (negation images)",
            category="sampling/safety",
            description=(
                "Safe Denoiser (Kim et al., NeurIPS 2025) for the stock KSampler: inside a window of the schedule, "
                "each step's x0 prediction is pushed away from a kernel-weighted mean of the negation set's latents "
                "(x̂ − s·g·m, as the authors' released code). It needs no text encoder, so it complements an "
                "implicit negative and SafeLatentGuidance, and stacks with both. The default window is the early "
                "one Safety-Guided Flow (Kim et al., 2026) argues for: the first 20% of the schedule. Costs one "
                "(batch × N) distance matrix per step, no extra model evaluation."),
            inputs=[
                io.Model.Input("model", tooltip="The model to protect. It is cloned, not changed."),
                NegationSetType.Input("negation_set", tooltip="EncodeNegationSet's output."),
                io.Float.Input("strength", default=SAFE_DENOISER_RELEASE.strength, min=0.0, max=10.0, step=0.01,
                               tooltip=("s: x̂ ← x̂ − s·g·m. The release's nudity setting is 0.33. 0 leaves the "
                                        "sampler exactly as without this node.")),
                io.Float.Input("start_percent", default=SGF_WINDOW[0], min=0.0, max=1.0, step=0.001,
                               tooltip="Where the window starts, as a fraction of the schedule (0 = pure noise)."),
                io.Float.Input("end_percent", default=SGF_WINDOW[1], min=0.0, max=1.0, step=0.001,
                               tooltip=("Where it ends. 0.2 is SGF's early window (DDPM t 1000 → 800); the Safe "
                                        "Denoiser release used the first 12 of 50 steps (≈ 0.24).")),
                io.Float.Input("bandwidth", default=SAFE_DENOISER_RELEASE.bandwidth, min=0.001, max=1000.0,
                               step=0.01,
                               tooltip=("h: kernel weight exp(−‖x̂ − x_i‖ / (2h²)) of each negation latent; "
                                        "the release uses 3.15 for SD1.x latents.")),
            ],
            outputs=[io.Model.Output(tooltip="The model with the safe denoiser; connect it to a KSampler.")],
        )

    @classmethod
    def execute(cls, model, negation_set, strength, start_percent, end_percent, bandwidth) -> io.NodeOutput:
        params = SafeDenoiserParams(strength=float(strength), bandwidth=float(bandwidth),
                                    epsilon=SAFE_DENOISER_RELEASE.epsilon)
        return io.NodeOutput(patch_safe_denoiser(model, negation_set, params, float(start_percent),
                                                 float(end_percent)))
