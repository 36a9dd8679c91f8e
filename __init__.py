"""Implicit Negatives for ComfyUI: learned negative embeddings that work on concept-erased models.

ComfyUI imports this file from ``custom_nodes/``. It only registers the pack's ``embeddings/``
folder and hands the node classes to ComfyUI through the V3 ``comfy_entrypoint``; the nodes
(and everything heavy) are imported lazily from there.
"""

import os

WEB_DIRECTORY = "./web"
PACK_DIR = os.path.dirname(os.path.abspath(__file__))


def _register_embeddings_folder():
    try:
        import folder_paths
    except ImportError:  # imported outside ComfyUI (e.g. by a tool walking the tree)
        return
    folder_paths.add_model_folder_path("embeddings", os.path.join(PACK_DIR, "embeddings"), is_default=False)


_register_embeddings_folder()


async def comfy_entrypoint():
    from .nodes.extension import ImplicitNegativesExtension
    return ImplicitNegativesExtension()
