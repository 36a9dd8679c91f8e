"""API-format ComfyUI graphs for one work item (row x prompt), built from stock nodes and the pack's nodes.

Node ids are fixed strings so that consecutive items share loader nodes and ComfyUI's cache keeps the
checkpoint loaded. ``resolve(folder, value)`` maps a config file entry to the name ComfyUI's folder lists
(the engine registers absolute paths' folders first).
"""

from __future__ import annotations

import os
from typing import Callable

from .protocol import (LORA_NODE, NEGATION_SET_FOLDER, NEGATION_SET_NODE, SAFE_DENOISER_NODE, SAFREE_NODE,
                       SAFREE_REATTENTION_NODE, SLD_NODE, TEXT_ENCODER_NODE, TRUNCATE_NODE, UNET_NODE, NegativeSource,
                       PromptRecord, Row, RunConfig)

Resolve = Callable[[str, str], str]
SAVE_NODE = "save"


def comfy_file_name(value: str) -> str:
    """The name ComfyUI lists for a config file entry: an absolute path's base name, else the entry itself."""
    return os.path.basename(value) if os.path.isabs(value) else value


def _model_nodes(config: RunConfig, row: Row, resolve: Resolve) -> tuple[dict, list, list, list]:
    setup = config.models[row.model]
    graph = {"ckpt": {"class_type": "CheckpointLoaderSimple",
                      "inputs": {"ckpt_name": resolve("checkpoints", setup.checkpoint)}}}
    model, clip, vae = ["ckpt", 0], ["ckpt", 1], ["ckpt", 2]
    if setup.unet:  # merged onto the checkpoint's UNet: whole (old ESD, UCE, RECE) or edited weights (new ESD, UCE)
        graph["unet"] = {"class_type": UNET_NODE,
                         "inputs": {"model": model, "unet_name": resolve("diffusion_models", setup.unet),
                                    "allow_partial": setup.allow_partial}}
        model = ["unet", 0]
    if setup.text_encoder:  # every weight checked against the checkpoint's encoder, either transformers layout
        graph["te"] = {"class_type": TEXT_ENCODER_NODE,
                       "inputs": {"clip": clip, "text_encoder_name": resolve("text_encoders", setup.text_encoder)}}
        clip = ["te", 0]
    for number, (lora, strength) in enumerate(setup.all_loras()):  # stacked in order, each on the last's output
        node = "lora" if number == 0 else f"lora{number + 1}"
        graph[node] = {"class_type": LORA_NODE,
                       "inputs": {"model": model, "clip": clip, "lora_name": resolve("loras", lora),
                                  "strength_model": strength, "strength_clip": strength,
                                  "allow_partial": setup.allow_partial}}
        model, clip = [node, 0], [node, 1]
    if config.truncate_prompts:  # every prompt of the item in one 77-token chunk, as diffusers tokenizes
        graph["truncate"] = {"class_type": TRUNCATE_NODE, "inputs": {"clip": clip}}
        clip = ["truncate", 0]
    return graph, model, clip, vae


def _negative_nodes(source: NegativeSource, clip: list, resolve: Resolve) -> tuple[dict, list]:
    """CONDITIONING of a negative source: plain text, or an implicit embedding (with optional text)."""
    if not source.embedding:
        return {"neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": source.text}}}, ["neg", 0]
    graph = {
        "neg_load": _load_implicit(source, resolve),
        "neg": {"class_type": "ImplicitNegativeConditioning",
                "inputs": {"clip": clip, "implicit_negative": ["neg_load", 0], "text": source.text,
                           "mode": source.mode}},
    }
    return graph, ["neg", 0]


def _load_implicit(source: NegativeSource, resolve: Resolve) -> dict:
    return {"class_type": "LoadImplicitNegative",
            "inputs": {"embedding": resolve("embeddings", source.embedding), "strength": source.strength}}


def _safree_nodes(source: NegativeSource, clip: list, prompt: str, resolve: Resolve) -> dict:
    """SAFREE: the negative's text = concept keywords, its embedding = SafreeConditioning's implicit_negative.

    An embedding alone is the whole concept (the node's ``replace``, the paper's SAFREE + C*); an embedding with
    text joins the keywords (``add``), as text and embedding combine for the other guidance kinds."""
    inputs = {"clip": clip, "prompt": prompt, "concept_keywords": source.text}
    graph = {"safree": {"class_type": SAFREE_NODE, "inputs": inputs}}
    if source.embedding:
        graph["neg_load"] = _load_implicit(source, resolve)
        inputs["implicit_negative"] = ["neg_load", 0]
        inputs["implicit_negative_use"] = "add" if source.text.strip() else "replace"
    return graph


def patch_spec(row: Row) -> tuple[str, dict]:
    """(node id, inputs) of the MODEL-patching guidance node; '$model'/'$clip'/'$concept' are wired later."""
    if row.guidance == "sld":
        return SLD_NODE, {"model": "$model", "safety_concept": "$concept", "preset": row.sld_preset}
    return row.patch_node, dict(row.patch_inputs)


def build_item_graph(config: RunConfig, row: Row, prompt: PromptRecord, resolve: Resolve, filename_prefix: str) -> dict:
    """The whole graph for one image: load -> (patch) -> encode -> KSampler -> VAEDecode -> SaveImage."""
    graph, model, clip, vae = _model_nodes(config, row, resolve)
    positive, sampler_negative = ["pos", 0], ["empty", 0]
    if row.guidance == "safree":
        graph.update(_safree_nodes(config.negatives[row.negative], clip, prompt.prompt, resolve))
        positive, sampler_negative = ["safree", 0], ["safree", 1]
        if row.safree_reattention:
            graph["patch"] = {"class_type": SAFREE_REATTENTION_NODE,
                              "inputs": {"model": model, "safree_positive": positive}}
            model = ["patch", 0]
    elif row.guidance != "none":
        negative_graph, concept = _negative_nodes(config.negatives[row.negative], clip, resolve)
        graph.update(negative_graph)
        in_sampler = row.negative_in_sampler if row.negative_in_sampler is not None else row.guidance == "negative_prompt"
        if in_sampler:
            sampler_negative = concept
        if row.guidance in ("sld", "model_patch"):
            node_id, inputs = patch_spec(row)
            wiring = {"$model": model, "$clip": clip, "$concept": concept}
            graph["patch"] = {"class_type": node_id,
                              "inputs": {k: wiring.get(v, v) if isinstance(v, str) else v for k, v in inputs.items()}}
            model = ["patch", 0]
    width, height = config.model_size(row.model)
    if row.negation_set:  # Safe Denoiser on top of everything else: its post-CFG hook runs after SLD's guidance
        source = config.negation_sets[row.negation_set]
        graph["negation_set"] = {"class_type": NEGATION_SET_NODE,
                                 "inputs": {"path": resolve(NEGATION_SET_FOLDER, source.path), "vae": vae,
                                            "resolution": width, "skip_bad_images": source.skip_bad_images}}
        graph["safe_denoiser"] = {"class_type": SAFE_DENOISER_NODE,
                                  "inputs": {"model": model, "negation_set": ["negation_set", 0],
                                             **dict(row.safe_denoiser)}}
        model = ["safe_denoiser", 0]
    if positive == ["pos", 0]:
        graph["pos"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": prompt.prompt}}
    if sampler_negative == ["empty", 0]:  # diffusers' unconditional branch: the empty prompt
        graph["empty"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": ""}}
    # The model's own size. SDXL's size conditioning: CLIPTextEncode attaches none, so ComfyUI's SDXL takes
    # original = target = this latent's size x 8 and crop (0, 0), which is diffusers' SDXL pipeline default.
    graph["latent"] = {"class_type": "EmptyLatentImage",
                       "inputs": {"width": width, "height": height, "batch_size": 1}}
    graph["sample"] = {"class_type": "KSampler",
                       "inputs": {"model": model, "positive": positive, "negative": sampler_negative,
                                  "latent_image": ["latent", 0], "seed": prompt.seed, "steps": config.steps,
                                  "cfg": config.item_cfg(prompt), "sampler_name": config.sampler,
                                  "scheduler": config.scheduler, "denoise": 1.0}}
    graph["decode"] = {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": vae}}
    graph[SAVE_NODE] = {"class_type": "SaveImage", "inputs": {"images": ["decode", 0],
                                                              "filename_prefix": filename_prefix}}
    return graph


def node_types(graph: dict) -> set[str]:
    return {node["class_type"] for node in graph.values()}
