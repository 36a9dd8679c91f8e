"""The runner's view of ComfyUI: the headless engine with this pack loaded, config names resolved to
ComfyUI's model folders, and graphs completed with the nodes' declared defaults.

One ``GraphRunner`` (one PromptExecutor) is reused for the whole run, so ComfyUI's output cache keeps
checkpoints loaded between items that share loader nodes (the runner orders items row by row for that reason).
"""

from __future__ import annotations

import os

from implicit_negatives.comfyui.headless import EngineError, GraphError, GraphRunner, import_comfyui, load_pack

from .graphs import comfy_file_name
from .protocol import NEGATION_SET_FOLDER

FOLDER_ALIASES = {"diffusion_models": ("diffusion_models", "unet"), "text_encoders": ("text_encoders", "clip")}


class ComfyEngine:
    def __init__(self, comfyui_path: str | None = None, output_dir: str | None = None):
        try:
            self.nodes = import_comfyui(comfyui_path)
        except EngineError as error:
            raise GraphError(f"{error}; pass --comfyui PATH or set COMFYUI_PATH") from None
        import folder_paths
        self.folder_paths = folder_paths
        if output_dir:
            os.makedirs(output_dir, exist_ok=True)
            folder_paths.set_output_directory(output_dir)
            folder_paths.set_temp_directory(os.path.join(output_dir, "temp"))
        load_pack(self.nodes)
        self.graphs = GraphRunner()

    def output_directory(self) -> str:
        return self.folder_paths.get_output_directory()

    def has_node(self, node_id: str) -> bool:
        return node_id in self.nodes.NODE_CLASS_MAPPINGS

    def folders(self, folder: str) -> list[str]:
        """The directories ComfyUI searches for ``folder`` files (``checkpoints``, ``loras`` ...)."""
        return [path for name in FOLDER_ALIASES.get(folder, (folder,))
                if name in self.folder_paths.folder_names_and_paths
                for path in self.folder_paths.get_folder_paths(name)]

    def locate(self, folder: str, value: str) -> str | None:
        """The file a config entry names (an absolute path, or a name in ComfyUI's ``folder``), None if absent.
        A negation set (a folder of images or a file) is found where LoadNegationSet looks for it."""
        if folder == NEGATION_SET_FOLDER:
            # Imported here: the glue imports ComfyUI, which import_comfyui has located by now.
            from implicit_negatives.comfyui.negation_sets import find_negation_source, negation_roots
            return find_negation_source(value, negation_roots())
        if os.path.isabs(value):
            return value if os.path.isfile(value) else None
        for name in FOLDER_ALIASES.get(folder, (folder,)):
            if name in self.folder_paths.folder_names_and_paths:
                path = self.folder_paths.get_full_path(name, value)
                if path:
                    return path
        return None

    def checkpoint_family(self, path: str) -> str | None:
        """ComfyUI's model config ("SD15", "SD20", "SDXL", ...) for a checkpoint file, from its tensor shapes."""
        from implicit_negatives.comfyui.model_identity import checkpoint_model_config
        return checkpoint_model_config(path)

    def resolve(self, folder: str, value: str) -> str:
        """Name ComfyUI lists for a config entry; an absolute path's folder is registered first, ahead of
        ComfyUI's own folders (the file the config names wins over another file of the same name)."""
        if not os.path.isabs(value):
            return value
        if not (os.path.isfile(value) or (folder == NEGATION_SET_FOLDER and os.path.isdir(value))):
            raise GraphError(f"{folder} file not found: {value}")
        for name in FOLDER_ALIASES.get(folder, (folder,)):
            if name in self.folder_paths.folder_names_and_paths:
                self.folder_paths.add_model_folder_path(name, os.path.dirname(value), is_default=True)
                return comfy_file_name(value)
        raise GraphError(f"this ComfyUI has no '{folder}' model folder")

    def declared_defaults(self, graph: dict) -> dict[str, dict]:
        """{node id: {input: value}} for every input a graph leaves out that its node declares a value for: each
        required one (its default, else the first combo option) and each optional one with a default, as
        ComfyUI's frontend sends them. Part of every item's identity: a changed default makes other pixels."""
        filled = {}
        for node_id, node in graph.items():
            cls = self.nodes.NODE_CLASS_MAPPINGS.get(node["class_type"])
            if cls is None:
                continue
            declared, values = cls.INPUT_TYPES(), {}
            for section in ("required", "optional"):
                for name, spec in declared.get(section, {}).items():
                    if name in node["inputs"]:
                        continue
                    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                    if "default" in options:
                        values[name] = options["default"]
                    elif section == "required" and isinstance(spec[0], (list, tuple)) and spec[0]:
                        values[name] = spec[0][0]
            if values:
                filled[node_id] = values
        return filled

    def complete_inputs(self, graph: dict) -> dict:
        """Fill in ``declared_defaults(graph)``, so configs name only what they change. Returns the same graph."""
        for node_id, values in self.declared_defaults(graph).items():
            graph[node_id]["inputs"].update(values)
        return graph

    def validate(self, graph: dict) -> list[str]:
        """ComfyUI's objections to a graph as readable lines (none: it would run). ComfyUI 0.3.64 does not
        check the values of V3 nodes' combos, so those are checked here the way 0.8.0 does."""
        return self.graphs.validate(graph)[0] or self._combo_problems(graph)

    def _combo_problems(self, graph: dict) -> list[str]:
        problems = []
        for node_id, node in graph.items():
            declared = self.nodes.NODE_CLASS_MAPPINGS[node["class_type"]].INPUT_TYPES()
            for name, spec in {**declared.get("required", {}), **declared.get("optional", {})}.items():
                options = spec[0] if isinstance(spec[0], (list, tuple)) else (
                    spec[1].get("options") if spec[0] == "COMBO" and len(spec) > 1 else None)
                value = node["inputs"].get(name)
                if options is None or name not in node["inputs"] or isinstance(value, list):  # list: a link
                    continue
                if value not in options:
                    shown = str(list(options)) if len(options) <= 20 else f"(list of length {len(options)})"
                    problems.append(f"{node['class_type']} node '{node_id}': Value not in list: {name}: "
                                    f"'{value}' not in {shown}")
        return problems

    def run(self, graph: dict) -> dict:
        """Validate and execute one graph; return ComfyUI's ``history_result['outputs']``."""
        return self.graphs.run(graph)
