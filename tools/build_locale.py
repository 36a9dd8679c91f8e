"""Write locales/en/main.json from the pack's node schemas (the English UI strings, kept in sync by a test).

    python tools/build_locale.py

ComfyUI merges ``locales/<lang>/main.json`` of every custom node pack into the frontend's translations
(``GET /i18n``). The English file mirrors the schemas; translators copy it to ``locales/<lang>/``.
"""

from __future__ import annotations

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(HERE)
sys.path.insert(0, REPO_ROOT)  # run as a script: the pack root holds `implicit_negatives`
LOCALE_PATH = os.path.join(REPO_ROOT, "locales", "en", "main.json")


def node_def_strings(info: dict) -> dict:
    """The translatable strings of one node, from its V1 node info (what /object_info serves)."""
    inputs = {}
    for section in ("required", "optional"):
        for name, spec in info["input"].get(section, {}).items():
            options = spec[1] if len(spec) > 1 else {}
            entry = {"name": options.get("display_name", name)}
            if options.get("tooltip"):
                entry["tooltip"] = options["tooltip"]
            inputs[name] = entry
    outputs = {}
    tooltips = info.get("output_tooltips") or [None] * len(info["output"])
    for index, (name, tooltip) in enumerate(zip(info["output_name"], tooltips)):
        outputs[str(index)] = {"name": name, **({"tooltip": tooltip} if tooltip else {})}
    return {"display_name": info["display_name"], "description": info["description"],
            "inputs": inputs, "outputs": outputs}


def locale_for(node_classes: dict) -> dict:
    return {"nodeDefs": {node_id: node_def_strings(cls.GET_NODE_INFO_V1())
                         for node_id, cls in sorted(node_classes.items())}}


def main() -> None:
    from implicit_negatives.comfyui import headless
    nodes = headless.import_comfyui(development_copy=True)
    before = set(nodes.NODE_CLASS_MAPPINGS)
    headless.load_pack(nodes)
    ours = {k: v for k, v in nodes.NODE_CLASS_MAPPINGS.items() if k not in before}
    os.makedirs(os.path.dirname(LOCALE_PATH), exist_ok=True)
    with open(LOCALE_PATH, "w") as handle:
        json.dump(locale_for(ours), handle, indent=2, ensure_ascii=False)
        handle.write("\n")
    print(f"wrote {LOCALE_PATH} ({len(ours)} nodes)")


if __name__ == "__main__":
    main()
