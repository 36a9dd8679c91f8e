"""Headless ComfyUI: locate the engine, import it with one CPU rule, load this pack, run API graphs.

The one place that knows how to bring ComfyUI up outside its server: the trainer CLI, the evaluation
runner, the tests, the benchmarks and the tools all use it. Nothing here imports ComfyUI at import time,
so it can be imported before ComfyUI is on ``sys.path``.

ComfyUI is located in this order:
  1. ``$COMFYUI_PATH`` (a ComfyUI source tree);
  2. the ComfyUI tree this pack is installed in (``ComfyUI/custom_nodes/<pack>/``);
  3. for the tests, benchmarks and tools only (``development_copy=True``): a writable copy of
     ``<pack>/../shared/comfyui/<version>`` in the cache (the development rig; ComfyUI writes next to
     itself and ``shared/`` may be read-only);
  4. otherwise no engine, with the reason (how to set ``COMFYUI_PATH``).
"""

from __future__ import annotations

import asyncio
import inspect
import os
import shutil
import sys
import uuid

PACK_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CACHE_DIR = os.environ.get(
    "IMPLICIT_NEGATIVES_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "implicit-negatives"))
DEFAULT_COMFYUI_VERSION = os.environ.get("IMPLICIT_NEGATIVES_COMFYUI_VERSION", "0.8.0")
CLONE_HINT = ("set COMFYUI_PATH to a ComfyUI checkout (the folder holding comfy/ and main.py), e.g. "
              "git clone --depth 1 --branch v0.8.0 https://github.com/comfyanonymous/ComfyUI")


class EngineError(RuntimeError):
    """ComfyUI could not be found, imported, or failed to load the pack or run a graph."""


class GraphError(EngineError):
    """ComfyUI rejected or failed a graph; the message carries ComfyUI's own report."""


def is_comfyui_tree(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "comfy", "sd.py"))


def locate_comfyui(development_copy: bool = False, version: str = DEFAULT_COMFYUI_VERSION) -> tuple[str | None, str]:
    """Return (path, how it was found) or (None, why not)."""
    env = os.environ.get("COMFYUI_PATH")
    if env:
        if is_comfyui_tree(env):
            return os.path.abspath(env), "COMFYUI_PATH"
        return None, f"COMFYUI_PATH={env} is not a ComfyUI source tree (no comfy/sd.py in it)"
    parent = os.path.dirname(PACK_ROOT)
    if os.path.basename(parent) == "custom_nodes" and is_comfyui_tree(os.path.dirname(parent)):
        return os.path.dirname(parent), "the ComfyUI this pack is installed in"
    shared = os.path.join(os.path.dirname(PACK_ROOT), "shared", "comfyui", version)
    if development_copy and is_comfyui_tree(shared):
        target = os.path.join(CACHE_DIR, f"comfyui-{version}")
        if not is_comfyui_tree(target):
            partial = f"{target}.{os.getpid()}.partial"
            shutil.copytree(shared, partial, dirs_exist_ok=True)
            os.replace(partial, target)
        return target, f"copy of {shared}"
    return None, f"no ComfyUI found: {CLONE_HINT}"


def import_comfyui(path: str | None = None, cpu: bool = False, development_copy: bool = False):
    """Import ComfyUI (from ``path``, else located) and return its ``nodes`` module, built-ins registered.

    One CPU rule for every entry point: run on the CPU when asked to or when CUDA is not usable.
    ``args.cpu`` must be set before the first import of ``comfy.model_management``, which asserts on
    CUDA otherwise; when ComfyUI is already imported (inside the server) nothing is changed.
    """
    if "comfy.model_management" not in sys.modules:
        if path is None and not _comfy_importable():
            path, how = locate_comfyui(development_copy)
            if path is None:
                raise EngineError(f"cannot find ComfyUI: {how}")
        if path is not None:
            if not is_comfyui_tree(path):
                raise EngineError(f"{path} is not a ComfyUI source tree (no comfy/sd.py); {CLONE_HINT}")
            if path not in sys.path:
                sys.path.insert(0, path)
        import torch
        from comfy.cli_args import args
        if cpu or not torch.cuda.is_available():
            args.cpu = True
        import comfy.model_management  # noqa: F401
    import nodes
    return nodes


def _comfy_importable() -> bool:
    import importlib.util
    return importlib.util.find_spec("comfy") is not None and importlib.util.find_spec("folder_paths") is not None


def load_pack(nodes=None):
    """Load this pack through ComfyUI's own custom-node loader (once); return the pack's root package."""
    nodes = nodes or import_comfyui(development_copy=True)
    if "LoadImplicitNegative" not in nodes.NODE_CLASS_MAPPINGS:
        if not asyncio.run(nodes.load_custom_node(PACK_ROOT)):
            raise EngineError(f"ComfyUI failed to load the pack from {PACK_ROOT} (see the log above)")
    # The package ComfyUI registered is the one whose nodes/ it imported (pytest may hold another alias of the
    # same __init__.py, without the nodes).
    root_init = os.path.join(PACK_ROOT, "__init__.py")
    for name, module in list(sys.modules.items()):
        if getattr(module, "__file__", None) == root_init and f"{name}.nodes.extension" in sys.modules:
            return module
    raise EngineError("the pack is registered but its root package is not in sys.modules")


class MessageSink:
    """What ComfyUI's PromptExecutor talks to instead of the websocket server: it records the messages."""

    client_id = None
    last_node_id = None
    last_prompt_id = None

    def __init__(self):
        self.messages = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass


class GraphRunner:
    """Validate and execute API-format graphs in one reused PromptExecutor (0.3.64 and 0.8.0).

    Reusing the executor lets ComfyUI's output cache keep checkpoints loaded between graphs that share
    loader nodes.
    """

    def __init__(self):
        import execution
        self.execution = execution
        self.sink = MessageSink()
        if "cache_args" in inspect.signature(execution.PromptExecutor).parameters:  # 0.8.0
            self.executor = execution.PromptExecutor(self.sink, cache_type=False, cache_args={"lru": 0, "ram": 0})
        else:  # 0.3.64
            self.executor = execution.PromptExecutor(self.sink, cache_type=False)

    def validate(self, graph: dict) -> tuple[list[str], list[str]]:
        """ComfyUI's own validation of a graph, nothing executed: (problems as readable lines, e.g.
        ``KSampler node 'sample': Value not in list: sampler_name: 'eulr' not in (...)``, output node ids)."""
        ok, error, outputs, node_errors = asyncio.run(self.execution.validate_prompt(str(uuid.uuid4()), graph, None))
        problems = [f"{failed['class_type']} node '{node_id}': {reason['message']}: {reason['details']}"
                    for node_id, failed in node_errors.items() for reason in failed["errors"]]
        if not ok and not problems:
            problems = [f"{error['message']}: {error['details']}"]
        return problems, outputs

    def run(self, graph: dict, outputs: list[str] | None = None) -> dict:
        """Run one graph; return ComfyUI's ``history_result['outputs']``. Raises GraphError with ComfyUI's
        report when the graph is invalid or a node fails."""
        problems, valid_outputs = self.validate(graph)
        if problems:
            raise GraphError("ComfyUI rejected the graph: " + "; ".join(problems))
        self.executor.execute(graph, str(uuid.uuid4()), {}, outputs if outputs is not None else valid_outputs)
        # ComfyUI sends messages to the server only for a client; it records every one in status_messages.
        errors = [data for event, data in self.executor.status_messages if event == "execution_error"]
        if not self.executor.success or errors:
            raise GraphError("graph failed: " + ("; ".join(
                f"{e.get('node_type')} node '{e.get('node_id')}': {e.get('exception_type')}: "
                f"{e.get('exception_message')}" for e in errors) or "ComfyUI sent no error message"))
        return self.executor.history_result["outputs"]
