"""LoadImplicitNegative and ImplicitNegativeConditioning: file -> IMPLICIT_NEGATIVE -> CONDITIONING.

Node IDs, input names and input order are public API (saved workflows store them): append
new inputs at the end, never rename or reorder.
"""

from __future__ import annotations

import logging
import os

import folder_paths
from comfy_api.latest import io

from implicit_negatives.embedding_io import EMBEDDING_EXTENSIONS, ImplicitNegative, load_embedding
from implicit_negatives.comfyui.clip import CONTEXTS, MODES, describe, encode_implicit_negative
from implicit_negatives.comfyui.model_identity import model_transfer_warning
from implicit_negatives.negation_set_io import NEGATION_SET_SUFFIX

from .socket_types import ImplicitNegativeType


def embedding_choices() -> list[str]:
    return sorted(name for name in folder_paths.get_filename_list("embeddings")  # not the exported negation sets
                  if name.lower().endswith(EMBEDDING_EXTENSIONS) and not name.endswith(NEGATION_SET_SUFFIX))


HOW_TO_GET_ONE = (
    "An implicit negative is trained for your unlearned checkpoint first (none ships with the pack). In one "
    "queue: open the template 'start_here' (Workflow > Browse Templates > implicit-negatives), pick your original "
    "and unlearned checkpoints, Run. Or from the pack's folder: python -m trainer --checkpoint UNLEARNED.safetensors "
    "--generate-from ORIGINAL.safetensors --generate-prompt \"PROMPT SHOWING THE CONCEPT\" --name NAME. Then press R "
    "in the frontend to refresh this list.")


def resolve_embedding_path(name: str) -> str:
    """Full path of ``name`` inside one of ComfyUI's embeddings folders; rejects names that escape them.

    The name must stay inside a folder as written; symlinks in the folder are followed, as ComfyUI's own
    ``folder_paths.get_full_path`` and the file list this node offers do (a per-file symlink is a common
    way to share one model store)."""
    if name.strip() == "":
        raise FileNotFoundError(f"No embedding chosen ({len(embedding_choices())} in the embeddings folders). "
                                f"{HOW_TO_GET_ONE}")
    parts = name.replace("\\", "/").split("/")
    if os.path.isabs(name) or ".." in parts:
        raise ValueError(f"Embedding name {name!r} is not a file inside the embeddings folders")
    for folder in folder_paths.get_folder_paths("embeddings"):
        root = os.path.abspath(folder)
        candidate = os.path.normpath(os.path.join(root, name))
        if os.path.commonpath([root, candidate]) == root and os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(
        f"Embedding {name!r} not found in the embeddings folders ({', '.join(folder_paths.get_folder_paths('embeddings'))}"
        f"; they hold {len(embedding_choices())} embedding file(s)). {HOW_TO_GET_ONE}")


class LoadImplicitNegative(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoadImplicitNegative",
            display_name="Load Implicit Negative",
            category="conditioning/implicit negatives",
            description=("Loads a learned negative embedding (textual inversion against an unlearned model) "
                         "from the embeddings folders. Any common format works: ours, A1111 .pt, "
                         "diffusers learned_embeds.bin, kohya safetensors."),
            inputs=[
                io.Combo.Input("embedding", options=embedding_choices(),
                               tooltip="File in models/embeddings or this pack's embeddings/ folder."),
                io.Float.Input("strength", default=1.0, min=0.0, max=5.0, step=0.05,
                               tooltip="Prompt weight of the embedding, as in (embedding:NAME:strength)."),
            ],
            outputs=[
                ImplicitNegativeType.Output(
                    tooltip="The vectors, their metadata and the strength; feed ImplicitNegativeConditioning."),
                io.String.Output("info", display_name="info",  # display_name: 0.3.64 names outputs by it
                                 tooltip=("What the file says about itself: concept, the unlearned model it "
                                          "was learned on, vectors, steps. Connect to Preview Any to read.")),
            ],
        )

    @classmethod
    def validate_inputs(cls, embedding):
        """Replaces ComfyUI's combo check for ``embedding`` (which, with no file yet, says only "not in []")
        with the message that says how to get one."""
        try:
            resolve_embedding_path(embedding)
        except (FileNotFoundError, ValueError) as error:
            return str(error)
        return True

    @classmethod
    def fingerprint_inputs(cls, embedding, strength):
        path = resolve_embedding_path(embedding)
        stat = os.stat(path)
        return f"{path}:{stat.st_mtime_ns}:{stat.st_size}:{strength}"  # reload when the file changes

    @classmethod
    def execute(cls, embedding, strength) -> io.NodeOutput:
        loaded = load_embedding(resolve_embedding_path(embedding))
        name = os.path.splitext(os.path.basename(embedding))[0]
        negative = ImplicitNegative(name=name, embedding=loaded, strength=float(strength))
        info = describe(negative)
        return io.NodeOutput(negative, info, ui={"text": [info]})


class ImplicitNegativeConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ImplicitNegativeConditioning",
            display_name="Implicit Negative Conditioning",
            category="conditioning/implicit negatives",
            description=("Encodes an implicit negative (optionally with negative text) into CONDITIONING for "
                         "a KSampler's negative input or SafeLatentGuidance's safety concept. Equals "
                         "CLIPTextEncode of 'text embedding:NAME', but refuses embeddings of the wrong width."),
            inputs=[
                io.Clip.Input("clip", tooltip="The (unlearned) model's CLIP; its width is checked."),
                ImplicitNegativeType.Input("implicit_negative",
                                           tooltip="From Load Implicit Negative (or the trainer node)."),
                io.String.Input("text", multiline=True, default="",
                                tooltip="Optional negative text, e.g. 'low quality'."),
                io.Combo.Input("mode", options=list(MODES), default=MODES[0],
                               tooltip=("in_text_chunk: vectors follow the text in its 77-token chunk (A1111). "
                                        "appended_chunk: vectors get a chunk of their own (ConditioningConcat). "
                                        "embedding_only: vectors alone; text must be empty.")),
                io.Model.Input("model", optional=True,
                               tooltip=("Optional: the MODEL you sample with. If the embedding records the model it "
                                        "was learned on and this one differs, a warning is logged.")),
                io.Combo.Input("context", options=list(CONTEXTS), default="bare", optional=True,
                               tooltip=("Words around the vectors. bare (default, the paper's use): the vectors "
                                        "alone. training_template: inside the first caption template they were "
                                        "trained in, e.g. 'a photo of a embedding:NAME' (recorded by this pack's "
                                        "trainer; files without one are refused).")),
            ],
            outputs=[io.Conditioning.Output(tooltip="Negative conditioning carrying the implicit negative.")],
        )

    @classmethod
    def execute(cls, clip, implicit_negative, text, mode, model=None, context="bare") -> io.NodeOutput:
        if clip is None:
            raise RuntimeError("ERROR: clip input is invalid: None. If the clip is from a checkpoint loader "
                               "node your checkpoint does not contain a valid clip or text encoder model.")
        warning = model_transfer_warning(model, implicit_negative)
        if warning:
            logging.warning(warning)
        return io.NodeOutput(encode_implicit_negative(clip, implicit_negative, text, mode, context))
