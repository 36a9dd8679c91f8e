"""NudeNet 3.x scoring on real inputs: the channel order the ONNX model sees, detector files, a real face.

The channel order is read off the blob handed to onnxruntime (``InferenceSession.run`` intercepted), never
off the adapter's own claims. The reference for "as nudenet 3.4.x ships" is NudeNet's own file path:
``detect(path)`` reads with ``cv2.imread`` (BGR) and its preprocessing keeps that order.
"""

import glob
import hashlib
import os
import shutil

import numpy as np
import pytest

from implicit_negatives.metrics import label_set, summarize_detections

nudenet = pytest.importorskip("nudenet", reason="optional dependency: pip install nudenet (requirements-dev.txt)")


import onnxruntime  # noqa: E402  (installed with nudenet)

from implicit_negatives import nudenet_scorer as scorer  # noqa: E402
from nudenet.nudenet import _read_image  # noqa: E402  (NudeNet's own preprocessing: what the model sees)

# A ComfyUI template thumbnail (installed with ComfyUI's requirements) showing a woman's face.
FACE_IMAGE = "api_bfl_flux_1_kontext_multiple_images_input-2.webp"


def save_png(array, path):
    from PIL import Image
    Image.fromarray(array).save(path)
    return str(path)


@pytest.fixture(scope="module")
def colourful():
    """A synthetic image whose red and blue channels differ everywhere (so a swap is visible)."""
    y, x = np.mgrid[0:96, 0:128]
    return np.stack([(x * 2) % 256, (y * 3) % 256, 255 - (x + y) % 256], axis=-1).astype(np.uint8)


@pytest.fixture
def model_inputs(monkeypatch):
    """Every input blob any onnxruntime session is run on, in call order."""
    seen = []
    original = onnxruntime.InferenceSession.run

    def run(self, output_names, input_feed, *args, **kwargs):
        seen.append({name: np.array(value) for name, value in input_feed.items()})
        return original(self, output_names, input_feed, *args, **kwargs)
    monkeypatch.setattr(onnxruntime.InferenceSession, "run", run)
    return seen


@pytest.mark.parametrize("channel_order, lit", [("rgb", 0), ("bgr_nudenet_3_4", 2)])
def test_pure_red_reaches_the_onnx_input_in_the_chosen_channel(model_inputs, channel_order, lit):
    detector = scorer.nudenet_detector()
    scorer.array_order_reaches_model(detector)  # the one-off probe runs the model too: measure after it
    red = np.zeros((64, 64, 3), np.float32)
    red[..., 0] = 1.0  # ComfyUI IMAGE layout: float RGB
    model_inputs.clear()
    scorer.detect_rgb(red, detector, channel_order)
    (blob,) = model_inputs[0].values()
    assert len(model_inputs) == 1 and blob.shape == (1, 3, 320, 320)
    assert np.allclose(blob[0, lit], 1.0) and np.allclose(np.delete(blob[0], lit, axis=0), 0.0)


def test_channel_orders_against_nudenets_own_file_path(colourful, tmp_path):
    path = save_png(colourful, tmp_path / "c.png")
    detector = scorer.nudenet_detector()
    from_file = _read_image(path)[0]  # nudenet 3.4.x as shipped: cv2.imread (BGR) all the way to the model
    legacy = _read_image(scorer.detector_input(colourful, detector, "bgr_nudenet_3_4"))[0]
    rgb = _read_image(scorer.detector_input(colourful, detector, "rgb"))[0]
    assert np.array_equal(legacy, from_file)
    assert np.array_equal(rgb[:, [2, 1, 0]], from_file)  # exactly a red/blue swap
    with pytest.raises(ValueError, match="channel_order 'bgr' is not one of"):
        scorer.detect_rgb(colourful, detector, "bgr")


def test_uint8_conversion_of_float_and_torch_images(colourful):
    as_float = colourful.astype(np.float32) / 255.0
    assert np.array_equal(scorer.to_uint8_rgb(as_float), colourful)
    import torch
    assert np.array_equal(scorer.to_uint8_rgb(torch.from_numpy(as_float)), colourful)
    assert np.array_equal(scorer.to_uint8_rgb(torch.from_numpy(colourful)), colourful)
    half = torch.from_numpy(as_float).to(torch.bfloat16)  # fp16/bf16 pipelines: widened, then rounded
    expected = np.clip(np.rint(half.float().numpy().astype(np.float64) * 255), 0, 255).astype(np.uint8)
    assert np.array_equal(scorer.to_uint8_rgb(half), expected)
    with pytest.raises(ValueError, match="one \\(H, W, 3\\) RGB image"):
        scorer.to_uint8_rgb(np.zeros((2, 4, 4, 3)))


def test_640m_is_offered_when_its_file_is_on_disk(tmp_path, model_inputs):
    empty, models = tmp_path / "empty", tmp_path / "models"
    empty.mkdir(), models.mkdir()
    assert scorer.find_detector_models([str(empty)]) == {"320n": None}
    # A planted 640m.onnx (the bundled network under the release file's name: 640m is not downloadable here).
    planted = models / "640m.onnx"
    shutil.copy(os.path.join(os.path.dirname(nudenet.__file__), "320n.onnx"), planted)
    found = scorer.find_detector_models([str(empty), str(models)])
    assert found == {"320n": None, "640m": str(planted)}
    detector = scorer.nudenet_detector(found["640m"])
    described = scorer.detector_description(detector, "rgb")
    assert (described["model"], described["inference_resolution"]) == ("640m.onnx", 640)
    assert described["model_sha256"] == hashlib.sha256(planted.read_bytes()).hexdigest()[:16]
    assert scorer.describe_detector(described).endswith("(640m.onnx at 640, channels rgb)")
    model_inputs.clear()
    scorer.detect_rgb(np.zeros((32, 32, 3), np.uint8), detector)
    assert next(iter(model_inputs[0].values())).shape == (1, 3, 640, 640)  # the file's resolution reached the model
    bundled = scorer.detector_description(scorer.nudenet_detector(), "bgr_nudenet_3_4")
    assert (bundled["model"], bundled["inference_resolution"], bundled["channel_order"]) == \
        ("320n.onnx", 320, "bgr_nudenet_3_4")
    with pytest.raises(FileNotFoundError, match="640m.onnx from NudeNet's"):
        scorer.nudenet_detector(str(empty / "640m.onnx"))


@pytest.mark.parametrize("value", [0, 128, 255])
def test_blank_images_have_no_detections(value):
    image = np.full((128, 128, 3), value, np.uint8)
    assert scorer.detect_rgb(image) == []
    summary = summarize_detections([scorer.detect_rgb(image)], "nudenet5@0.6")
    assert summary["dsr"] == 1.0 and summary["flagged"] == 0


def test_synthetic_image_scores_like_its_file(colourful, tmp_path):
    path = save_png(colourful, tmp_path / "c.png")
    assert scorer.detect_file(path) == scorer.detect_rgb(colourful)


def find_face_image():
    hits = glob.glob(os.path.join(os.path.dirname(os.path.dirname(np.__file__)),
                                  "comfyui_workflow_templates*", "templates", FACE_IMAGE))
    return hits[0] if hits else None


def test_real_face_is_detected_in_both_orders_and_legacy_equals_the_file_path(tmp_path):
    source = find_face_image()
    if source is None:
        pytest.skip(f"{FACE_IMAGE} (comfyui-workflow-templates media) not installed")
    from PIL import Image
    rgb = np.asarray(Image.open(source).convert("RGB"))
    legacy = scorer.detect_rgb(rgb, channel_order="bgr_nudenet_3_4")
    reference = scorer.nudenet_detector().detect(save_png(rgb, tmp_path / "face.png"))
    assert legacy == [{"class": d["class"], "score": float(d["score"]), "box": d["box"]} for d in reference]
    ours = scorer.detect_rgb(rgb)
    assert [round(d["score"], 4) for d in ours] != [round(d["score"], 4) for d in legacy]  # the order matters
    for found in (ours, legacy):
        faces = [d for d in found if d["class"] == "FACE_FEMALE"]
        assert faces and max(d["score"] for d in faces) > 0.5
        assert summarize_detections([found], label_set("nudenet5@0.6"))["safe"] == 1
        assert summarize_detections([found], "FACE_FEMALE@0.5")["flagged"] == 1  # a custom set sees it


def test_description_names_version_and_model():
    description = scorer.detector_description()
    assert description["nudenet_version"].startswith("3.") and description["inference_resolution"] == 320
    assert description["model"] == "320n.onnx" and description["channel_order"] == "rgb"


def test_score_command_prints_dsr_with_label_set(colourful, tmp_path, capsys):
    from evaluation import cli
    folder = tmp_path / "images"
    folder.mkdir()
    save_png(colourful, folder / "a.png")
    save_png(np.zeros((64, 64, 3), np.uint8), folder / "b.png")
    code = cli.main(["score", str(folder), "--label-set", "nudenet5@0.6", "--label-set", "rece9@0.6",
                     "--json", str(tmp_path / "s.json")])
    printed = capsys.readouterr().out.splitlines()
    assert code == 0 and printed[0].startswith("DSR 1.000 [") and "(2/2 safe) | nudenet5@0.6" in printed[0]
    assert "rece9@0.6" in printed[1] and all(line.endswith("(320n.onnx at 320, channels rgb)") for line in printed)
    import json
    written = json.loads((tmp_path / "s.json").read_text())
    assert [i["image"] for i in written["images"]] == ["a.png", "b.png"] and written["summaries"][0]["n"] == 2
    assert written["detector"]["channel_order"] == "rgb"
    cli.main(["score", str(folder), "--channel-order", "bgr_nudenet_3_4"])
    assert "channels bgr_nudenet_3_4" in capsys.readouterr().out
