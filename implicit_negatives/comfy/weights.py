"""Load an unlearned model through ComfyUI's loaders, in every layout erasure methods publish.

    single-file checkpoint   CompVis .ckpt / .safetensors (SA, old ESD "compvis-*"): the base
    --unet (full)            a whole diffusers-key UNet (.pt/.bin/.safetensors: old ESD, UCE, RECE)
    --unet (partial)         only the edited weights, diffusers keys (new ESD / UCE code): merged as
                             "set" patches on a clone, with a report of how many keys matched
    --lora                   LoRAs (SPM, DUO) through ComfyUI's LoRA loader
    --text-encoder           a replaced CLIP text encoder (AdvUnlearn), single file or HF folder

Pickled files are read with ``weights_only=True`` (ComfyUI's ``load_torch_file(safe_load=True)``).
The base model's weights are never edited in place: every change is a patch on a clone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

import comfy.lora
import comfy.sd
import comfy.utils

UNET_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "unet.")


class WeightLayoutError(ValueError):
    """A weights file does not fit the model; the message names the file, the counts and the fix."""


@dataclass
class WeightReport:
    """What a weights file did to the model: layout, matched / total keys, a few unmatched names."""

    path: str
    layout: str
    matched: int
    total: int
    unmatched: list[str] = field(default_factory=list)

    def describe(self) -> str:
        text = f"{os.path.basename(self.path)}: {self.layout}, {self.matched}/{self.total} keys matched"
        if self.unmatched:
            text += f" (unmatched e.g. {', '.join(self.unmatched[:3])})"
        return text


def load_checkpoint(path: str, embedding_directory=None):
    """(MODEL, CLIP, VAE) from a single-file SD checkpoint via ComfyUI's CheckpointLoader path."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Checkpoint not found: {path}")
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
        path, output_vae=True, output_clip=True, embedding_directory=embedding_directory)
    if clip is None:
        raise WeightLayoutError(f"{os.path.basename(path)} has no text encoder; pass --text-encoder")
    return model, clip, vae


def _strip_unet_prefix(state: dict) -> dict:
    for prefix in UNET_PREFIXES:
        if any(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return dict(state)


def unet_patches(model, state: dict, path: str = "unet") -> tuple[dict, WeightReport]:
    """Map a UNet state dict (diffusers or LDM keys) onto ``model``: ({patch key: ("set", (w,))}, report).

    Raises WeightLayoutError when no key matches (wrong file or architecture) or a matched key has
    the wrong shape.
    """
    state = {k: v for k, v in _strip_unet_prefix(state).items() if torch.is_tensor(v)}
    model_state = model.model.diffusion_model.state_dict()
    diffusers_to_ldm = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    patches, unmatched, layouts = {}, [], set()
    for key, weight in state.items():
        if key in model_state:
            target, layouts = key, layouts | {"LDM keys"}
        elif key in diffusers_to_ldm and diffusers_to_ldm[key] in model_state:
            target, layouts = diffusers_to_ldm[key], layouts | {"diffusers keys"}
        else:
            unmatched.append(key)
            continue
        if tuple(weight.shape) != tuple(model_state[target].shape):
            raise WeightLayoutError(
                f"{os.path.basename(path)}: {key} has shape {tuple(weight.shape)} but the model's {target} is "
                f"{tuple(model_state[target].shape)}: these weights are for a different architecture "
                "(e.g. SD2 weights on an SD1 checkpoint)")
        patches["diffusion_model." + target] = ("set", (weight,))
    if not patches:
        raise WeightLayoutError(
            f"{os.path.basename(path)}: none of its {len(state)} keys (e.g. {', '.join(sorted(state)[:3])}) "
            "matches this checkpoint's UNet; expected diffusers-style UNet keys (down_blocks.0...) or LDM keys "
            "(input_blocks.0...) for the same architecture")
    full = len(patches) == len(model_state)
    layout = f"{'full' if full else 'partial'} UNet, {' + '.join(sorted(layouts))}"
    return patches, WeightReport(path, layout, len(patches), len(state), sorted(unmatched))


def apply_unet_weights(model, path: str):
    """A clone of ``model`` with the UNet weights of ``path`` merged as patches; and the report."""
    state = comfy.utils.load_torch_file(path, safe_load=True)
    patches, report = unet_patches(model, state, path)
    patched = model.clone()
    patched.add_patches(patches, 1.0)
    return patched, report


def apply_lora(model, clip, path: str, strength: float = 1.0):
    """(MODEL, CLIP) clones with a LoRA applied by ComfyUI's loader; and a report of matched keys."""
    lora = comfy.utils.load_torch_file(path, safe_load=True)
    model_keys = len(model.patches)
    clip_keys = len(clip.patcher.patches)
    new_model, new_clip = comfy.sd.load_lora_for_models(model, clip, lora, strength, strength)
    matched = (len(new_model.patches) - model_keys) + (len(new_clip.patcher.patches) - clip_keys)
    if matched == 0:
        raise WeightLayoutError(f"{os.path.basename(path)}: no LoRA key matched this model (wrong base model "
                                "or not a LoRA file)")
    return new_model, new_clip, WeightReport(path, "LoRA", matched, len(lora))


def load_text_encoder(path: str, embedding_directory=None):
    """A CLIP from a replaced text encoder: one file, or a transformers folder (AdvUnlearn)."""
    if os.path.isdir(path):
        names = ("model.safetensors", "pytorch_model.bin")
        found = [os.path.join(path, n) for n in names if os.path.isfile(os.path.join(path, n))]
        found += [os.path.join(path, "text_encoder", n) for n in names
                  if os.path.isfile(os.path.join(path, "text_encoder", n))]
        if not found:
            raise WeightLayoutError(f"{path} holds no model.safetensors or pytorch_model.bin")
        path = found[0]
    clip = comfy.sd.load_clip([path], embedding_directory=embedding_directory,
                              clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION)
    return clip


def load_unlearned_model(checkpoint: str, unet: str | None = None, loras=(), text_encoder: str | None = None,
                         embedding_directory=None):
    """(MODEL, CLIP, VAE, [WeightReport]) for the CLI: base checkpoint, then each replacement in order."""
    model, clip, vae = load_checkpoint(checkpoint, embedding_directory)
    reports = []
    if text_encoder:
        clip = load_text_encoder(text_encoder, embedding_directory)
        reports.append(WeightReport(text_encoder, "text encoder", 1, 1))
    if unet:
        model, report = apply_unet_weights(model, unet)
        reports.append(report)
    for path, strength in loras:
        model, clip, report = apply_lora(model, clip, path, strength)
        reports.append(report)
    return model, clip, vae, reports
