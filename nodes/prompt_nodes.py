"""TruncatePrompts: a CLIP whose prompts are cut to one 77-token chunk, as diffusers pipelines tokenize.

Node ID, input names and input order are public API (saved workflows store them): append new
inputs at the end, never rename or reorder.
"""

from __future__ import annotations

from comfy_api.latest import io

from implicit_negatives.comfyui.clip import truncating_clip


class TruncatePrompts(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TruncatePrompts",
            display_name="Truncate Prompts to 77 Tokens",
            category="conditioning/implicit negatives/evaluation",
            description=("Returns a copy of the CLIP that encodes only the first 75 tokens of every prompt (start "
                         "token + 75 + end token, padded: one chunk), as diffusers' pipelines do, where ComfyUI "
                         "encodes a longer prompt as several 77-token chunks. For reproducing numbers computed "
                         "with diffusers (SLD, SAFREE, ESD and DUO evaluate that way)."),
            inputs=[io.Clip.Input("clip", tooltip="The CLIP to encode prompts with (SD1.x, SD2.x or SDXL).")],
            outputs=[io.Clip.Output(tooltip="A copy whose prompts are cut to one chunk; the input CLIP is unchanged.")],
        )

    @classmethod
    def execute(cls, clip) -> io.NodeOutput:
        return io.NodeOutput(truncating_clip(clip))
