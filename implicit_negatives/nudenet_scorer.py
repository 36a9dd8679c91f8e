"""NudeNet 3.x detector adapter: RGB images in, raw detections out (label sets are applied later).

The optional ``nudenet`` wheel bundles its ONNX detector (``320n.onnx``), so nothing is downloaded. It is
AGPL-3.0 (method.md 7.1) and therefore never a hard dependency: ``pip install nudenet`` or the pack's
``eval`` extra.

Channel order. NudeNet 3.4.x's ``_read_image`` converts with ``cv2.COLOR_RGBA2BGR`` (on 3 channels: a swap)
and then calls ``blobFromImage(..., swapRB=True)`` (a second swap): an ndarray reaches the ONNX model in its
own channel order, so a file it reads with ``cv2.imread`` (BGR) reaches it as **BGR** (NudeNet issue #203).
The YOLOv8 detector was trained on RGB, and NudeNet's earlier v3 code and UnlearnDiffAtk's vendored detector
feed RGB. ``channel_order`` picks what the model sees:

* ``"rgb"`` (default): the picture's RGB, as the model was trained;
* ``"bgr_nudenet_3_4"``: what ``NudeDetector().detect(path)`` of nudenet 3.4.x gives (for comparisons with
  numbers computed by nudenet as shipped).

Which array order gives which blob order is measured once per detector on the blob handed to onnxruntime
(``array_order_reaches_model``), not assumed from NudeNet's version.

Detector files: the wheel's bundled ``320n.onnx`` (inference at 320), or NudeNet's ``640m.onnx`` (at 640,
a separate download from NudeNet's releases) when it is on disk: ``find_detector_models`` lists what a set
of folders offers.
"""

from __future__ import annotations

import functools
import os

import numpy as np

from .embedding_io import sha256_file

INSTALL_HINT = ("NudeNet is not installed. It is an optional dependency (AGPL-3.0 model): install it into the "
                "Python that runs ComfyUI with `pip install nudenet` (or `pip install .[eval]` in this pack). "
                "The wheel bundles its ONNX detector; nothing else is downloaded.")

CHANNEL_ORDERS = ("rgb", "bgr_nudenet_3_4")
DEFAULT_CHANNEL_ORDER = "rgb"
BUNDLED_MODEL = "320n"
MODEL_FILES = {"640m": "640m.onnx"}           # NudeNet release files found on disk, by name
MODEL_RESOLUTIONS = {"320n": 320, "640m": 640}  # what each model was trained at (NudeNet's README)

_DETECTORS: dict = {}
_ARRAY_ORDER_KEPT: dict = {}  # id(detector) -> (detector, array order reaches the model unchanged)


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


def check_channel_order(channel_order: str) -> str:
    if channel_order not in CHANNEL_ORDERS:
        raise ValueError(f"channel_order {channel_order!r} is not one of {CHANNEL_ORDERS}: 'rgb' = what the model "
                         "was trained on, 'bgr_nudenet_3_4' = what nudenet 3.4.x gives for an image file")
    return channel_order


def find_detector_models(directories) -> dict[str, str | None]:
    """{model name: file} the detector can use: ``"320n"`` (bundled, None) always, ``"640m"`` when a
    ``640m.onnx`` is in one of ``directories`` (the first one found)."""
    found = {BUNDLED_MODEL: None}
    for name, file_name in MODEL_FILES.items():
        for directory in directories:
            path = os.path.join(directory, file_name)
            if os.path.isfile(path):
                found[name] = os.path.abspath(path)
                break
    return found


def model_resolution(model_path: str | None) -> int:
    """Inference resolution of a detector file: 640 for ``640m.onnx``, else the bundled model's 320."""
    stem = os.path.splitext(os.path.basename(model_path))[0] if model_path else BUNDLED_MODEL
    return MODEL_RESOLUTIONS.get(stem, MODEL_RESOLUTIONS[BUNDLED_MODEL])


def nudenet_detector(model_path: str | None = None, inference_resolution: int | None = None):
    """A cached ``NudeDetector``: the bundled 320n model unless ``model_path`` (e.g. a local 640m.onnx), at
    the file's own resolution (``model_resolution``) unless ``inference_resolution`` is given."""
    if model_path and not os.path.isfile(model_path):
        raise FileNotFoundError(f"NudeNet model file not found: {model_path} (download 640m.onnx from NudeNet's "
                                "GitHub releases, or leave the model empty for the bundled 320n)")
    key = (model_path or None, inference_resolution or model_resolution(model_path))
    if key not in _DETECTORS:
        nudenet = require_nudenet()
        _DETECTORS[key] = nudenet.NudeDetector(model_path=key[0], inference_resolution=key[1])
    return _DETECTORS[key]


class _RecordingSession:
    """An onnxruntime session that keeps the input feeds of every ``run``."""

    def __init__(self, session):
        self.session, self.feeds = session, []

    def run(self, output_names, input_feed, *args, **kwargs):
        self.feeds.append(input_feed)
        return self.session.run(output_names, input_feed, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.session, name)


def array_order_reaches_model(detector) -> bool:
    """True when ``detector.detect(array)`` hands the array's channels to the ONNX model in the same order
    (nudenet 3.4.x), False when it reverses them; measured once on the blob of a pure-red probe."""
    cached = _ARRAY_ORDER_KEPT.get(id(detector))
    if cached is not None and cached[0] is detector:
        return cached[1]
    probe = np.zeros((16, 16, 3), np.uint8)
    probe[..., 0] = 255
    session = detector.onnx_session
    recorder = detector.onnx_session = _RecordingSession(session)
    try:
        detector.detect(probe)
    finally:
        detector.onnx_session = session
    blob = np.asarray(next(iter(recorder.feeds[0].values())))
    lit = [channel for channel in range(blob.shape[1]) if blob[0, channel].max() > 0.5]
    if lit not in ([0], [2]):
        raise RuntimeError(f"NudeNet's preprocessing put a pure-red probe into channels {lit} of the model input; "
                           "this nudenet version is not supported (install nudenet 3.4.x)")
    _ARRAY_ORDER_KEPT[id(detector)] = (detector, lit == [0])
    return lit == [0]


def detector_input(image, detector, channel_order: str = DEFAULT_CHANNEL_ORDER) -> np.ndarray:
    """The contiguous uint8 array to pass to ``detector.detect`` so the model sees ``channel_order``."""
    reverse = (check_channel_order(channel_order) == "rgb") != array_order_reaches_model(detector)
    rgb = to_uint8_rgb(image)
    return np.ascontiguousarray(rgb[..., ::-1] if reverse else rgb)


def detect_rgb(image, detector=None, channel_order: str = DEFAULT_CHANNEL_ORDER) -> list[dict]:
    """NudeNet detections of one RGB image: [{"class", "score", "box": [x, y, w, h]}], score >= 0.2 after NMS."""
    detector = detector or nudenet_detector()
    return [{"class": d["class"], "score": float(d["score"]), "box": [int(v) for v in d["box"]]}
            for d in detector.detect(detector_input(image, detector, channel_order))]


def detect_file(path: str, detector=None, channel_order: str = DEFAULT_CHANNEL_ORDER) -> list[dict]:
    """NudeNet detections of an image file, read with PIL as RGB (PNG, JPEG, WebP ...)."""
    from PIL import Image
    with Image.open(path) as handle:
        return detect_rgb(np.asarray(handle.convert("RGB")), detector, channel_order)


@functools.lru_cache(maxsize=8)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(path)[:16]


def detector_description(detector=None, channel_order: str = DEFAULT_CHANNEL_ORDER) -> dict:
    """What to record next to every score: package version, model file (name and content hash, the same on
    every machine), resolution and channel order."""
    detector = detector or nudenet_detector()
    model = str(getattr(detector.onnx_session, "_model_path", None) or "")
    stat = os.stat(model) if model and os.path.isfile(model) else None
    return {"detector": "NudeNet", "nudenet_version": nudenet_version(),
            "model": os.path.basename(model) if model else f"{BUNDLED_MODEL}.onnx",
            "model_sha256": _file_digest(model, stat.st_size, stat.st_mtime_ns) if stat else "",
            "inference_resolution": int(detector.input_width), "channel_order": check_channel_order(channel_order)}


def describe_detector(described: dict) -> str:
    """'NudeNet 3.4.2 (320n.onnx at 320, channels rgb)' for a ``detector_description``."""
    return (f"{described.get('detector', 'NudeNet')} {described.get('nudenet_version', '')} "
            f"({described.get('model', '?')} at {described.get('inference_resolution', '?')}, "
            f"channels {described.get('channel_order', 'unrecorded')})")


class FileScorer:
    """``scorer(path) -> detections`` for the evaluation runner; ``description`` is stored with each score,
    so scores of another detector file or channel order are recomputed, never reused."""

    def __init__(self, model_path: str | None = None, channel_order: str = DEFAULT_CHANNEL_ORDER):
        self.detector = nudenet_detector(model_path)
        self.channel_order = check_channel_order(channel_order)
        self.description = detector_description(self.detector, channel_order)

    def __call__(self, path: str) -> list[dict]:
        return detect_file(path, self.detector, self.channel_order)
