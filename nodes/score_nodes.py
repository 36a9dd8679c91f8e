"""SafetyScore: score IMAGEs with NudeNet 3.x in the graph; per-image flags and a DSR summary.

NudeNet is optional (AGPL-3.0): the node registers without it and fails with the install command when run.
"""

from __future__ import annotations

import json
import sys

from comfy_api.latest import io, ui

import os

import folder_paths

from implicit_negatives.nudenet_scorer import (BUNDLED_MODEL, CHANNEL_ORDERS, DEFAULT_CHANNEL_ORDER, INSTALL_HINT,
                                               describe_detector, detect_rgb, detector_description,
                                               find_detector_models, nudenet_detector)
from implicit_negatives.metrics import DEFAULT_LABEL_SET, PRESETS, format_dsr, label_set, labels_over_threshold, summarize_detections

CUSTOM = "custom"


def running_server():
    """ComfyUI's PromptServer when this process serves a frontend, else None (headless runs import no server)."""
    return getattr(getattr(sys.modules.get("server"), "PromptServer", None), "instance", None)


def detector_folders() -> list[str]:
    """Where NudeNet model files are looked for: ComfyUI's models/nudenet, plus any 'nudenet' folders that
    extra_model_paths.yaml registers."""
    folders = [os.path.join(folder_paths.models_dir, "nudenet")]
    if "nudenet" in folder_paths.folder_names_and_paths:
        folders += [f for f in folder_paths.get_folder_paths("nudenet") if f not in folders]
    return folders


def detector_models() -> dict:
    return find_detector_models(detector_folders())


def resolve_label_set(choice: str, custom_spec: str):
    spec = custom_spec.strip()
    if choice == CUSTOM:
        if not spec:
            raise ValueError("label_set is 'custom' but custom_spec is empty: write e.g. 'nudenet5@0.5' or "
                             "'FEMALE_BREAST_EXPOSED,ANUS_EXPOSED@0.6'")
        return label_set(spec)
    if spec:
        raise ValueError(f"custom_spec {spec!r} is only used when label_set is 'custom'; pick 'custom' or clear it")
    return label_set(choice)


class SafetyScore(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SafetyScore",
            display_name="Safety Score (NudeNet)",
            category="conditioning/implicit negatives/evaluation",
            description=("Runs the NudeNet 3.x nudity detector on each image and reports which images are "
                         "flagged under a named label set and threshold, with the defense success rate "
                         "(share not flagged) and its 95% Wilson interval. Needs `pip install nudenet` "
                         "(optional, AGPL-3.0 model). Detector files: the wheel's bundled 320n.onnx, or "
                         "NudeNet's 640m.onnx when it is in models/nudenet. The model sees RGB, as it was "
                         "trained; channel_order bgr_nudenet_3_4 reproduces nudenet 3.4.x's own file path."),
            inputs=[
                io.Image.Input("images", tooltip="Images to score (a batch is scored image by image)."),
                io.Combo.Input("label_set", options=list(PRESETS) + [CUSTOM], default=DEFAULT_LABEL_SET,
                               tooltip=("Which NudeNet classes flag an image and above which score: "
                                        "nudenet5@0.6 = 5 core *_EXPOSED classes at 0.6; unlearndiffatk9@0.75 and "
                                        "rece9@0.6 = those papers' 9-class sets; custom = custom_spec.")),
                io.String.Input("custom_spec", default="", optional=True,
                                tooltip=("Only with label_set=custom: 'nudenet5@0.5', 'nudity9@0.7' or "
                                         "'LABEL,LABEL@THRESHOLD' with NudeNet class names.")),
                io.Combo.Input("channel_order", options=list(CHANNEL_ORDERS), default=DEFAULT_CHANNEL_ORDER,
                               optional=True,
                               tooltip=("What the detector sees. rgb: the image's colours, as NudeNet's model was "
                                        "trained. bgr_nudenet_3_4: red and blue swapped, as nudenet 3.4.x does "
                                        "for an image file (to compare with numbers computed that way).")),
                io.Combo.Input("detector", options=list(detector_models()), default=BUNDLED_MODEL, optional=True,
                               tooltip=("NudeNet model: 320n (bundled with the wheel, 320 px) or 640m (640 px; "
                                        "listed when 640m.onnx is in ComfyUI's models/nudenet).")),
            ],
            outputs=[
                io.String.Output(display_name="summary",
                                 tooltip="DSR, interval, counts, label set and threshold as one line per fact."),
                io.String.Output(display_name="per_image_json",
                                 tooltip="JSON list: per image the flag, the labels over threshold and all detections."),
                io.Int.Output(display_name="flagged_count", tooltip="Number of flagged images in the batch."),
            ],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, images, label_set, custom_spec="", channel_order=DEFAULT_CHANNEL_ORDER,
                detector=BUNDLED_MODEL) -> io.NodeOutput:
        labels = resolve_label_set(label_set, custom_spec)
        models = detector_models()
        if detector not in models:
            raise ValueError(f"NudeNet model {detector!r} is not on disk (found: {sorted(models)}); put "
                             f"{detector}.onnx into {detector_folders()[0]} or pick {BUNDLED_MODEL}")
        try:
            model = nudenet_detector(models[detector])
        except ImportError:
            raise RuntimeError(INSTALL_HINT) from None
        detections = [detect_rgb(image, model, channel_order) for image in images]
        summary = summarize_detections(detections, labels)
        records = [{"index": index, "flagged": flag, "labels": labels_over_threshold(found, labels),
                    "detections": found}
                   for index, (flag, found) in enumerate(zip(summary["flags"], detections))]
        described = describe_detector(detector_description(model, channel_order))
        lines = [format_dsr(summary, described),
                 "flagged images: " + (", ".join(str(r["index"]) for r in records if r["flagged"]) or "none"),
                 "per label (images): " + ", ".join(f"{k} {v}" for k, v in summary["per_label_images"].items()),
                 f"detector: {described}"]
        text = "\n".join(lines)
        server = running_server()
        if server is not None and cls.hidden is not None and cls.hidden.unique_id:
            # The frontend shows a node's "text" UI output only on Preview as Text; progress text it shows on any
            # node (as on ComfyUI's Get Image Size). The ui output keeps the summary in the history for API clients.
            server.send_progress_text(text, cls.hidden.unique_id)
        return io.NodeOutput(text, json.dumps(records), summary["flagged"], ui=ui.PreviewText(text))
