"""Implicit Negatives for ComfyUI: learned negative embeddings that work on concept-erased models.

ComfyUI imports this file from ``custom_nodes/`` under the folder's name. It registers the core and
glue package ``implicit_negatives`` under that one name (``nodes/``, ``trainer/`` and ``evaluation/``
import it by it, so no module of the pack ever exists twice in a process), registers the pack's
``embeddings/`` folder and the ``negation_sets`` model folder, and hands the node classes to ComfyUI
through the V3 ``comfy_entrypoint``; the nodes (and everything heavy) are imported lazily from there.
"""

import importlib.util
import os
import sys

WEB_DIRECTORY = "./web"
PACK_DIR = os.path.dirname(os.path.abspath(__file__))
CORE_PACKAGE = "implicit_negatives"


def _register_core_package():
    """Make ``import implicit_negatives`` resolve to this pack's copy, exactly once per process."""
    init = os.path.join(PACK_DIR, CORE_PACKAGE, "__init__.py")
    loaded = sys.modules.get(CORE_PACKAGE)
    if loaded is not None:
        if os.path.realpath(getattr(loaded, "__file__", "") or "") != os.path.realpath(init):
            raise ImportError(f"another copy of '{CORE_PACKAGE}' is already loaded from {loaded.__file__}; "
                              f"remove the duplicate Implicit Negatives install (this one is {PACK_DIR})")
        return
    spec = importlib.util.spec_from_file_location(CORE_PACKAGE, init,
                                                  submodule_search_locations=[os.path.dirname(init)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[CORE_PACKAGE] = module
    spec.loader.exec_module(module)


def _register_folders():
    """The pack's ``embeddings/`` folder, and the ``negation_sets`` folder type (models/negation_sets: image
    folders and exported negation-set files that LoadNegationSet finds by name)."""
    try:
        import folder_paths
    except ImportError:  # imported outside ComfyUI (e.g. by a tool walking the tree)
        return
    folder_paths.add_model_folder_path("embeddings", os.path.join(PACK_DIR, "embeddings"), is_default=False)
    if "negation_sets" not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path("negation_sets", os.path.join(folder_paths.models_dir, "negation_sets"))


_register_core_package()
_register_folders()


async def comfy_entrypoint():
    from .nodes.extension import ImplicitNegativesExtension
    return ImplicitNegativesExtension()
