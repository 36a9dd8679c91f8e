"""What an artist sees: every workflow in workflows/ loads in the real ComfyUI frontend and runs.

A real ComfyUI server (main.py, with the comfyui-frontend-package it requires) runs on loopback with
the pack in custom_nodes/. API twins are validated against the live /object_info schema; the UI
workflows are loaded into headless Chromium through the page's own loader, checked for missing node
types, queued from the page, and screenshotted (the README's pictures).
"""

from __future__ import annotations

import glob
import json
import os
import shutil

import pytest
import torch

from implicit_negatives.comfyui import headless, rig
from implicit_negatives.comfyui.loopback_server import ComfyServer
from implicit_negatives.embedding_io import save_embedding

WORKFLOWS = os.path.join(headless.PACK_ROOT, "workflows")
UI_WORKFLOWS = sorted(glob.glob(os.path.join(WORKFLOWS, "*.json")))
API_WORKFLOWS = sorted(glob.glob(os.path.join(WORKFLOWS, "api", "*.json")))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOTS = os.environ.get("IMPLICIT_NEGATIVES_SCREENSHOTS",
                             os.path.join(headless.CACHE_DIR, "screenshots"))
TINY_EMBEDDING = "tiny-implicit-negative.safetensors"
TINY_UNET_WEIGHTS = "tiny-esd-x.safetensors"        # new ESD's layout, shaped for the tiny UNet
TINY_LORA = "tiny-duo/pytorch_lora_weights.safetensors"  # DUO's layout, shaped for the tiny UNet
SOCKET_TYPES = {"MODEL", "CLIP", "VAE", "CONDITIONING", "LATENT", "IMAGE", "MASK", "IMPLICIT_NEGATIVE"}


def tiny_overrides(checkpoint_name: str) -> dict:
    """Widget values that fit a shared workflow to the tiny test world (by node type and input name)."""
    return {
        "CheckpointLoaderSimple": {"ckpt_name": checkpoint_name},
        "LoadImplicitNegative": {"embedding": TINY_EMBEDDING},
        "LoadUnlearnedWeights": {"unet_name": TINY_UNET_WEIGHTS},
        "LoadUnlearnedLoRA": {"lora_name": TINY_LORA},
        "EmptyLatentImage": {"width": 64, "height": 64, "batch_size": 1},
        "KSampler": {"steps": 2},
        "KSamplerAdvanced": {"steps": 2},
        # The workflow ships with overwrite = false; here its API twin and its UI form train the same name.
        "TrainImplicitNegative": {"steps": 2, "resolution": 64, "overwrite": True, "preview_every": 2,
                                  "preview_steps": 1},  # one preview (of the final embedding) per run
        "ImageScale": {"width": 64, "height": 64},  # negation images at the tiny latent's size
        # SAFREE encodes every keyword with full-size CLIP-L: two keywords keep the CPU test short.
        "SafreeConditioning": {"concept_keywords": "Nudity, Sexual Acts"},
        "ErasureAudit": {"count": 1, "steps": 2, "width": 64, "height": 64},
    }


@pytest.fixture(scope="module")
def server(comfy, tmp_path_factory):
    path, how = headless.locate_comfyui(development_copy=True)
    if path is None:
        pytest.skip(f"frontend tests need ComfyUI: {how}")
    base = tmp_path_factory.mktemp("comfy-base")
    checkpoint = rig.tiny_checkpoint_path()
    os.makedirs(base / "models" / "checkpoints", exist_ok=True)
    os.symlink(checkpoint, base / "models" / "checkpoints" / os.path.basename(checkpoint))
    save_embedding(str(base / "models" / "embeddings" / TINY_EMBEDDING),
                   {"clip_l": torch.randn(1, 768, generator=torch.Generator().manual_seed(3)) * 0.3},
                   {"concept": "test"})
    import unlearned_layouts as layouts  # ESD's and DUO's own saving code paths (they need comfy imported)
    for folder in ("diffusion_models", "loras/tiny-duo"):
        os.makedirs(base / "models" / folder, exist_ok=True)
    layouts.esd_partial(layouts.diffusers_unet(), str(base / "models" / "diffusion_models" / TINY_UNET_WEIGHTS))
    layouts.duo_lora(layouts.diffusers_unet(), str(base / "models" / "loras" / "tiny-duo"))
    os.makedirs(base / "input", exist_ok=True)
    from PIL import Image
    for index in range(2):
        Image.new("RGB", (64, 64), (200, 40 * index, 90)).save(base / "input" / f"concept_{index}.png")
    server = ComfyServer(path, str(base)).start()
    server.checkpoint_name = os.path.basename(checkpoint)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def object_info(server):
    return server.get("/object_info")


def test_pack_nodes_are_served_with_descriptions_and_tooltips(object_info):
    ours = {k: v for k, v in object_info.items() if v.get("python_module", "").endswith("implicit-negatives")}
    assert {"LoadImplicitNegative", "ImplicitNegativeConditioning"} <= set(ours)
    for node_id, info in ours.items():
        assert info["description"], node_id
        assert all(info.get("output_tooltips") or [None]), f"{node_id} has outputs without tooltips"
        for section in ("required", "optional"):
            for name, spec in info["input"].get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"


def check_api_graph(graph: dict, object_info: dict) -> list[str]:
    """Validate an API-format graph against the live schema: types, links, combos, ranges."""
    problems = []
    for node_id, node in graph.items():
        kind = node["class_type"]
        if kind not in object_info:
            problems.append(f"{node_id}: unknown node type {kind}")
            continue
        schema = object_info[kind]["input"]
        specs = {**schema.get("required", {}), **schema.get("optional", {})}
        for name in schema.get("required", {}):
            if name not in node["inputs"]:
                problems.append(f"{node_id} {kind}: missing required input {name}")
        for name, value in node["inputs"].items():
            if name not in specs:
                problems.append(f"{node_id} {kind}: unknown input {name}")
                continue
            kind_spec, options = specs[name][0], (specs[name][1] if len(specs[name]) > 1 else {})
            if isinstance(value, list):
                source = graph.get(value[0])
                if source is None:
                    problems.append(f"{node_id} {kind}.{name}: link to missing node {value[0]}")
                    continue
                outputs = object_info[source["class_type"]]["output"]
                if value[1] >= len(outputs):
                    problems.append(f"{node_id} {kind}.{name}: output {value[1]} of {source['class_type']} does not exist")
                elif kind_spec not in ("*", outputs[value[1]]) and outputs[value[1]] != "*":
                    problems.append(f"{node_id} {kind}.{name}: {outputs[value[1]]} into {kind_spec}")
                continue
            combo = kind_spec if isinstance(kind_spec, list) else (
                options.get("options") if kind_spec == "COMBO" else None)
            if combo is not None and name not in ("ckpt_name", "embedding", "image", "lora_name", "unet_name"):
                if value not in combo:
                    problems.append(f"{node_id} {kind}.{name}: {value!r} not in {combo}")
            if kind_spec in ("INT", "FLOAT"):
                if "min" in options and value < options["min"] or "max" in options and value > options["max"]:
                    problems.append(f"{node_id} {kind}.{name}: {value} outside [{options.get('min')}, {options.get('max')}]")
    return problems


@pytest.mark.parametrize("path", API_WORKFLOWS, ids=os.path.basename)
def test_api_twin_validates_against_live_schema_and_runs(server, object_info, path):
    with open(path) as handle:
        graph = json.load(handle)
    assert check_api_graph(graph, object_info) == []
    overrides = tiny_overrides(server.checkpoint_name)
    for node in graph.values():
        for name, value in overrides.get(node["class_type"], {}).items():
            if name in node["inputs"]:
                node["inputs"][name] = value
    answer = server.post("/prompt", {"prompt": graph})
    assert not answer.get("node_errors"), answer
    history = server.wait_for_history(answer["prompt_id"])
    assert history["status"]["status_str"] == "success", history["status"]


def test_every_ui_workflow_has_an_api_twin():
    ui = {os.path.basename(p) for p in UI_WORKFLOWS}
    api = {os.path.basename(p) for p in API_WORKFLOWS}
    assert ui and ui <= api, f"UI workflows without API twin: {sorted(ui - api)}"


@pytest.fixture(scope="module")
def browser(server):
    if CHROMIUM is None:
        pytest.skip("frontend tests need Chromium (apt-get install chromium)")
    playwright_api = pytest.importorskip("playwright.sync_api", reason="frontend tests need playwright (pip)")
    server.post("/settings/Comfy.TutorialCompleted", True)
    with playwright_api.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"])
        yield browser
        browser.close()


@pytest.fixture
def page(server, browser):
    """A fresh page per workflow, so one workflow's dialogs cannot hide another's."""
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    page.goto(server.url)
    page.wait_for_function("window.app && window.app.graph && document.querySelector('canvas')", timeout=90_000)
    yield page
    page.close()


LOAD_AND_FIT = """async ([workflow, overrides]) => {
    await window.app.loadGraphData(workflow);
    const known = LiteGraph.registered_node_types;
    const missing = window.app.graph._nodes.filter(n => !(n.type in known)).map(n => n.type);
    for (const node of window.app.graph._nodes) {
        for (const widget of node.widgets || []) {
            const values = overrides[node.type];
            if (values && widget.name in values) widget.value = values[widget.name];
        }
    }
    window.app.graph.setDirtyCanvas(true, true);
    return {missing, types: window.app.graph._nodes.map(n => n.type)};
}"""


# Text the page shows on the nodes that display a DSR summary: SafetyScore's progress-text widget (the one
# ComfyUI's Get Image Size fills) and Preview as Text's preview widgets.
SHOWN_SUMMARIES = """() => window.app.graph._nodes
    .filter(n => n.type === "SafetyScore" || n.type === "PreviewAny")
    .map(n => ({type: n.type, text: (n.widgets || [])
        .filter(w => w.name === "$$node-text-preview" || w.name === "preview")
        .map(w => String(w.value ?? "")).join("\\n")}))"""


SHOWN_AUDIT = """() => window.app.graph._nodes.filter(n => n.type === "ErasureAudit" || n.type === "PreviewAny")
    .map(n => ({type: n.type, text: (n.widgets || []).filter(w => w.name === "$$node-text-preview" || w.name === "preview")
        .map(w => String(w.value ?? "")).join("\\n")}))"""


def wait_for_shown_summaries(page, timeout_ms: int = 10_000) -> list[dict]:
    """What the summary-showing nodes display once the run's messages have reached the page."""
    for _ in range(timeout_ms // 200):
        shown = page.evaluate(SHOWN_SUMMARIES)
        if shown and all("DSR " in node["text"] for node in shown):
            break
        page.wait_for_timeout(200)
    return shown


NODE_IMAGES = """(id) => {
    const node = window.app.graph.getNodeById(id);
    const outputs = (window.app.nodeOutputs || {})[String(id)];
    return Math.max((node && node.imgs || []).length, (outputs && outputs.images || []).length);
}"""


def wait_for_node_images(page, node_id: int, timeout_ms: int = 10_000) -> int:
    """How many images the page shows on a node once the run's 'executed' message has reached it."""
    for _ in range(timeout_ms // 200):
        count = page.evaluate(NODE_IMAGES, node_id)
        if count:
            return count
        page.wait_for_timeout(200)
    return 0


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=os.path.basename)
def test_ui_workflow_loads_queues_and_runs_in_the_frontend(server, page, path):
    with open(path) as handle:
        workflow = json.load(handle)
    loaded = page.evaluate(LOAD_AND_FIT, [workflow, tiny_overrides(server.checkpoint_name)])
    assert loaded["missing"] == [], f"missing node types: {loaded['missing']}"
    page.wait_for_timeout(300)
    for complaint in ("Invalid workflow", "Some Nodes Are Missing", "missing"):
        assert page.get_by_text(complaint).count() == 0, f"the frontend says: {complaint}"
    assert len(loaded["types"]) == len(workflow["nodes"])
    with page.expect_response(lambda r: r.url.endswith("/prompt") and r.request.method == "POST") as posted:
        page.evaluate("window.app.queuePrompt(0, 1)")
    answer = posted.value.json()
    assert posted.value.ok and not answer.get("node_errors"), answer
    history = server.wait_for_history(answer["prompt_id"])
    assert history["status"]["status_str"] == "success", history["status"]
    saved = [node_id for node_id, out in history["outputs"].items() if out.get("images")]
    save_nodes = [n for n in workflow["nodes"] if n["type"] in ("SaveImage", "PreviewImage") and n.get("mode", 0) == 0]
    assert len(saved) >= len(save_nodes)
    for node in (n for n in workflow["nodes"] if n["type"] == "TrainImplicitNegative"):  # loss curve + preview
        assert len(history["outputs"][str(node["id"])]["images"]) == 2, history["outputs"]
        assert wait_for_node_images(page, node["id"]) == 2
    if any(n["type"] == "SafetyScore" for n in workflow["nodes"]):  # the DSR is on the page, on the node and previewed
        shown = wait_for_shown_summaries(page)
        assert sorted(n["type"] for n in shown) == ["PreviewAny", "SafetyScore"], shown
        assert all("DSR " in n["text"] and "nudenet5@0.6" in n["text"] for n in shown), shown
    if any(n["type"] == "ErasureAudit" for n in workflow["nodes"]):  # the audit summary is previewed (and on the node)
        for _ in range(50):
            shown = {n["type"]: n["text"] for n in page.evaluate(SHOWN_AUDIT)}
            if "concept rate" in shown.get("PreviewAny", ""):
                break
            page.wait_for_timeout(200)
        assert all(part in shown.get("PreviewAny", "") for part in ("C* (", "concept rate", "not a proof of erasure")), shown
        # Frontend 1.35 (ComfyUI 0.8.0) shows it on the node too; 1.27.10 (0.3.64) leaves the node's text empty.
        assert shown["ErasureAudit"] == "" or "not a proof of erasure" in shown["ErasureAudit"], shown
    page.wait_for_timeout(500)
    os.makedirs(SCREENSHOTS, exist_ok=True)
    page.screenshot(path=os.path.join(SCREENSHOTS, os.path.basename(path).replace(".json", ".png")))
