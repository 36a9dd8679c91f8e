"""Headless ComfyUI: import the engine, load this pack as a custom node, validate and execute API graphs.

One ``PromptExecutor`` is reused for the whole run, so ComfyUI's output cache keeps checkpoints loaded
between items that share loader nodes (the runner orders items row by row for that reason).
"""

from __future__ import annotations

import asyncio
import inspect
import os
import sys
import uuid

from . import REPO_ROOT
from .graphs import comfy_file_name

FOLDER_ALIASES = {"diffusion_models": ("diffusion_models", "unet"), "text_encoders": ("text_encoders", "clip")}


class GraphError(RuntimeError):
    """ComfyUI rejected or failed a graph; the message carries ComfyUI's own report."""


class _MessageSink:
    """What PromptExecutor talks to instead of the websocket server."""
    client_id = None
    last_node_id = None
    last_prompt_id = None

    def __init__(self):
        self.messages = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass


def import_comfyui(path: str | None):
    """Import ComfyUI from ``path`` (or ``$COMFYUI_PATH``, or an already-importable one); return ``nodes``."""
    if "comfy.model_management" not in sys.modules:
        path = path or os.environ.get("COMFYUI_PATH")
        if path:
            if not os.path.isfile(os.path.join(path, "comfy", "sd.py")):
                raise GraphError(f"{path} is not a ComfyUI source tree (no comfy/sd.py); pass --comfyui PATH")
            if path not in sys.path:
                sys.path.insert(0, path)
        try:
            import torch
            from comfy.cli_args import args
        except ImportError as error:
            raise GraphError(f"cannot import ComfyUI ({error}); pass --comfyui PATH or set COMFYUI_PATH") from None
        if not torch.cuda.is_available():
            args.cpu = True  # before comfy.model_management, which asserts on CUDA otherwise
        import comfy.model_management  # noqa: F401
    import nodes
    return nodes


class ComfyEngine:
    def __init__(self, comfyui_path: str | None = None, output_dir: str | None = None):
        self.nodes = import_comfyui(comfyui_path)
        import folder_paths
        self.folder_paths = folder_paths
        if output_dir:
            os.makedirs(output_dir, exist_ok=True)
            folder_paths.set_output_directory(output_dir)
            folder_paths.set_temp_directory(os.path.join(output_dir, "temp"))
        if "LoadImplicitNegative" not in self.nodes.NODE_CLASS_MAPPINGS:
            if not asyncio.run(self.nodes.load_custom_node(REPO_ROOT)):
                raise GraphError(f"ComfyUI failed to load the pack from {REPO_ROOT} (see the log above)")
        import execution
        self.execution = execution
        self.sink = _MessageSink()
        if "cache_args" in inspect.signature(execution.PromptExecutor).parameters:  # 0.8.0
            self.executor = execution.PromptExecutor(self.sink, cache_type=False, cache_args={"lru": 0, "ram": 0})
        else:  # 0.3.64
            self.executor = execution.PromptExecutor(self.sink, cache_type=False)

    def output_directory(self) -> str:
        return self.folder_paths.get_output_directory()

    def has_node(self, node_id: str) -> bool:
        return node_id in self.nodes.NODE_CLASS_MAPPINGS

    def resolve(self, folder: str, value: str) -> str:
        """Name ComfyUI lists for a config entry; an absolute path's folder is registered first."""
        if not os.path.isabs(value):
            return value
        if not os.path.isfile(value):
            raise GraphError(f"{folder} file not found: {value}")
        for name in FOLDER_ALIASES.get(folder, (folder,)):
            if name in self.folder_paths.folder_names_and_paths:
                self.folder_paths.add_model_folder_path(name, os.path.dirname(value))
                return comfy_file_name(value)
        raise GraphError(f"this ComfyUI has no '{folder}' model folder")

    def complete_inputs(self, graph: dict) -> dict:
        """Fill every required input a graph leaves out with the node's declared default (first combo option
        when none is declared), so configs name only what they change. Returns the same graph."""
        for node in graph.values():
            cls = self.nodes.NODE_CLASS_MAPPINGS.get(node["class_type"])
            if cls is None:
                continue
            for name, spec in cls.INPUT_TYPES().get("required", {}).items():
                if name in node["inputs"]:
                    continue
                options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                if "default" in options:
                    node["inputs"][name] = options["default"]
                elif isinstance(spec[0], (list, tuple)) and spec[0]:
                    node["inputs"][name] = spec[0][0]
        return graph

    def run(self, graph: dict) -> dict:
        """Validate and execute one graph; return ComfyUI's ``history_result['outputs']``."""
        prompt_id = str(uuid.uuid4())
        valid = asyncio.run(self.execution.validate_prompt(prompt_id, graph, None))
        if not valid[0]:
            raise GraphError(f"ComfyUI rejected the graph: {valid[1]} {valid[3]}")
        self.sink.messages.clear()
        self.executor.execute(graph, prompt_id, {}, valid[2])
        errors = [data for event, data in self.sink.messages if event == "execution_error"]
        if not self.executor.success or errors:
            raise GraphError(f"graph failed: {errors}")
        return self.executor.history_result["outputs"]
