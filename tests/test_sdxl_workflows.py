"""The shipped SDXL workflows run on the tiny SDXL checkpoint in ComfyUI's executor, through the stock
CheckpointLoaderSimple (full-size CLIP-L + CLIP-G: about 5 GB of RAM and a few seconds per text encode on a CPU, so
the two API twins run as one graph sharing one loader). The frontend tests load and run them on the tiny SD1 world."""

import json
import os

import pytest
import torch

from implicit_negatives.embedding_io import save_embedding

from implicit_negatives.comfyui import headless, rig

pytestmark = pytest.mark.usefixtures("one_thread")


def api_twin(name):
    with open(os.path.join(headless.PACK_ROOT, "workflows", "api", f"{name}.json")) as handle:
        return json.load(handle)


def test_sdxl_txt2img_and_sld_workflows_run_on_a_tiny_sdxl_checkpoint(comfy, pack, embeddings_dir):
    import folder_paths
    path = rig.tiny_family_checkpoint_path("sdxl")
    folder_paths.add_model_folder_path("checkpoints", os.path.dirname(path))
    txt2img, sld = api_twin("sdxl_implicit_negative_txt2img"), api_twin("sdxl_sld_implicit_negative")
    embedding = txt2img["2"]["inputs"]["embedding"]
    assert sld["2"]["inputs"]["embedding"] == embedding
    generator = torch.Generator().manual_seed(5)
    save_embedding(str(embeddings_dir / embedding), {"clip_l": torch.randn(1, 768, generator=generator) * 0.3,
                                                     "clip_g": torch.randn(1, 1280, generator=generator) * 0.3})
    # One graph: the SLD twin's nodes as "s<id>", wired to the txt2img twin's checkpoint loader and embedding.
    graph = dict(txt2img)
    for node_id, node in sld.items():
        if node_id in ("1", "2"):
            continue
        inputs = {name: (["s" + value[0] if value[0] not in ("1", "2") else value[0], value[1]]
                         if isinstance(value, list) else value) for name, value in node["inputs"].items()}
        graph["s" + node_id] = {**node, "inputs": inputs}
    graph["1"]["inputs"]["ckpt_name"] = os.path.basename(path)
    for node in graph.values():
        if node["class_type"] == "EmptyLatentImage":
            assert (node["inputs"]["width"], node["inputs"]["height"]) == (1024, 1024)  # SDXL's native size
            node["inputs"].update(width=64, height=64)
        if node["class_type"] == "KSampler":
            node["inputs"]["steps"] = 2
    outputs = headless.GraphRunner().run(graph)
    saves = [node_id for node_id, node in graph.items() if node["class_type"] == "SaveImage"]
    assert len(saves) == 2 and all(len(outputs[node_id]["images"]) == 1 for node_id in saves)
