"""LoadUnlearnedWeights, LoadUnlearnedLoRA, LoadUnlearnedTextEncoder: an unlearned model's published weights ->
patched MODEL (+ CLIP), or a CLIP with the replaced text encoder.

The file layouts and their checks live in ``implicit_negatives.comfyui.weights`` (shared with the trainer and the
evaluation runner). Node IDs, input names and input order are public API: append new inputs at the end.
"""

from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io

from implicit_negatives.comfyui.weights import apply_lora, apply_unet_weights, replace_text_encoder

ALLOW_PARTIAL_TOOLTIP = ("Off: a file with tensors that fit nothing in this model is an error (listing them). On: "
                         "apply the tensors that fit and list the others in the report.")


def file_fingerprint(folder: str, name: str, *settings) -> str:
    path = folder_paths.get_full_path_or_raise(folder, name)
    stat = os.stat(path)
    return f"{path}:{stat.st_mtime_ns}:{stat.st_size}:{settings}"  # reload when the file changes


class LoadUnlearnedWeights(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoadUnlearnedWeights",
            display_name="Load Unlearned Weights",
            category="loaders/unlearned models",
            description=("Merges an unlearned UNet file into the model as patches on a copy: a whole UNet (old "
                         "ESD, UCE, RECE, MACE) or only the edited weights (new ESD / UCE), diffusers or LDM keys. "
                         "Reports how many of the file's tensors were used; a file for another architecture is "
                         "an error."),
            inputs=[
                io.Model.Input("model", tooltip="The base model the weights were unlearned from (e.g. SD1.4)."),
                io.Combo.Input("unet_name", options=folder_paths.get_filename_list("diffusion_models"),
                               tooltip="File in models/diffusion_models (or models/unet)."),
                io.Boolean.Input("allow_partial", default=False, tooltip=ALLOW_PARTIAL_TOOLTIP),
            ],
            outputs=[
                io.Model.Output(tooltip="A copy of the model with the file's weights; the input model is unchanged."),
                io.String.Output("report", display_name="report",
                                 tooltip="The file's layout and 'N/M tensors used'. Connect to Preview Any to read."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, model, unet_name, allow_partial):
        return file_fingerprint("diffusion_models", unet_name, allow_partial)

    @classmethod
    def execute(cls, model, unet_name, allow_partial) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise("diffusion_models", unet_name)
        patched, report = apply_unet_weights(model, path, allow_partial)
        text = report.describe()
        return io.NodeOutput(patched, text, ui={"text": [text]})


class LoadUnlearnedLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoadUnlearnedLoRA",
            display_name="Load Unlearned LoRA",
            category="loaders/unlearned models",
            description=("Applies an unlearning LoRA with ComfyUI's own LoRA code, in every layout ComfyUI reads "
                         "plus diffusers/peft (DUO), which the stock LoRA loader skips. Reports how many of the "
                         "file's tensors were used; keys or shapes that do not fit are an error, not a log line."),
            inputs=[
                io.Model.Input("model", tooltip="The base model the LoRA was trained on (e.g. SD1.4)."),
                io.Clip.Input("clip", tooltip="The base model's CLIP (patched when the LoRA has text-encoder keys)."),
                io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"),
                               tooltip="File in models/loras (DUO: pytorch_lora_weights.safetensors)."),
                io.Float.Input("strength_model", default=1.0, min=-100.0, max=100.0, step=0.01,
                               tooltip="LoRA strength on the UNet (1.0 = as trained)."),
                io.Float.Input("strength_clip", default=1.0, min=-100.0, max=100.0, step=0.01,
                               tooltip="LoRA strength on the text encoder (1.0 = as trained)."),
                io.Boolean.Input("allow_partial", default=False, tooltip=ALLOW_PARTIAL_TOOLTIP),
            ],
            outputs=[
                io.Model.Output(tooltip="A copy of the model with the LoRA; the input model is unchanged."),
                io.Clip.Output(tooltip="A copy of the CLIP with the LoRA's text-encoder part, if any."),
                io.String.Output("report", display_name="report",
                                 tooltip="The file's layout and 'N/M tensors used'. Connect to Preview Any to read."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, model, clip, lora_name, strength_model, strength_clip, allow_partial):
        return file_fingerprint("loras", lora_name, strength_model, strength_clip, allow_partial)

    @classmethod
    def execute(cls, model, clip, lora_name, strength_model, strength_clip, allow_partial) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise("loras", lora_name)
        new_model, new_clip, report = apply_lora(model, clip, path, strength_model, strength_clip, allow_partial)
        text = report.describe()
        return io.NodeOutput(new_model, new_clip, text, ui={"text": [text]})


class LoadUnlearnedTextEncoder(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoadUnlearnedTextEncoder",
            display_name="Load Unlearned Text Encoder",
            category="loaders/unlearned models",
            description=("Replaces the CLIP's text encoder with an unlearned one (AdvUnlearn's transformers "
                         "CLIPTextModel), with or without transformers' text_model. key prefix. Every weight must "
                         "be in the file and a test prompt must encode to usable conditioning; otherwise an error "
                         "naming the missing keys, where the stock Load CLIP runs missing weights uninitialised."),
            inputs=[
                io.Clip.Input("clip", tooltip=("The base model's CLIP (e.g. SD1.4's): its encoder is the reference "
                                               "every key and shape of the file is checked against.")),
                io.Combo.Input("text_encoder_name", options=folder_paths.get_filename_list("text_encoders"),
                               tooltip=("File in models/text_encoders (or models/clip), e.g. AdvUnlearn's "
                                        "model.safetensors.")),
            ],
            outputs=[
                io.Clip.Output(tooltip="A new CLIP with the file's text encoder; the input CLIP is unchanged."),
                io.String.Output("report", display_name="report",
                                 tooltip="The file's layout and 'N/M tensors used'. Connect to Preview Any to read."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, clip, text_encoder_name):
        return file_fingerprint("text_encoders", text_encoder_name)

    @classmethod
    def execute(cls, clip, text_encoder_name) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise("text_encoders", text_encoder_name)
        replaced, report = replace_text_encoder(clip, path, folder_paths.get_folder_paths("embeddings"))
        text = report.describe()
        return io.NodeOutput(replaced, text, ui={"text": [text]})
