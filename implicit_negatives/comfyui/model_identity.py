"""Which denoising model is this? A cheap fingerprint of a ComfyUI MODEL, patches included.

An implicit negative is learned against one unlearned model. The paper shows it transfers between
unlearned variants of one base model, but users should know when they use it elsewhere. The trainer
stores this fingerprint; ImplicitNegativeConditioning compares it when a MODEL is connected. And which model
family does a checkpoint file hold, before it loads (``checkpoint_model_config``, for the evaluation runner's checks)?
"""

from __future__ import annotations

import pickle

import torch

import comfy.lora
import comfy.model_detection
import comfy.utils

from ..fingerprint import tensors_fingerprint

# Small tensors every SD-style UNet has: the first and last convolutions (ESD-u, full UNet swaps change them).
PROBE_KEYS = ("diffusion_model.input_blocks.0.0.weight", "diffusion_model.out.2.weight")


def model_fingerprint(model) -> str | None:
    """16 hex digits identifying the MODEL's base weights and the weight patches (LoRAs, UNet merges) on it."""
    # Look the few tensors up directly: building a full state_dict would walk every module on each call.
    probes = []
    for key in PROBE_KEYS:
        try:
            probes.append((key, comfy.utils.get_attr(model.model, key)))
        except AttributeError:
            pass
    if not probes:
        return None
    patched = sorted(model.patches)
    if patched:  # a LoRA (DUO, SPM) or partial UNet patch: hash the effective value of the first patched weight
        key = patched[0]
        weight = comfy.utils.get_attr(model.model, key)
        effective = comfy.lora.calculate_weight(model.patches[key], weight.float().clone(), key)
        probes += [(f"patched:{len(patched)}:{key}", effective)]
    return tensors_fingerprint(probes)


def vae_fingerprint(vae) -> str:
    """16 hex digits identifying a VAE's weights (every 97th value of each): a negation set's latents are
    valid only for the VAE that encoded them."""
    return tensors_fingerprint(list(vae.first_stage_model.state_dict().items()))


def model_transfer_warning(model, negative) -> str | None:
    """A sentence for the user when the implicit negative was learned on a different MODEL than this one."""
    trained_on = negative.embedding.metadata.get("model_fingerprint")
    if model is None or not trained_on:
        return None
    current = model_fingerprint(model)
    if current is None or current == trained_on:
        return None
    name = negative.embedding.metadata.get("unlearned_model") or "another model"
    return (f"Implicit negative '{negative.name}' was learned on a different model ({name}; fingerprint "
            f"{trained_on}, this MODEL {current}). Implicit negatives transfer between unlearned variants of one "
            "base model (Shin et al. 2025), but are strongest on the model they were learned on; retrain for "
            "this model if its results matter.")


def checkpoint_model_config(path: str) -> str | None:
    """The ComfyUI model config (``comfy.supported_models`` class name: "SD15", "SD20", "SDXL", ...) its checkpoint
    loader detects for a single-file checkpoint, found by ComfyUI's own detector from the tensors' names and shapes
    alone: a safetensors file gives meta tensors (no weight is read), a torch zip file is memory-mapped
    (``weights_only``). None when ComfyUI detects no model or the file is an old (non-zip) torch pickle or holds
    objects ``weights_only`` refuses (the runner then leaves the check to the nodes, at the row's first item)."""
    if path.lower().endswith((".safetensors", ".sft")):
        from safetensors import safe_open
        with safe_open(path, "pt") as handle:
            state = {key: torch.empty(handle.get_slice(key).get_shape(), device="meta") for key in handle.keys()}
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except (RuntimeError, pickle.UnpicklingError):  # a legacy (non-zip) pickle cannot be memory-mapped; a
            return None                                  # pickle of more than tensors is not read here
        state = state.get("state_dict", state) if isinstance(state, dict) else {}
    config = comfy.model_detection.model_config_from_unet(state, comfy.model_detection.unet_prefix_from_state_dict(state))
    return None if config is None else type(config).__name__
