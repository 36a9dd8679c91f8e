"""Build the UI-format workflows in workflows/ from their API twins, with the real ComfyUI frontend.

    python tools/build_ui_workflows.py [NAME ...]

For each ``workflows/api/NAME.json`` the real frontend (served by a ComfyUI started on loopback with
this pack installed) loads the API graph with its own ``loadApiJson`` (so widget order, links and
sizes are exactly what the frontend produces), adds a Note for every node whose ``_meta.note``
explains the step (in a column of notes on the left), and serialises the graph to ``workflows/NAME.json``; a screenshot becomes the
template thumbnail ``workflows/NAME.jpg``. Needs ComfyUI (COMFYUI_PATH), Chromium and playwright.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run as a script: the pack root holds `implicit_negatives`

from implicit_negatives.comfyui import headless  # noqa: E402
from implicit_negatives.comfyui.loopback_server import ComfyServer  # noqa: E402

BUILD = """async ([api, name]) => {
    await window.app.loadApiJson(api, name);
    const graph = window.app.rootGraph || window.app.graph;
    for (const node of graph._nodes)  // shared workflows must reproduce: seeds stay fixed
        for (const widget of node.widgets || [])
            if (widget.name === "control_after_generate") widget.value = "fixed";
    const left = Math.min(...graph._nodes.map(n => n.pos[0]));
    const top = Math.min(...graph._nodes.map(n => n.pos[1]));
    for (const node of graph._nodes) node.pos = [node.pos[0] + 340, node.pos[1]];
    let y = top;
    for (const [id, node] of Object.entries(api)) {  // a column of numbered notes left of the graph
        const text = node._meta && node._meta.note;
        if (!text) continue;
        const note = LiteGraph.createNode("Note");
        note.widgets[0].value = text;
        note.title = "Note: " + (node._meta.title || node.class_type);
        note.size = [300, 120];
        note.pos = [left, y];
        graph.add(note);
        y += 150;
    }
    graph.setDirtyCanvas(true, true);
    window.app.canvas.ds.scale = 0.7;
    window.app.canvas.ds.offset = [20, 20];
    return JSON.parse(JSON.stringify(graph.serialize()));  // drop undefined fields (the schema rejects null)
}"""


def main(names: list[str]) -> None:
    from playwright.sync_api import sync_playwright
    from PIL import Image

    path, how = headless.locate_comfyui(development_copy=True)
    if path is None:
        raise SystemExit(how)
    api_files = sorted(glob.glob(os.path.join(headless.PACK_ROOT, "workflows", "api", "*.json")))
    if names:
        api_files = [p for p in api_files if os.path.splitext(os.path.basename(p))[0] in names]
    server = ComfyServer(path, tempfile.mkdtemp(prefix="comfy-ui-build-")).start()
    try:
        server.post("/settings/Comfy.TutorialCompleted", True)
        with sync_playwright() as driver:
            browser = driver.chromium.launch(executable_path=shutil.which("chromium"), args=[
                "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking"])
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(server.url)
            page.wait_for_function("window.app && (window.app.rootGraph || window.app.graph)", timeout=90_000)
            for api_path in api_files:
                name = os.path.splitext(os.path.basename(api_path))[0]
                with open(api_path) as handle:
                    api = json.load(handle)
                workflow = page.evaluate(BUILD, [api, name])
                out = os.path.join(headless.PACK_ROOT, "workflows", f"{name}.json")
                with open(out, "w") as handle:
                    json.dump(workflow, handle, indent=1)
                page.wait_for_timeout(400)
                shot = os.path.join(tempfile.gettempdir(), f"{name}.png")
                page.screenshot(path=shot)
                Image.open(shot).convert("RGB").resize((560, 360)).save(out.replace(".json", ".jpg"), quality=80)
                print(f"wrote {out} ({len(workflow['nodes'])} nodes)")
            browser.close()
    finally:
        server.stop()


if __name__ == "__main__":
    main(sys.argv[1:])
