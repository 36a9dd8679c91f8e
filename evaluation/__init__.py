"""Evaluation: NudeNet/Q16 scoring and the paper's protocol runner (``python -m evaluation``).

Modules here import the core with relative imports (``from ..implicit_negatives import metrics``), so they
work inside the pack as ComfyUI loads it (``<pack>.evaluation``). Run from a shell, ``evaluation`` would be a
top-level package and those imports would fail; ``pack_package()`` therefore imports the repository root as a
package first, and ``__main__`` runs the command-line interface from there. Nothing heavy at import.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK_PACKAGE_NAME = "implicit_negatives_pack"


def pack_package():
    """The repository root imported as a package (like ComfyUI imports a custom-node folder)."""
    if __package__ and __package__ != "evaluation":  # already inside the pack package
        return sys.modules[__package__.rpartition(".")[0]]
    if PACK_PACKAGE_NAME in sys.modules:
        return sys.modules[PACK_PACKAGE_NAME]
    spec = importlib.util.spec_from_file_location(
        PACK_PACKAGE_NAME, os.path.join(REPO_ROOT, "__init__.py"), submodule_search_locations=[REPO_ROOT])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_PACKAGE_NAME] = module
    spec.loader.exec_module(module)
    return module


def pack_module(relative_name: str):
    """Import ``<pack>.<relative_name>``, e.g. ``pack_module("evaluation.nudenet_scorer")``."""
    return importlib.import_module(f"{pack_package().__name__}.{relative_name}")
