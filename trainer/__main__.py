"""Entry point of ``python -m trainer``: find ComfyUI, import this pack as a package, run the CLI.

ComfyUI is located through ``$COMFYUI_PATH``, or as the ComfyUI tree this pack sits in
(``ComfyUI/custom_nodes/<pack>/``). The pack's folder name is unknown and the top-level name
``nodes`` belongs to ComfyUI, so the repository root is imported by path under a private package
name; every trainer module then uses relative imports, exactly as when ComfyUI loads the pack.
"""

import importlib
import importlib.util
import os
import sys

PACK_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE_NAME = "implicit_negatives_pack"


def find_comfyui() -> str:
    env = os.environ.get("COMFYUI_PATH")
    if env:
        if not os.path.isfile(os.path.join(env, "comfy", "sd.py")):
            sys.exit(f"error: COMFYUI_PATH={env} is not a ComfyUI source tree (no comfy/sd.py in it)")
        return os.path.abspath(env)
    parent = os.path.dirname(PACK_ROOT)
    if os.path.basename(parent) == "custom_nodes" and os.path.isfile(os.path.join(parent, "..", "comfy", "sd.py")):
        return os.path.abspath(os.path.join(parent, ".."))
    sys.exit("error: cannot find ComfyUI. Set COMFYUI_PATH to your ComfyUI folder (the one containing "
             "comfy/ and main.py), e.g. COMFYUI_PATH=~/ComfyUI python -m trainer ..., or install this pack "
             "in ComfyUI/custom_nodes/.")


def import_pack():
    """Import ComfyUI for this process (CPU unless CUDA is usable) and the pack root as a package."""
    comfy_path = find_comfyui()
    if comfy_path not in sys.path:
        sys.path.insert(0, comfy_path)
    import torch
    from comfy.cli_args import args
    if "--cpu" in sys.argv[1:] or not torch.cuda.is_available():
        args.cpu = True  # must precede the first import of comfy.model_management
    import comfy.model_management  # noqa: F401
    if PACKAGE_NAME not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACKAGE_NAME, os.path.join(PACK_ROOT, "__init__.py"),
                                                      submodule_search_locations=[PACK_ROOT])
        package = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE_NAME] = package
        spec.loader.exec_module(package)
    return importlib.import_module(PACKAGE_NAME + ".trainer.cli")


if __name__ == "__main__":
    sys.exit(import_pack().main())
