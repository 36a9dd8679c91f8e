"""NudeNet 3.x detector adapter: RGB images in, raw detections out (label sets are applied later).

The optional ``nudenet`` wheel bundles its ONNX detector (``320n.onnx``), so nothing is downloaded. It is
AGPL-3.0 (method.md 7.1) and therefore never a hard dependency: ``pip install nudenet`` or the pack's
``eval`` extra.

BGR trap: for an ndarray, ``NudeDetector.detect`` runs ``cv2.cvtColor(img, COLOR_RGBA2BGR)``, which on a
3-channel image swaps R and B, exactly as for a file it reads with ``cv2.imread`` (BGR). An ndarray must
therefore be **BGR** to be scored like the same picture on disk; ComfyUI IMAGEs and PIL images are RGB.
``rgb_to_detector_input`` does that conversion (and float [0, 1] -> uint8) in one place.
"""

from __future__ import annotations

import numpy as np

INSTALL_HINT = ("NudeNet is not installed. It is an optional dependency (AGPL-3.0 model): install it into the "
                "Python that runs ComfyUI with `pip install nudenet` (or `pip install .[eval]` in this pack). "
                "The wheel bundles its ONNX detector; nothing else is downloaded.")

_DETECTORS: dict = {}


def require_nudenet():
    """The ``nudenet`` module, or ImportError with the install command."""
    try:
        import nudenet
    except ImportError as error:
        raise ImportError(INSTALL_HINT) from error
    return nudenet


def nudenet_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("nudenet")
    except PackageNotFoundError:
        return "not installed"


def to_uint8_rgb(image) -> np.ndarray:
    """(H, W, 3) uint8 RGB from uint8 or float [0, 1] RGB (numpy or torch, channels last)."""
    if hasattr(image, "detach"):  # torch: numpy has no bfloat16, so widen floating tensors first
        image = image.detach().cpu()
        array = (image.float() if image.is_floating_point() else image).numpy()
    else:
        array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise ValueError(f"expected one (H, W, 3) RGB image, got shape {tuple(array.shape)}")
    array = array[..., :3]
    if array.dtype != np.uint8:
        array = np.clip(np.rint(array.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    return array


def rgb_to_detector_input(image) -> np.ndarray:
    """RGB image (uint8 or float [0, 1], (H, W, 3)) -> contiguous uint8 BGR, as ``cv2.imread`` would give."""
    return np.ascontiguousarray(to_uint8_rgb(image)[..., ::-1])


def nudenet_detector(model_path: str | None = None, inference_resolution: int = 320):
    """A cached ``NudeDetector`` (bundled 320n model unless ``model_path``, e.g. a local 640m.onnx)."""
    key = (model_path, inference_resolution)
    if key not in _DETECTORS:
        nudenet = require_nudenet()
        _DETECTORS[key] = nudenet.NudeDetector(model_path=model_path, inference_resolution=inference_resolution)
    return _DETECTORS[key]


def detect_rgb(image, detector=None) -> list[dict]:
    """NudeNet detections of one RGB image: [{"class", "score", "box": [x, y, w, h]}], score >= 0.2 after NMS."""
    detector = detector or nudenet_detector()
    return [{"class": d["class"], "score": float(d["score"]), "box": [int(v) for v in d["box"]]}
            for d in detector.detect(rgb_to_detector_input(image))]


def detect_file(path: str, detector=None) -> list[dict]:
    """NudeNet detections of an image file, read with PIL as RGB (PNG, JPEG, WebP ...)."""
    from PIL import Image
    with Image.open(path) as handle:
        return detect_rgb(np.asarray(handle.convert("RGB")), detector)


def detector_description(detector=None) -> dict:
    """What to record next to every score: package version and model file."""
    detector = detector or nudenet_detector()
    session = detector.onnx_session
    model = getattr(session, "_model_path", None)
    return {"detector": "NudeNet", "nudenet_version": nudenet_version(),
            "model": str(model) if model else "bundled 320n.onnx",
            "inference_resolution": int(detector.input_width)}
