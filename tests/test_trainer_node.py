"""TrainImplicitNegative inside ComfyUI: in the real executor, equal to the CLI, cancellable, non-mutating."""

import importlib
import json
import os
import shutil

import pytest
import torch
from PIL import Image

from implicit_negatives.embedding_io import caption_templates, load_embedding
from implicit_negatives.inversion import CAPTION_TEMPLATES

from implicit_negatives.comfyui import headless, rig


@pytest.fixture(scope="module")
def concept_images(tmp_path_factory):
    """A folder of two 64x64 images (no captions), as the CLI reads it."""
    folder = tmp_path_factory.mktemp("node-images")
    generator = torch.Generator().manual_seed(1)
    for i in range(2):
        pixels = (torch.rand(64, 64, 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"concept_{i}.png")
    return folder


@pytest.fixture(scope="module")
def executor_model(comfy, tiny_checkpoint):
    """The tiny checkpoint loaded the way a loader node loads it: under inference mode (inference tensors)."""
    import comfy.sd
    with torch.inference_mode():
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(os.path.join(*tiny_checkpoint))
    assert next(model.model.parameters()).is_inference()
    return model, clip, vae


def same_bits(a, b):
    """Bitwise equality (uninitialised weights of the tiny CLIP may hold NaN, which torch.equal calls unequal)."""
    return a.shape == b.shape and torch.equal(a.reshape(-1).contiguous().view(torch.uint8), b.reshape(-1).contiguous().view(torch.uint8))


def node_inputs(images, name, **changes):
    inputs = dict(images=images, name=name, steps=2, learning_rate=0.005, num_vectors=1, init_word="cat", seed=7,
                  resolution=64, templates="object", batch_size=1, concept="test", overwrite=True,
                  gradient_checkpointing=False, preview_every=0)  # previews cost CLIP encodes: only where tested
    inputs.update(changes)
    return inputs


def test_workflow_trains_in_comfyui_executor(comfy, pack, tiny_checkpoint, concept_images, embeddings_dir):
    import folder_paths
    with open(os.path.join(headless.PACK_ROOT, "workflows", "api", "train_implicit_negative.json")) as handle:
        graph = json.load(handle)
    for name in ("concept_0.png", "concept_1.png"):
        shutil.copy(concept_images / name, os.path.join(folder_paths.get_input_directory(), name))
    graph["1"]["inputs"]["ckpt_name"] = tiny_checkpoint[1]
    graph["5"]["inputs"].update(steps=2, resolution=64, name="graph_trained", num_vectors=2, preview_every=0)
    outputs = headless.GraphRunner().run(graph)
    embedding = load_embedding(str(embeddings_dir / "graph_trained.safetensors"))
    assert embedding.vectors["clip_l"].shape == (2, 768) and embedding.metadata["steps"] == "2"
    assert len(embedding.metadata["text_encoder_fingerprint"]) == 16
    templates = CAPTION_TEMPLATES[graph["5"]["inputs"]["templates"]]  # the contexts C* was trained in
    assert json.loads(embedding.metadata["caption_templates"]) == list(templates)
    assert caption_templates(embedding.metadata) == templates
    assert "saved graph_trained.safetensors" in outputs["5"]["text"][0]


def test_node_equals_cli_and_leaves_the_shared_model_untouched(comfy, pack, pack_module, executor_model,
                                                               concept_images, tiny_checkpoint, embeddings_dir, tmp_path):
    model, clip, vae = executor_model
    data = importlib.import_module("implicit_negatives.image_folder")
    cli = importlib.import_module("trainer.cli")
    images = data.load_image_folder(str(concept_images), 64).images
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    clip_before = {k: v.clone() for k, v in clip.cond_stage_model.state_dict().items()}
    with torch.inference_mode():  # as the executor runs nodes
        negative = pack["TrainImplicitNegative"].execute(model, clip, vae, **node_inputs(images, "node_run")).result[0]
    assert [k for k, v in model.model.state_dict().items() if not same_bits(before[k], v)] == []
    assert [k for k, v in clip.cond_stage_model.state_dict().items() if not same_bits(clip_before[k], v)] == []
    assert not any("forward" in m.__dict__ for m in clip.cond_stage_model.modules())  # CLIPLayer patch undone

    assert cli.main(["--checkpoint", os.path.join(*tiny_checkpoint), "--images", str(concept_images),
                     "--resolution", "64", "--steps", "2", "--init-word", "cat", "--seed", "7", "--no-preview",
                     "--concept", "test",
                     "--output", str(tmp_path / "cli_run.safetensors"), "--work-dir", str(tmp_path / "work")]) == 0
    from_cli = load_embedding(str(tmp_path / "cli_run.safetensors")).vectors["clip_l"]
    from_node = negative.embedding.vectors["clip_l"]
    assert torch.equal(from_node, load_embedding(str(embeddings_dir / "node_run.safetensors")).vectors["clip_l"])
    print(f"\nnode vs CLI max |diff| = {(from_node - from_cli).abs().max():.3g}")
    assert torch.allclose(from_node, from_cli, rtol=0, atol=1e-6)

    # One metadata writer: the same keys, and the same values wherever the two runs agree.
    node_meta = load_embedding(str(embeddings_dir / "node_run.safetensors")).metadata
    cli_meta = load_embedding(str(tmp_path / "cli_run.safetensors")).metadata
    assert set(node_meta) == set(cli_meta)
    node_training, cli_training = json.loads(node_meta.pop("training")), json.loads(cli_meta.pop("training"))
    assert set(node_training) == set(cli_training)
    differ = {k for k in node_training if node_training[k] != cli_training[k]}
    assert differ == {"data", "trained_in"}, differ
    differ = {k for k in node_meta if node_meta[k] != cli_meta[k]}
    # training_images_sha256: the node hashes the IMAGE batch's pixels, the CLI the image files' bytes.
    assert differ <= {"base_model", "base_model_hash", "unlearned_model", "unlearned_model_hash", "created",
                      "training_images_sha256"}, differ


def test_cancel_stops_training_without_output(comfy, pack, executor_model, concept_images, pack_module, embeddings_dir):
    import comfy.model_management
    data = importlib.import_module("implicit_negatives.image_folder")
    images = data.load_image_folder(str(concept_images), 64).images
    model, clip, vae = executor_model
    comfy.model_management.interrupt_current_processing(True)
    try:
        with torch.inference_mode(), pytest.raises(comfy.model_management.InterruptProcessingException):
            pack["TrainImplicitNegative"].execute(model, clip, vae, **node_inputs(images, "cancelled", steps=50))
    finally:
        comfy.model_management.interrupt_current_processing(False)
    assert not (embeddings_dir / "cancelled.safetensors").exists()
    assert not any("forward" in m.__dict__ for m in clip.cond_stage_model.modules())


def test_a_diverged_embedding_is_saved_with_a_warning(comfy, pack, executor_model, concept_images, embeddings_dir):
    """lr 1.0 (the widget's maximum) moves every coordinate by ~1 per Adam step: a vector ~28 long, where
    the tiny CLIP's token rows are under 1 long. The node says so in its output and in the file."""
    data = importlib.import_module("implicit_negatives.image_folder")
    images = data.load_image_folder(str(concept_images), 64).images
    model, clip, vae = executor_model
    with torch.inference_mode():
        output = pack["TrainImplicitNegative"].execute(
            model, clip, vae, **node_inputs(images, "diverged", steps=1, learning_rate=1.0))
    assert "\nWARNING: learned vector norms " in output.ui["text"][0]
    warning = load_embedding(str(embeddings_dir / "diverged.safetensors")).metadata["warning"]
    assert "lie far outside the token embeddings'" in warning and warning in output.ui["text"][0]


def test_names_that_escape_the_embeddings_folder_are_refused(pack, executor_model, concept_images):
    model, clip, vae = executor_model
    for name in ("../evil", "a/b", ""):
        with pytest.raises(ValueError, match="plain file name"):
            pack["TrainImplicitNegative"].execute(model, clip, vae, **node_inputs(torch.zeros(1, 64, 64, 3), name))


def test_the_training_workflow_ships_without_overwrite():
    """Queueing the shipped workflow twice must not silently replace the first embedding (both forms)."""
    with open(os.path.join(headless.PACK_ROOT, "workflows", "api", "train_implicit_negative.json")) as handle:
        api = json.load(handle)
    assert [n["inputs"]["overwrite"] for n in api.values() if n["class_type"] == "TrainImplicitNegative"] == [False]
    with open(os.path.join(headless.PACK_ROOT, "workflows", "train_implicit_negative.json")) as handle:
        (node,) = [n for n in json.load(handle)["nodes"] if n["type"] == "TrainImplicitNegative"]
    widgets = dict(zip([i["name"] for i in node["inputs"] if "widget" in i], node["widgets_values"]))
    assert widgets["overwrite"] is False and widgets["name"] == api["5"]["inputs"]["name"]



@pytest.fixture
def progress_hook(comfy):
    """ComfyUI's global progress-bar hook (what the server installs to send progress and previews), recording
    (value, total, preview, node_id); ``on_value`` may act on a value, as a person pressing Cancel."""
    import comfy.utils
    calls, actions = [], {}

    def hook(value, total, preview, node_id=None, **_):
        calls.append((value, total, preview, node_id))
        if value in actions:
            actions[value]()
    saved = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(hook)
    yield calls, actions
    comfy.utils.set_progress_bar_global_hook(saved)


def test_start_here_trains_in_graph_and_shows_previews_loss_and_the_ab(comfy, pack, tiny_checkpoint, embeddings_dir,
                                                                       progress_hook):
    """The start-here template on a fresh install (no embedding, no images): concept images from the original
    model, training against the unlearned one, the in-graph embedding straight into the A/B. While it trains the
    node sends a preview (embedding as the positive prompt) through ComfyUI's progress hook; at the end it shows
    the loss curve and the previews as UI images."""
    import folder_paths
    from PIL import Image
    calls, _ = progress_hook
    with open(os.path.join(headless.PACK_ROOT, "workflows", "api", "start_here.json")) as handle:
        graph = json.load(handle)
    for node in graph.values():
        inputs = node["inputs"]
        if node["class_type"] == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = tiny_checkpoint[1]
        elif node["class_type"] == "EmptyLatentImage":
            inputs.update(width=64, height=64, batch_size=min(inputs["batch_size"], 2))
        elif node["class_type"] == "KSampler":
            inputs["steps"] = 2
        elif node["class_type"] == "TrainImplicitNegative":
            inputs.update(steps=2, resolution=64, name="start_here_test", overwrite=True, preview_every=1,
                          preview_steps=1)
    (train_id,) = [k for k, n in graph.items() if n["class_type"] == "TrainImplicitNegative"]
    outputs = headless.GraphRunner().run(graph)

    (ab_id,) = [k for k, n in graph.items() if n["class_type"] == "SaveImage"]
    assert len(outputs[ab_id]["images"]) == 2  # A (text negative) and B (implicit negative), one seed
    assert load_embedding(str(embeddings_dir / "start_here_test.safetensors")).metadata["steps"] == "2"
    shown = [(value, preview) for value, total, preview, node_id in calls if node_id == train_id and preview]
    assert [(value, preview[0], preview[1].size, preview[2]) for value, preview in shown] == [(1, "JPEG", (64, 64), 512)]
    files = [Image.open(os.path.join(folder_paths.get_temp_directory(), i["subfolder"], i["filename"]))
             for i in outputs[train_id]["images"]]
    assert [f.size for f in files] == [(800, 400), (64, 64), (64, 64)]  # loss curve, preview at step 1, final
    assert all(i["type"] == "temp" for i in outputs[train_id]["images"])
    assert "with the embedding as the positive prompt" in outputs[train_id]["text"][0]


def test_cancel_mid_training_keeps_the_last_good_file(comfy, pack, executor_model, concept_images, embeddings_dir,
                                                      progress_hook):
    """Cancel at step 3 of 50 (as the server's hook raises it) while overwriting an existing embedding: the
    old file stays byte for byte and nothing else appears in the folder (no partial or temporary file)."""
    import comfy.model_management
    calls, actions = progress_hook
    data = importlib.import_module("implicit_negatives.image_folder")
    images = data.load_image_folder(str(concept_images), 64).images
    model, clip, vae = executor_model
    with torch.inference_mode():
        pack["TrainImplicitNegative"].execute(model, clip, vae, **node_inputs(images, "kept", steps=1))
    before = {p.name: p.read_bytes() for p in embeddings_dir.iterdir()}
    actions[3] = lambda: comfy.model_management.interrupt_current_processing(True)
    try:
        with torch.inference_mode(), pytest.raises(comfy.model_management.InterruptProcessingException):
            pack["TrainImplicitNegative"].execute(model, clip, vae, **node_inputs(images, "kept", steps=50))
    finally:
        comfy.model_management.interrupt_current_processing(False)
    assert max(value for value, total, *_ in calls if total == 50) == 3  # it trained, then stopped at once
    assert {p.name: p.read_bytes() for p in embeddings_dir.iterdir()} == before
