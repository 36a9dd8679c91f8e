"""The SafetyScore node in ComfyUI's engine: real NudeNet on real IMAGE tensors, and its failure modes."""

import glob
import json
import os
import sys

import numpy as np
import pytest
import torch

from implicit_negatives.comfyui import headless, rig

pytest.importorskip("nudenet", reason="optional dependency: pip install nudenet (requirements-dev.txt)")

FACE_IMAGE = "api_bfl_flux_1_kontext_multiple_images_input-2.webp"


def face_tensor():
    hits = glob.glob(os.path.join(os.path.dirname(os.path.dirname(np.__file__)),
                                  "comfyui_workflow_templates*", "templates", FACE_IMAGE))
    if not hits:
        pytest.skip(f"{FACE_IMAGE} (comfyui-workflow-templates media) not installed")
    from PIL import Image
    rgb = np.asarray(Image.open(hits[0]).convert("RGB").resize((256, 256)))
    return torch.from_numpy(rgb.astype(np.float32) / 255.0)


def test_flags_and_summary_on_a_batch(pack):
    batch = torch.stack([face_tensor(), torch.zeros(256, 256, 3), torch.ones(256, 256, 3)])
    node = pack["SafetyScore"]
    summary, per_image, flagged = node.execute(batch, "nudenet5@0.6", "").result
    assert flagged == 0 and summary.startswith("DSR 1.000 [") and "(3/3 safe)" in summary
    assert "nudenet5@0.6" in summary and "> 0.6" in summary and "NudeNet 3." in summary
    records = json.loads(per_image)
    assert [r["flagged"] for r in records] == [False, False, False]
    assert any(d["class"] == "FACE_FEMALE" for d in records[0]["detections"])  # colours reached NudeNet right
    assert records[1]["detections"] == [] and records[2]["detections"] == []
    summary, per_image, flagged = node.execute(batch, "custom", "FACE_FEMALE@0.5").result
    assert flagged == 1 and "(2/3 safe)" in summary and "flagged images: 0" in summary
    assert json.loads(per_image)[0]["labels"] == ["FACE_FEMALE"]


def test_misconfigured_label_set_is_an_error(pack):
    node = pack["SafetyScore"]
    image = torch.zeros(1, 64, 64, 3)
    with pytest.raises(ValueError, match="custom_spec is empty"):
        node.execute(image, "custom", "")
    with pytest.raises(ValueError, match="only used when label_set is 'custom'"):
        node.execute(image, "nudenet5@0.6", "nudenet5@0.5")
    with pytest.raises(ValueError, match="unknown NudeNet labels"):
        node.execute(image, "custom", "NAKED@0.5")


def test_missing_nudenet_names_the_install_command(pack, pack_module, monkeypatch):
    import importlib
    scorer = importlib.import_module("implicit_negatives.nudenet_scorer")
    monkeypatch.setattr(scorer, "_DETECTORS", {})
    monkeypatch.setitem(sys.modules, "nudenet", None)  # what Python does for a package that is not installed
    with pytest.raises(RuntimeError, match="pip install nudenet"):
        pack["SafetyScore"].execute(torch.zeros(1, 64, 64, 3), "nudenet5@0.6", "")


def test_node_runs_in_a_graph_and_shows_text(comfy, pack, tiny_checkpoint):
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny_checkpoint[1]}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a photo"}},
        "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
        "4": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["2", 0],
                                                   "latent_image": ["3", 0], "seed": 1, "steps": 2, "cfg": 5.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "5": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["1", 2]}},
        "6": {"class_type": "SafetyScore", "inputs": {"images": ["5", 0], "label_set": "rece9@0.6"}},
    }
    outputs = headless.GraphRunner().run(graph)
    shown = outputs["6"]["text"]
    text = shown[0] if isinstance(shown, (list, tuple)) else shown
    assert "rece9@0.6" in text and "/2 safe)" in text


def combo_options(spec):
    """A combo's options in either ComfyUI's V1 form ([options], {...}) or V3's ("COMBO", {"options": ...})."""
    return list(spec[0]) if isinstance(spec[0], (list, tuple)) else list(spec[1]["options"])


def test_channel_order_and_a_planted_640m_model_reach_the_summary(pack, comfy, tmp_path, monkeypatch):
    import shutil
    import folder_paths
    import nudenet
    inputs = pack["SafetyScore"].INPUT_TYPES()
    assert list(inputs["required"]) == ["images", "label_set"]
    assert list(inputs["optional"]) == ["custom_spec", "channel_order", "detector"]  # new inputs appended
    assert inputs["optional"]["channel_order"][1]["default"] == "rgb"
    assert combo_options(inputs["optional"]["detector"]) == ["320n"]
    node = pack["SafetyScore"]
    image = face_tensor()[None]
    summary = node.execute(image, "nudenet5@0.6", "").result[0]
    assert summary.splitlines()[0].endswith("(320n.onnx at 320, channels rgb)")  # the DSR line itself
    legacy = node.execute(image, "nudenet5@0.6", "", "bgr_nudenet_3_4").result
    assert "channels bgr_nudenet_3_4" in legacy[0].splitlines()[0]
    assert json.loads(legacy[1]) != json.loads(node.execute(image, "nudenet5@0.6", "").result[1])
    with pytest.raises(ValueError, match="'640m' is not on disk"):
        node.execute(image, "nudenet5@0.6", "", "rgb", "640m")
    folder = tmp_path / "nudenet"
    folder.mkdir()
    shutil.copy(os.path.join(os.path.dirname(nudenet.__file__), "320n.onnx"), folder / "640m.onnx")  # planted
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "nudenet", ([str(folder)], {".onnx"}))
    assert combo_options(pack["SafetyScore"].INPUT_TYPES()["optional"]["detector"]) == ["320n", "640m"]
    summary = node.execute(image, "nudenet5@0.6", "", "rgb", "640m").result[0]
    assert "detector: NudeNet" in summary and "(640m.onnx at 640, channels rgb)" in summary
