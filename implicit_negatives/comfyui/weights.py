"""Load an unlearned model through ComfyUI's loaders, in every layout erasure methods publish.

    single-file checkpoint   CompVis .ckpt / .safetensors (SA, old ESD "compvis-*"): the base
    UNet file (full)         a whole diffusers-key UNet (.pt/.bin/.safetensors: old ESD, UCE, RECE, MACE's
                             unet/diffusion_pytorch_model.safetensors) or LDM keys
    UNet file (partial)      only the edited weights, diffusers keys (new ESD / UCE code)
    LoRA                     kohya (SPM), diffusers/peft (DUO: ``unet.<module>.lora.down.weight``) and every
                             other layout ComfyUI's LoRA loader reads
    text encoder             a replaced CLIP text encoder (AdvUnlearn), single file or HF folder, keys with or
                             without transformers' "text_model." prefix; refused unless every weight is there

UNet files become "set" patches and LoRAs ComfyUI's own LoRA patches, on clones: the base model's weights are
never edited in place. Every file reports how many of its tensors were used; a file that does not fit the model
completely is an error (unless partial use is explicitly allowed), and so is every shape ComfyUI cannot merge.
Pickled files are read with ``weights_only=True`` (ComfyUI's ``load_torch_file(safe_load=True)``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from dataclasses import dataclass, field

import torch

import comfy.lora
import comfy.sd
import comfy.utils

from .inversion import check_text_encoder_output, single_text_encoder

UNET_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "unet.")
# Tensor names of one LoRA module, after its module name (kohya, diffusers, peft; ComfyUI reads them all).
LORA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".lora_mid.weight", ".lora.down.weight", ".lora.up.weight",
                 ".lora_A.weight", ".lora_B.weight", ".alpha", ".dora_scale")
PEFT_UNET_PREFIXES = ("unet.", "base_model.model.", "")
NOT_LOADED = "lora key not loaded: "  # ComfyUI's log lines: a file key it skipped, a patch no weight took
NOT_PATCHED = "NOT LOADED "
SHOWN = 8  # unmatched names listed in a message
TEXT_MODEL_PREFIX = "text_model."
# In ComfyUI's CLIP but not in transformers' CLIPTextModel: the projection, which SD1/SD2 UNets never read
# (ComfyUI's own loader does not warn about it either).
OPTIONAL_TEXT_ENCODER_KEYS = {"text_projection.weight"}
# Saved by transformers < 4.31 (position_ids) and ComfyUI's CLIPSave (logit_scale); no weights of the encoder.
IGNORED_TEXT_ENCODER_KEYS = {"text_model.embeddings.position_ids", "logit_scale"}


class WeightLayoutError(ValueError):
    """A weights file does not fit the model; the message names the file, the counts and the fix."""


@dataclass
class WeightReport:
    """What a weights file did to the model: its layout, how many of its tensors were used, the unused ones."""

    path: str
    layout: str
    matched: int
    total: int
    unmatched: list[str] = field(default_factory=list)

    def describe(self) -> str:
        text = f"{os.path.basename(self.path)}: {self.layout}, {self.matched}/{self.total} tensors used"
        if self.unmatched:
            text += f"; unused (allowed as partial): {_listing(self.unmatched)}"
        return text


def _listing(names: list[str]) -> str:
    more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


def _refuse_partial(path: str, unmatched: list[str], total: int, what: str, hint: str = "") -> None:
    raise WeightLayoutError(
        f"{os.path.basename(path)}: {len(unmatched)} of its {total} tensors do not fit {what}: "
        f"{_listing(unmatched)}.{hint} Use a file made for this base model, or allow partial loading "
        "(allow_partial / --allow-partial) to apply only the tensors that fit.")


def load_checkpoint(path: str, embedding_directory=None):
    """(MODEL, CLIP, VAE) from a single-file SD checkpoint via ComfyUI's CheckpointLoader path."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Checkpoint not found: {path}")
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
        path, output_vae=True, output_clip=True, embedding_directory=embedding_directory)
    if clip is None:
        raise WeightLayoutError(f"{os.path.basename(path)} has no text encoder; use a checkpoint that includes one "
                                "(--text-encoder replaces a checkpoint's encoder, it cannot add one)")
    return model, clip, vae


def _unet_name(key: str) -> str:
    for prefix in UNET_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def unet_patches(model, state: dict, path: str = "unet", allow_partial: bool = False) -> tuple[dict, WeightReport]:
    """Map a UNet state dict (diffusers or LDM keys, whole or only the edited weights) onto ``model``:
    ({patch key: ("set", (w,))}, report).

    Raises WeightLayoutError when no tensor fits (wrong file), a tensor has the wrong shape (another
    architecture), or some tensors fit nothing and ``allow_partial`` is False.
    """
    tensors = {k: v for k, v in state.items() if torch.is_tensor(v)}
    model_state = model.model.diffusion_model.state_dict()
    diffusers_to_ldm = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    patches, unmatched, layouts = {}, [], set()
    for key, weight in tensors.items():
        name = _unet_name(key)
        if name in model_state:
            target, layouts = name, layouts | {"LDM keys"}
        elif diffusers_to_ldm.get(name) in model_state:
            target, layouts = diffusers_to_ldm[name], layouts | {"diffusers keys"}
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
            f"{os.path.basename(path)}: none of its {len(tensors)} tensors (e.g. {', '.join(sorted(tensors)[:3])}) "
            "matches this checkpoint's UNet; expected diffusers-style UNet keys (down_blocks.0...) or LDM keys "
            "(input_blocks.0...) for the same architecture (a LoRA goes into Load Unlearned LoRA / --lora)")
    unmatched.sort()
    if unmatched and not allow_partial:
        whole = any(k.startswith(("cond_stage_model.", "first_stage_model.")) for k in unmatched)
        hint = " It is a whole checkpoint: load it with CheckpointLoaderSimple / --checkpoint." if whole else ""
        _refuse_partial(path, unmatched, len(tensors), "this model's UNet", hint)
    covered = "full" if len(patches) == len(model_state) else f"partial ({len(patches)} of {len(model_state)} weights)"
    layout = f"{covered} UNet, {' + '.join(sorted(layouts))}"
    return patches, WeightReport(path, layout, len(tensors) - len(unmatched), len(tensors), unmatched)


def apply_unet_weights(model, path: str, allow_partial: bool = False):
    """A clone of ``model`` with the UNet weights of ``path`` merged as patches; and the report."""
    state = comfy.utils.load_torch_file(path, safe_load=True)
    patches, report = unet_patches(model, state, path, allow_partial)
    patched = model.clone()
    patched.add_patches(patches, 1.0)
    return patched, report


@contextlib.contextmanager
def comfy_warnings():
    """The warnings and errors ComfyUI logs from this thread while the block runs: its LoRA code reports keys it
    could not use and shapes it could not merge only in the log."""
    messages, thread = [], threading.get_ident()

    class Collect(logging.Handler):
        def emit(self, record):
            if record.thread == thread:
                messages.append(record.getMessage())

    root, handler = logging.getLogger(), Collect(logging.WARNING)
    level = root.level
    root.addHandler(handler)
    root.setLevel(min(level, logging.WARNING))
    try:
        yield messages
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def _split_lora_key(key: str) -> tuple[str, str]:
    for suffix in LORA_SUFFIXES:
        if key.endswith(suffix):
            return key[:-len(suffix)], suffix
    return key, ""


def comfy_lora_names(lora: dict, key_map: dict) -> dict:
    """{file key: name ComfyUI reads} for keys ComfyUI's key map lacks: diffusers/peft UNet LoRAs name modules
    by their diffusers path (DUO: ``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.lora.down
    .weight``), which ComfyUI only knows under kohya's spelling (``lora_unet_down_blocks_0_..._attn1_to_k``)."""
    renamed = {}
    for key in lora:
        module, suffix = _split_lora_key(key)
        if not suffix or module in key_map:
            continue
        for prefix in PEFT_UNET_PREFIXES:
            kohya = "lora_unet_" + module[len(prefix):].replace(".", "_")
            if module.startswith(prefix) and kohya in key_map:
                renamed[key] = kohya + suffix
                break
    return renamed


def peft_alphas(metadata: dict | None, lora: dict, renamed: dict) -> dict:
    """``.alpha`` tensors from diffusers' ``lora_adapter_metadata`` (peft's LoraConfig, saved only when the
    trainer passes it): ComfyUI reads the scale from ``.alpha`` and would otherwise assume lora_alpha = rank."""
    config = json.loads((metadata or {}).get("lora_adapter_metadata", "{}"))
    alphas = {}
    for component in {k.split(".", 1)[0] for k in config}:
        settings = {k.split(".", 1)[1]: v for k, v in config.items() if k.startswith(component + ".")}
        if settings.get("alpha_pattern") or settings.get("use_rslora") or settings.get("use_dora"):
            raise WeightLayoutError(f"the LoRA's {component} config uses alpha_pattern, rsLoRA or DoRA, which "
                                    "ComfyUI's loader cannot scale; merge it into the weights first")
        if "lora_alpha" not in settings:
            continue
        for key in lora:
            module, suffix = _split_lora_key(renamed.get(key, key))
            if key.startswith(component + ".") and suffix in (".lora.down.weight", ".lora_A.weight"):
                alphas[module + ".alpha"] = torch.tensor(float(settings["lora_alpha"]))
    return alphas


def _merge_errors(patcher, before: dict) -> list[str]:
    """Shapes ComfyUI could not merge: its own weight calculation, run on meta tensors (free), for each new patch."""
    errors = []
    for key, patches in patcher.patches.items():
        if len(patches) == len(before.get(key, ())):
            continue
        weight = comfy.utils.get_attr(patcher.model, key)
        with comfy_warnings() as messages:
            try:
                comfy.lora.calculate_weight(patches, torch.empty_like(weight, device="meta"), key)
            except RuntimeError as error:  # "set" patches raise instead of logging
                messages.append(f"{key}: {error}")
        errors += messages
    return errors


def apply_lora(model, clip, path: str, strength_model: float = 1.0, strength_clip: float | None = None,
               allow_partial: bool = False):
    """(MODEL, CLIP) clones with a LoRA applied by ComfyUI's own loader, after renaming the keys it lacks; and the
    report. Raises WeightLayoutError when no tensor fits, a shape does not fit (another architecture), or some
    tensors fit nothing and ``allow_partial`` is False."""
    lora, metadata = comfy.utils.load_torch_file(path, safe_load=True, return_metadata=True)
    lora = {k: v for k, v in lora.items() if torch.is_tensor(v)}
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    renamed = comfy_lora_names(lora, key_map)
    alphas = peft_alphas(metadata, lora, renamed)
    converted = {renamed.get(k, k): v for k, v in lora.items()} | alphas
    original = {new: old for old, new in renamed.items()}
    with comfy_warnings() as messages:
        new_model, new_clip = comfy.sd.load_lora_for_models(
            model, clip, converted, strength_model, strength_model if strength_clip is None else strength_clip)
    unmatched = sorted(original.get(m[len(NOT_LOADED):], m[len(NOT_LOADED):]) for m in messages
                       if m.startswith(NOT_LOADED) and m[len(NOT_LOADED):] not in alphas)
    name = os.path.basename(path)
    if len(unmatched) == len(lora):
        raise WeightLayoutError(f"{name}: none of its {len(lora)} tensors (e.g. {', '.join(sorted(lora)[:3])}) is a "
                                "LoRA for this model (wrong base model, or not a LoRA: a UNet state dict goes into "
                                "Load Unlearned Weights / --unet)")
    errors = _merge_errors(new_model, model.patches) + _merge_errors(new_clip.patcher, clip.patcher.patches)
    errors = sorted(errors + [m for m in messages if m.startswith(NOT_PATCHED)])
    if errors:
        raise WeightLayoutError(f"{name}: ComfyUI cannot merge {len(errors)} of its patches, e.g. {errors[0]}: the "
                                "LoRA was made for a different architecture (e.g. an SD2 LoRA on an SD1 checkpoint)")
    if unmatched and not allow_partial:
        _refuse_partial(path, unmatched, len(lora), "this model's UNet or text encoder")
    layout = "LoRA, diffusers/peft keys" if renamed else "LoRA"
    return new_model, new_clip, WeightReport(path, layout, len(lora) - len(unmatched), len(lora), unmatched)


def text_encoder_file(path: str) -> str:
    """The weights file of a replaced text encoder: ``path`` itself, or the one inside a transformers folder
    (``save_pretrained``) or a diffusers pipeline folder (``text_encoder/``)."""
    if not os.path.isdir(path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Text encoder not found: {path}")
        return path
    names = ("model.safetensors", "pytorch_model.bin")
    found = [os.path.join(path, sub, n) for sub in ("", "text_encoder") for n in names
             if os.path.isfile(os.path.join(path, sub, n))]
    if not found:
        raise WeightLayoutError(f"{path} holds no model.safetensors or pytorch_model.bin (nor text_encoder/ with one)")
    return found[0]


def text_encoder_state(clip, state: dict, path: str = "text encoder") -> tuple[dict, WeightReport]:
    """``state`` (a transformers CLIPTextModel) under ComfyUI's key names, checked against ``clip``'s encoder.

    transformers 4.x, CLIPTextModelWithProjection and ComfyUI's CLIPSave write ``text_model.encoder...`` keys;
    transformers 5's CLIPTextModel writes them without the ``text_model.`` prefix. Raises WeightLayoutError
    when a tensor has another shape (another model family) or any key is missing or unexpected (named as
    the file spells them): ComfyUI's loader would run missing weights uninitialised, with only a warning.
    """
    prefixed = any(key.startswith(TEXT_MODEL_PREFIX) for key in state)
    state = dict(state) if prefixed else {TEXT_MODEL_PREFIX + key: value for key, value in state.items()}
    spelled = (lambda key: key) if prefixed else (lambda key: key.removeprefix(TEXT_MODEL_PREFIX))
    layout = f"text encoder, {'text_model.* keys' if prefixed else 'keys without text_model.'}"
    encoder_state = single_text_encoder(clip)[1].transformer.state_dict()
    name = os.path.basename(path)
    for key in sorted(set(state) & set(encoder_state)):
        if tuple(state[key].shape) != tuple(encoder_state[key].shape):
            raise WeightLayoutError(
                f"{name}: {spelled(key)} has shape {tuple(state[key].shape)} but this checkpoint's text encoder has "
                f"{tuple(encoder_state[key].shape)}: a text encoder for another model family (e.g. SD2's OpenCLIP-H "
                "for an SD1 checkpoint); use the text encoder of this model's family")
    required = set(encoder_state) - OPTIONAL_TEXT_ENCODER_KEYS
    missing = required - set(state)
    unexpected = set(state) - set(encoder_state) - IGNORED_TEXT_ENCODER_KEYS
    if missing or unexpected:
        raise WeightLayoutError(
            f"{name}: {len(required) - len(missing)} of the {len(required)} weights of this checkpoint's text "
            f"encoder are in the file ({layout}); missing: {_listing(sorted(map(spelled, missing))) or 'none'}; "
            f"unexpected: {_listing(sorted(map(spelled, unexpected))) or 'none'}. Refusing to run a partly "
            "initialised text encoder (--allow-partial does not apply): pass a complete CLIPTextModel of this "
            "model's family as transformers' save_pretrained writes it (the folder or its model.safetensors)")
    return state, WeightReport(path, layout, len(set(state) & set(encoder_state)), len(state))


def replace_text_encoder(clip, path: str, embedding_directory=None):
    """(CLIP, report): ``clip``'s text encoder replaced by the one in ``path`` (AdvUnlearn), loaded by ComfyUI.

    ``path``: a file or a transformers / diffusers folder, in a layout ``text_encoder_state`` accepts.
    Every key must match ``clip``'s encoder and the result must encode a fixed prompt to finite,
    position-dependent conditioning; otherwise WeightLayoutError / TrainingSetupError. The result is a new CLIP
    (``clip`` is only read) with ``clip``'s last-layer setting; patches on ``clip`` (a LoRA) are refused, since
    the new encoder would drop them.
    """
    if clip.patcher.patches:
        raise WeightLayoutError(
            f"this CLIP carries {len(clip.patcher.patches)} weight patches (a LoRA applied before): replacing its "
            "text encoder would drop them; load the text encoder first, then the LoRA")
    file = text_encoder_file(path)
    state, report = text_encoder_state(clip, comfy.utils.load_torch_file(file, safe_load=True), file)
    replaced = comfy.sd.load_text_encoder_state_dicts([state], embedding_directory=embedding_directory,
                                                      clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION)
    if clip.layer_idx is not None:  # Set CLIP Last Layer before this
        replaced.clip_layer(clip.layer_idx)
    check_text_encoder_output(replaced, os.path.basename(file))
    return replaced, report


def load_unlearned_model(checkpoint: str, unet: str | None = None, loras=(), text_encoder: str | None = None,
                         embedding_directory=None, allow_partial: bool = False):
    """(MODEL, CLIP, VAE, [WeightReport]) for the CLI: base checkpoint, then each replacement in order."""
    model, clip, vae = load_checkpoint(checkpoint, embedding_directory)
    reports = []
    if text_encoder:
        clip, report = replace_text_encoder(clip, text_encoder, embedding_directory)
        reports.append(report)
    if unet:
        model, report = apply_unet_weights(model, unet, allow_partial)
        reports.append(report)
    for path, strength in loras:
        model, clip, report = apply_lora(model, clip, path, strength, allow_partial=allow_partial)
        reports.append(report)
    return model, clip, vae, reports
