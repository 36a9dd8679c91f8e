"""The layering, enforced: which part of the pack may import which, and one import name per module.

    core   implicit_negatives/ (not comfyui/) pure torch: imports nothing of ComfyUI or of the adapters
    glue   implicit_negatives/comfyui/        ComfyUI internals: never imports nodes/, trainer/, evaluation/
    nodes/, trainer/, evaluation/             adapters over core + glue; they never import each other
    bench/, tools/                            use the glue; never borrow tests/
Only the root ``__init__.py`` (and the tests) import the pack's ``nodes/`` package.
"""

from __future__ import annotations

import ast
import contextlib
import io
import os
import sys

import pytest

from implicit_negatives.comfyui import headless

ROOT = headless.PACK_ROOT
COMFYUI_MODULES = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "comfy_config", "folder_paths", "nodes",
                   "execution", "server", "node_helpers", "latent_preview", "comfyui_version", "app", "utils"}
ADAPTERS = {"trainer", "evaluation", "bench", "tools", "tests"}


def python_files(*folders: str) -> list[str]:
    out = []
    for folder in folders:
        for base, dirs, files in os.walk(os.path.join(ROOT, folder)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            out += [os.path.join(base, f) for f in files if f.endswith(".py")]
    return sorted(out)


def imports(path: str) -> list[tuple[str, int]]:
    """(absolute dotted target, line) of every import in ``path``; relative imports resolved against the
    file's place in the repository (the root package is called ``<pack>``)."""
    package = os.path.relpath(path, ROOT).split(os.sep)[:-1]
    if package[:1] == ["nodes"]:  # ComfyUI imports nodes/ as a subpackage of the pack's folder
        package = ["<pack>"] + package
    out = []
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                names = [f"{target}.{alias.name}" for alias in node.names] if not node.module else [target]
                out += [(name, node.lineno) for name in names]
            else:
                out.append((node.module, node.lineno))
    return out


def top(name: str) -> str:
    return name.split(".")[0]


def violations(folders: tuple[str, ...], forbidden) -> list[str]:
    found = []
    for path in python_files(*folders):
        for name, line in imports(path):
            why = forbidden(path, name)
            if why:
                found.append(f"{os.path.relpath(path, ROOT)}:{line} imports {name} ({why})")
    return found


def in_glue(path: str) -> bool:
    return os.path.relpath(path, ROOT).startswith(os.path.join("implicit_negatives", "comfyui") + os.sep)


def test_the_core_imports_nothing_of_comfyui_or_the_adapters():
    def forbidden(path, name):
        if in_glue(path):
            return None
        if top(name) in COMFYUI_MODULES:
            return "ComfyUI in the core"
        if top(name) in ADAPTERS or name.startswith(("<pack>", "implicit_negatives.comfyui")):
            return "the core must not depend on glue or adapters"
        return None
    assert violations(("implicit_negatives",), forbidden) == []


def test_the_glue_never_imports_nodes_trainer_or_evaluation():
    def forbidden(path, name):
        if not in_glue(path):
            return None
        if top(name) in ADAPTERS or name.startswith("<pack>"):
            return "glue must not depend on adapters"
        return None
    assert violations(("implicit_negatives",), forbidden) == []


@pytest.mark.parametrize("folder, others", [("nodes", {"trainer", "evaluation"}), ("trainer", {"evaluation"}),
                                            ("evaluation", {"trainer"}), ("bench", {"tests"}),
                                            ("tools", {"tests"})])
def test_adapters_do_not_import_each_other(folder, others):
    def forbidden(path, name):
        if top(name) in others:
            return f"{folder}/ must not import {top(name)}"
        if name.startswith("<pack>") and not name.startswith(f"<pack>.{folder}"):
            return "reach the core and glue as `implicit_negatives`, never through the pack's folder name"
        return None
    assert violations((folder,), forbidden) == []


def test_nothing_puts_tests_on_sys_path_outside_tests():
    offenders = [os.path.relpath(p, ROOT) for p in python_files("bench", "tools", "trainer", "evaluation", "nodes",
                                                                 "implicit_negatives")
                 if '"tests"' in open(p, encoding="utf-8").read() and "sys.path" in open(p, encoding="utf-8").read()]
    assert offenders == []


def test_every_module_of_the_pack_has_one_name_in_one_process(comfy, pack):
    """Load the pack as ComfyUI does (done by the `pack` fixture), run both CLI entries, then every file of the
    repository is in ``sys.modules`` at most once."""
    import evaluation.cli
    import trainer.__main__
    for entry in (trainer.__main__.main, evaluation.cli.main):
        argv = sys.argv
        sys.argv = ["entry", "--help"]
        try:
            with contextlib.redirect_stdout(io.StringIO()), pytest.raises(SystemExit):
                entry() if entry is trainer.__main__.main else entry(["--help"])
        finally:
            sys.argv = argv
    by_file: dict[str, list[str]] = {}
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if path and os.path.realpath(path).startswith(os.path.realpath(ROOT) + os.sep):
            by_file.setdefault(os.path.realpath(path), []).append(name)
    assert "implicit_negatives.comfyui.clip" in sys.modules and "trainer.cli" in sys.modules
    # The root __init__.py is only the loader's entry: ComfyUI runs it under the folder's path name, and pytest
    # (the rootdir holds an __init__.py) under a name of its own. It defines no class and its registration of
    # `implicit_negatives` is idempotent, so it is the one file allowed several names.
    by_file.pop(os.path.realpath(os.path.join(ROOT, "__init__.py")), None)
    duplicated = {os.path.relpath(path, ROOT): names for path, names in by_file.items() if len(names) > 1}
    assert duplicated == {}
