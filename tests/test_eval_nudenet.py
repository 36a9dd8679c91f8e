"""NudeNet 3.x scoring on real inputs: the channel order the detector sees, blank images, a real face.

The reference for "correct colours" is NudeNet's own file path: ``detect(path)`` reads with ``cv2.imread``
(BGR). An RGB array we convert must reach the ONNX model as exactly the same tensor.
"""

import glob
import os

import numpy as np
import pytest

from implicit_negatives.metrics import label_set, summarize_detections

nudenet = pytest.importorskip("nudenet", reason="optional dependency: pip install nudenet (requirements-dev.txt)")


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


def test_converted_array_reaches_the_model_exactly_like_the_file(colourful, tmp_path):
    path = save_png(colourful, tmp_path / "c.png")
    from_file = _read_image(path)[0]
    ours = _read_image(scorer.rgb_to_detector_input(colourful))[0]
    naive = _read_image(np.ascontiguousarray(colourful))[0]  # the trap: RGB straight in
    assert np.array_equal(ours, from_file)
    assert not np.allclose(naive, from_file)
    assert np.array_equal(naive[:, [2, 1, 0]], from_file)  # exactly a red/blue swap


def test_bgr_conversion_of_float_and_uint8_images(colourful):
    pure_red = np.zeros((4, 4, 3), np.float32)
    pure_red[..., 0] = 1.0
    bgr = scorer.rgb_to_detector_input(pure_red)
    assert bgr.dtype == np.uint8 and bgr.flags["C_CONTIGUOUS"]
    assert (bgr[..., 2] == 255).all() and (bgr[..., :2] == 0).all()
    as_float = colourful.astype(np.float32) / 255.0
    assert np.array_equal(scorer.rgb_to_detector_input(as_float), colourful[..., ::-1])
    import torch
    assert np.array_equal(scorer.rgb_to_detector_input(torch.from_numpy(as_float)), colourful[..., ::-1])
    assert np.array_equal(scorer.rgb_to_detector_input(torch.from_numpy(colourful)), colourful[..., ::-1])
    half = torch.from_numpy(as_float).to(torch.bfloat16)  # fp16/bf16 pipelines: widened, then rounded
    expected = np.clip(np.rint(half.float().numpy().astype(np.float64) * 255), 0, 255).astype(np.uint8)[..., ::-1]
    assert np.array_equal(scorer.rgb_to_detector_input(half), expected)
    with pytest.raises(ValueError, match="one \\(H, W, 3\\) RGB image"):
        scorer.rgb_to_detector_input(np.zeros((2, 4, 4, 3)))


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


def test_real_face_is_detected_with_file_order_and_not_flagged_as_nudity(tmp_path):
    source = find_face_image()
    if source is None:
        pytest.skip(f"{FACE_IMAGE} (comfyui-workflow-templates media) not installed")
    from PIL import Image
    rgb = np.asarray(Image.open(source).convert("RGB"))
    ours = scorer.detect_rgb(rgb)
    reference = scorer.nudenet_detector().detect(save_png(rgb, tmp_path / "face.png"))
    assert ours == [{"class": d["class"], "score": float(d["score"]), "box": d["box"]} for d in reference]
    faces = [d for d in ours if d["class"] == "FACE_FEMALE"]
    assert faces and max(d["score"] for d in faces) > 0.5
    assert summarize_detections([ours], label_set("nudenet5@0.6"))["safe"] == 1
    assert summarize_detections([ours], "FACE_FEMALE@0.5")["flagged"] == 1  # a custom set sees it
    naive = scorer.nudenet_detector().detect(np.ascontiguousarray(rgb))  # RGB passed raw: other scores
    assert [round(d["score"], 4) for d in naive] != [round(d["score"], 4) for d in ours]


def test_description_names_version_and_model():
    description = scorer.detector_description()
    assert description["nudenet_version"].startswith("3.") and description["inference_resolution"] == 320


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
    assert "rece9@0.6" in printed[1]
    import json
    written = json.loads((tmp_path / "s.json").read_text())
    assert [i["image"] for i in written["images"]] == ["a.png", "b.png"] and written["summaries"][0]["n"] == 2
