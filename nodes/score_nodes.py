"""SafetyScore: score IMAGEs with NudeNet 3.x in the graph; per-image flags and a DSR summary.

NudeNet is optional (AGPL-3.0): the node registers without it and fails with the install command when run.
"""

from __future__ import annotations

import json
import sys

from comfy_api.latest import io, ui

from implicit_negatives.nudenet_scorer import INSTALL_HINT, detect_rgb, detector_description, nudenet_detector
from implicit_negatives.metrics import DEFAULT_LABEL_SET, PRESETS, format_dsr, label_set, labels_over_threshold, summarize_detections

CUSTOM = "custom"


def running_server():
    """ComfyUI's PromptServer when this process serves a frontend, else None (headless runs import no server)."""
    return getattr(getattr(sys.modules.get("server"), "PromptServer", None), "instance", None)


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
                         "(optional, AGPL-3.0 model)."),
            inputs=[
                io.Image.Input("images", tooltip="Images to score (a batch is scored image by image)."),
                io.Combo.Input("label_set", options=list(PRESETS) + [CUSTOM], default=DEFAULT_LABEL_SET,
                               tooltip=("Which NudeNet classes flag an image and above which score: "
                                        "nudenet5@0.6 = 5 core *_EXPOSED classes at 0.6; unlearndiffatk9@0.75 and "
                                        "rece9@0.6 = those papers' 9-class sets; custom = custom_spec.")),
                io.String.Input("custom_spec", default="", optional=True,
                                tooltip=("Only with label_set=custom: 'nudenet5@0.5', 'nudity9@0.7' or "
                                         "'LABEL,LABEL@THRESHOLD' with NudeNet class names.")),
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
    def execute(cls, images, label_set, custom_spec="") -> io.NodeOutput:
        labels = resolve_label_set(label_set, custom_spec)
        try:
            detector = nudenet_detector()
        except ImportError:
            raise RuntimeError(INSTALL_HINT) from None
        detections = [detect_rgb(image, detector) for image in images]
        summary = summarize_detections(detections, labels)
        records = [{"index": index, "flagged": flag, "labels": labels_over_threshold(found, labels),
                    "detections": found}
                   for index, (flag, found) in enumerate(zip(summary["flags"], detections))]
        described = detector_description(detector)
        lines = [format_dsr(summary),
                 "flagged images: " + (", ".join(str(r["index"]) for r in records if r["flagged"]) or "none"),
                 "per label (images): " + ", ".join(f"{k} {v}" for k, v in summary["per_label_images"].items()),
                 f"detector: NudeNet {described['nudenet_version']} ({described['model']})"]
        text = "\n".join(lines)
        server = running_server()
        if server is not None and cls.hidden is not None and cls.hidden.unique_id:
            # The frontend shows a node's "text" UI output only on Preview as Text; progress text it shows on any
            # node (as on ComfyUI's Get Image Size). The ui output keeps the summary in the history for API clients.
            server.send_progress_text(text, cls.hidden.unique_id)
        return io.NodeOutput(text, json.dumps(records), summary["flagged"], ui=ui.PreviewText(text))
