"""TrainImplicitNegative: concept inversion inside ComfyUI, on whatever MODEL and CLIP the graph loaded.

The node is a thin adapter: images -> VAE latents -> ``implicit_negatives.comfyui.training`` (the training
entry ``python -m trainer`` uses too) -> our embedding file + an IMPLICIT_NEGATIVE.
Training runs in-process under ``inference_mode(False)`` on private copies of the weights, so
the shared MODEL / CLIP are untouched; ComfyUI's progress bar and Cancel work every step.
Node ID, input names and input order are public API: append new inputs at the end.
"""

from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io

import comfy.utils

from implicit_negatives.comfyui import inversion as ci
from implicit_negatives.comfyui.negation_sets import export_negation_set as export_negation_set_file, pixel_hashes
from implicit_negatives.comfyui.training import (
    LEARNING_RATE_RANGE, RunSources, embedding_metadata, run_metadata, train_embedding,
)
from implicit_negatives.embedding_io import Embedding, ImplicitNegative, save_embedding
from implicit_negatives.inversion import CAPTION_TEMPLATES, InversionConfig
from implicit_negatives.negation_set_io import negation_set_path

from .socket_types import ImplicitNegativeType


def embedding_destination(name: str, overwrite: bool) -> str:
    """``<first embeddings folder>/<name>.safetensors``; refuses path-like names and silent overwrites."""
    if not name.strip() or any(c in name for c in "/\\") or name.startswith(".") or ".." in name:
        raise ValueError(f"Embedding name {name!r} must be a plain file name (no folders), e.g. 'nudity-duo'")
    stem = name[: -len(".safetensors")] if name.endswith(".safetensors") else name
    path = os.path.join(folder_paths.get_folder_paths("embeddings")[0], f"{stem}.safetensors")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists: choose another name or set overwrite to true")
    return path


class TrainImplicitNegative(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TrainImplicitNegative",
            display_name="Train Implicit Negative",
            category="conditioning/implicit negatives",
            description=("Learns an implicit negative by concept inversion: textual inversion against the given "
                         "(unlearned) MODEL and CLIP, all weights frozen, on a batch of concept images. Saves it "
                         "to the embeddings folder (usable as embedding:NAME) and outputs it. Defaults are the "
                         "paper's: 1 vector, Adam lr 0.005, batch 1, 3000 steps (~15 min on an RTX 3090). "
                         "The input MODEL and CLIP are not modified."),
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="The unlearned model to invert (e.g. SD1.4 + DUO LoRA); not modified."),
                io.Clip.Input("clip", tooltip=("Its text encoder (SD1.x, SD2.x, or SDXL: CLIP-L and CLIP-G vectors learned "
                                               "together); the vectors are learned in its input space.")),
                io.Vae.Input("vae", tooltip="Encodes the images to latents once, before training."),
                io.Image.Input("images", tooltip="Concept images (a batch); resized and center-cropped to the resolution."),
                io.String.Input("name", default="implicit-negative",
                                tooltip="File name in the embeddings folder (NAME.safetensors)."),
                io.Int.Input("steps", default=3000, min=1, max=100000, tooltip="Optimisation steps (paper: 3000)."),
                io.Float.Input("learning_rate", default=0.005, min=LEARNING_RATE_RANGE[0], max=LEARNING_RATE_RANGE[1],
                               step=0.0001,
                               tooltip="Adam learning rate (paper: 0.005)."),
                io.Int.Input("num_vectors", default=1, min=1, max=16, tooltip="Tokens in the embedding (paper: 1)."),
                io.String.Input("init_word", default="person", tooltip="Word whose embedding starts the vectors."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=False,
                             tooltip="Seed for noise, timesteps and image order; same seed and data = same embedding."),
                io.Int.Input("resolution", default=512, min=64, max=2048, step=8,
                             tooltip="Training resolution in pixels (SD1.x: 512, SD2.x 768-v: 768, SDXL: 1024)."),
                io.Combo.Input("templates", options=sorted(CAPTION_TEMPLATES), default="object",
                               tooltip="Caption templates around the vectors: object ('a photo of a {}'), "
                                       "style ('a painting in the style of {}'), bare (the vectors alone)."),
                io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Images per step (paper: 1)."),
                io.String.Input("concept", default="", tooltip="What the embedding stands for (saved as metadata)."),
                io.Boolean.Input("overwrite", default=False, tooltip="Replace an existing file of the same name."),
                io.Boolean.Input("gradient_checkpointing", default=False,
                                 tooltip="Recompute UNet activations in backward: less memory, ~30% slower."),
                io.Combo.Input("precision", options=list(ci.PRECISIONS), default="auto", optional=True,
                               tooltip="Compute dtype of UNet and text encoder for training (the input MODEL keeps "
                                       "its own): auto = bf16 on GPUs that run it natively, else fp16 with loss "
                                       "scaling on GPUs that run fp16, else fp32 (CPU)."),
                io.Boolean.Input("export_negation_set", default=False, optional=True,
                                 tooltip="Also save the images' VAE latents (with their hashes, the VAE "
                                         "fingerprint and the resolution) as NAME.negation_set.safetensors next to "
                                         "the embedding: the negation set for SafeDenoiser (Load Negation Set)."),
            ],
            outputs=[ImplicitNegativeType.Output(
                tooltip="The learned embedding (strength 1.0); feed ImplicitNegativeConditioning.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, clip, vae, images, name, steps, learning_rate, num_vectors, init_word, seed, resolution,
                templates, batch_size, concept, overwrite, gradient_checkpointing, precision="auto",
                export_negation_set=False) -> io.NodeOutput:
        destination = embedding_destination(name, overwrite)
        exported_path = negation_set_path(destination)
        if export_negation_set and os.path.exists(exported_path) and not overwrite:
            raise FileExistsError(f"{exported_path} already exists: choose another name or set overwrite to true")
        config = InversionConfig(steps=steps, learning_rate=learning_rate, seed=seed, num_vectors=num_vectors,
                                 batch_size=batch_size)
        node_id = cls.hidden.unique_id if cls.hidden is not None else None  # None when called outside a graph
        bar = comfy.utils.ProgressBar(steps, node_id=node_id)
        fitted = ci.fit_images(images, resolution)
        latents = ci.encode_images(vae, fitted)
        trained = train_embedding(model, clip, latents, [None] * latents.shape[0], config, init_word, templates,
                                  copy_weights="auto", gradient_checkpointing=gradient_checkpointing,
                                  precision=precision,
                                  on_step=lambda progress: bar.update_absolute(progress.step, steps))
        sources = RunSources(base_model="ComfyUI graph MODEL", unlearned_model="ComfyUI graph MODEL",
                             data=f"IMAGE batch ({latents.shape[0]} images)", trained_in="TrainImplicitNegative")
        run = run_metadata(model, clip, sources, config, init_word=init_word, templates=templates,
                           resolution=resolution, num_images=latents.shape[0], concept=concept,
                           precision=trained.precision)
        metadata = embedding_metadata(run, trained.losses, steps, trained.loss_scale, trained.warning)
        save_embedding(destination, trained.file_vectors, metadata)
        stem = os.path.splitext(os.path.basename(destination))[0]
        negative = ImplicitNegative(name=stem, embedding=Embedding(vectors=dict(trained.file_vectors),
                                                                   metadata=metadata, source=destination))
        summary = f"saved {os.path.basename(destination)}: {steps} steps, final loss {metadata['loss']}"
        if export_negation_set:
            export_negation_set_file(exported_path, vae, latents, pixel_hashes(fitted), resolution,
                                     f"TrainImplicitNegative: IMAGE batch ({latents.shape[0]} images)")
            summary += f"; negation set {os.path.basename(exported_path)}"
        if trained.warning:
            summary += f"\nWARNING: {trained.warning}"
        return io.NodeOutput(negative, ui={"text": [summary]})
