"""LoadNegationSet and the trainer's exported negation set, in real ComfyUI on the tiny checkpoint: a folder loads
through the trainer's own reader and checks, the set a training run exports (CLI and node) equals the set loaded
from the same folder, encoded sets are cached, and every unusable input is refused with the fix."""

from __future__ import annotations

import importlib
import json
import os

import pytest
import torch
from PIL import Image

from implicit_negatives.embedding_io import save_embedding
from implicit_negatives.negation_set_io import load_negation_set, save_negation_set
from implicit_negatives.safe_denoiser import NegationSet, NegationSetError

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_output")


@pytest.fixture(scope="module")
def fresh_output(comfy, tmp_path_factory):
    """An empty ComfyUI output folder, so LoadNegationSet's cache starts empty (conftest restores the old one)."""
    import folder_paths
    folder_paths.set_output_directory(str(tmp_path_factory.mktemp("negation-output")))


def write_images(folder, count=3, size=64, seed=1):
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    for i in range(count):
        pixels = (torch.rand(size, size, 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"concept_{i}.png")
    return folder


@pytest.fixture(scope="module")
def concept_images(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("negation") / "images")


def load(pack, vae, path, resolution=64, skip_bad_images=False):
    output = pack["LoadNegationSet"].execute(str(path), vae, resolution, skip_bad_images)
    return output.result[0], output.ui["text"][0]


@pytest.fixture(scope="module")
def exported(comfy, pack, tiny_checkpoint, tiny_sd15, concept_images, embeddings_dir):
    """One CLI training run with --export-negation-set, and one node run with export_negation_set."""
    cli = importlib.import_module("trainer.cli")
    work = embeddings_dir.parent / "negation-work"
    assert cli.main(["--checkpoint", os.path.join(*tiny_checkpoint), "--images", str(concept_images),
                     "--resolution", "64", "--steps", "1", "--no-preview", "--export-negation-set", "--overwrite",
                     "--output", str(embeddings_dir / "cli_negset.safetensors"), "--work-dir", str(work)]) == 0
    folder = importlib.import_module("implicit_negatives.image_folder").load_image_folder(str(concept_images), 64)
    model, clip, vae = tiny_sd15
    with torch.inference_mode():
        pack["TrainImplicitNegative"].execute(
            model, clip, vae, images=folder.images, name="node_negset", steps=1, learning_rate=0.005, num_vectors=1,
            init_word="cat", seed=0, resolution=64, templates="object", batch_size=1, concept="", overwrite=True,
            gradient_checkpointing=False, export_negation_set=True)
    return embeddings_dir / "cli_negset.negation_set.safetensors", embeddings_dir / "node_negset.negation_set.safetensors"


def test_the_set_a_training_run_exports_equals_the_set_loaded_from_its_folder(pack, pack_module, tiny_sd15,
                                                                              concept_images, exported):
    from implicit_negatives.embedding_io import sha256_file
    vae = tiny_sd15[2]
    from_folder, receipt = load(pack, vae, concept_images)
    assert from_folder.latents.shape == (3, 4, 8, 8) and receipt.startswith("3 images used")
    cli_file, node_file = exported
    from_cli = load_negation_set(str(cli_file))
    assert torch.equal(from_cli.latents, from_folder.latents)
    assert from_cli.provenance == from_folder.provenance  # image names and sha256, VAE fingerprint, resolution
    assert [tuple(entry) for entry in json.loads(from_cli.provenance["images"])] == [
        (f"concept_{i}.png", sha256_file(str(concept_images / f"concept_{i}.png"))) for i in range(3)]
    assert from_cli.provenance["resolution"] == "64" and len(from_cli.provenance["vae_fingerprint"]) == 16
    from_node = load_negation_set(str(node_file))
    assert torch.equal(from_node.latents, from_folder.latents)
    assert from_node.provenance["vae_fingerprint"] == from_cli.provenance["vae_fingerprint"]
    # LoadNegationSet reads the export too: by absolute path, or by name from the embeddings folder.
    for path in (cli_file, cli_file.name):
        loaded, text = load(pack, vae, path)
        assert torch.equal(loaded.latents, from_folder.latents) and "cli_negset.negation_set.safetensors" in text
    # An exported set is not an embedding: the embedding loader does not list it.
    listed = importlib.import_module(pack_module.__name__ + ".nodes.embedding_nodes").embedding_choices()
    assert "cli_negset.safetensors" in listed and cli_file.name not in listed


def test_an_encoded_folder_is_cached_and_a_changed_image_is_encoded_again(pack, tiny_sd15, tmp_path, monkeypatch):
    folder = write_images(tmp_path / "cached", count=2, seed=5)
    vae = tiny_sd15[2]
    first, receipt = load(pack, vae, folder)
    assert "cache" not in receipt
    glue = importlib.import_module("implicit_negatives.comfyui.negation_sets")
    monkeypatch.setattr(glue, "encode_images", lambda *a: pytest.fail("the cached set was encoded again"))
    again, receipt = load(pack, vae, folder)
    assert receipt.endswith("(latents from the cache)") and torch.equal(again.latents, first.latents)
    stamp = pack["LoadNegationSet"].fingerprint_inputs(str(folder), vae, 64, False)
    write_images(folder, count=1, seed=9)  # concept_0.png replaced
    assert pack["LoadNegationSet"].fingerprint_inputs(str(folder), vae, 64, False) != stamp
    monkeypatch.undo()
    changed, receipt = load(pack, vae, folder)
    assert "cache" not in receipt and not torch.equal(changed.latents[0], first.latents[0])
    assert torch.equal(changed.latents[1], first.latents[1])


def test_unusable_folders_and_files_are_refused_with_the_fix(pack, tiny_sd15, concept_images, exported, tmp_path):
    vae = tiny_sd15[2]
    (tmp_path / "empty").mkdir()
    with pytest.raises(NegationSetError, match="holds no images"):
        load(pack, vae, tmp_path / "empty")
    with pytest.raises(NegationSetError, match="not found: give a folder of images"):
        load(pack, vae, tmp_path / "no-such-folder")
    bad = write_images(tmp_path / "bad", count=2)
    (bad / "broken.jpg").write_bytes(b"not an image")
    Image.fromarray(torch.zeros(20, 20, 3, dtype=torch.uint8).numpy()).save(bad / "small.png")
    with pytest.raises(NegationSetError) as error:
        load(pack, vae, bad)
    message = str(error.value)
    assert "2 of 4 files" in message and "broken.jpg" in message and "small.png" in message
    assert "skip_bad_images" in message and "--skip-bad-images" not in message
    kept, receipt = load(pack, vae, bad, skip_bad_images=True)
    assert kept.latents.shape[0] == 2 and "skipped 2" in receipt
    with pytest.raises(NegationSetError, match="multiple of 8"):
        load(pack, vae, concept_images, resolution=68)

    cli_file = exported[0]
    with pytest.raises(NegationSetError, match="latents of 64 px images, not 512: set resolution to 64"):
        load(pack, vae, cli_file, resolution=512)
    good = load_negation_set(str(cli_file))
    foreign = tmp_path / "foreign.negation_set.safetensors"
    save_negation_set(str(foreign), NegationSet(good.latents, good.source,
                                                {**good.provenance, "vae_fingerprint": "0" * 16}))
    with pytest.raises(NegationSetError, match="encoded by another VAE"):
        load(pack, vae, foreign)
    wide = tmp_path / "wide.negation_set.safetensors"
    save_negation_set(str(wide), NegationSet(torch.zeros(2, 16, 8, 8), "16 channels", good.provenance))
    with pytest.raises(NegationSetError, match="16-channel latents, but this VAE encodes 4"):
        load(pack, vae, wide)
    embedding = tmp_path / "embedding.safetensors"
    save_embedding(str(embedding), {"clip_l": torch.zeros(1, 768)})
    with pytest.raises(NegationSetError, match="not a negation-set file"):
        load(pack, vae, embedding)
    (tmp_path / "truncated.negation_set.safetensors").write_bytes(cli_file.read_bytes()[:100])
    with pytest.raises(NegationSetError, match="Cannot read"):
        load(pack, vae, tmp_path / "truncated.negation_set.safetensors")
