"""Fixtures: the real ComfyUI engine (skipped with a reason when absent), the pack loaded into it
the way ComfyUI loads custom nodes, and a tiny SD1.5 checkpoint built on the fly."""

from __future__ import annotations

import os
import sys

import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)  # `implicit_negatives`, `trainer`, `evaluation`, `bench` by their one name

from implicit_negatives.comfyui import headless, rig  # noqa: E402


@pytest.fixture(scope="session")
def comfy():
    """ComfyUI's `nodes` module, imported for CPU use from the located source tree."""
    path, how = headless.locate_comfyui(development_copy=True)
    if path is None:
        pytest.skip(f"engine tests need ComfyUI: {how}")
    nodes = headless.import_comfyui(path)
    import folder_paths
    base = os.path.join(headless.CACHE_DIR, "test-run")
    folder_paths.set_output_directory(os.path.join(base, "output"))
    folder_paths.set_temp_directory(os.path.join(base, "temp"))
    return nodes


@pytest.fixture(scope="session")
def embeddings_dir(comfy, tmp_path_factory):
    """A fresh folder registered as a ComfyUI embeddings folder (before any CLIP is loaded)."""
    import folder_paths
    folder = tmp_path_factory.mktemp("embeddings")
    folder_paths.add_model_folder_path("embeddings", str(folder), is_default=True)
    return folder


@pytest.fixture(scope="session")
def pack(comfy, embeddings_dir):
    """The pack loaded through ComfyUI's own custom-node loader; returns {node_id: class}."""
    before = set(comfy.NODE_CLASS_MAPPINGS)
    headless.load_pack(comfy)
    return {k: v for k, v in comfy.NODE_CLASS_MAPPINGS.items() if k not in before}


@pytest.fixture(scope="session")
def tiny_checkpoint(comfy):
    """(folder, filename) of the tiny SD1.5 checkpoint, registered in ComfyUI's checkpoints folders."""
    import folder_paths
    path = rig.tiny_checkpoint_path()
    folder_paths.add_model_folder_path("checkpoints", os.path.dirname(path))
    return os.path.dirname(path), os.path.basename(path)


@pytest.fixture(scope="session")
def tiny_sd15(comfy, embeddings_dir, tiny_checkpoint):
    """(model, clip, vae) from ComfyUI's stock CheckpointLoaderSimple."""
    loader = comfy.NODE_CLASS_MAPPINGS["CheckpointLoaderSimple"]()
    return loader.load_checkpoint(tiny_checkpoint[1])


@pytest.fixture(scope="session")
def saved_text_encoders(comfy, tiny_sd15, tmp_path_factory):
    """AdvUnlearn-style text encoders of the tiny checkpoint's CLIP-L, saved by the installed transformers in both
    layouts it writes, and the reference (transformers' CLIPTextModel): ({layout: folder}, reference)."""
    from safetensors import safe_open
    import unlearned_layouts
    folders, reference = unlearned_layouts.advunlearn_text_encoders(tiny_sd15[1], tmp_path_factory.mktemp("te"))
    for layout, folder in folders.items():
        keys = list(safe_open(str(folder / "model.safetensors"), "pt").keys())
        assert all(k.startswith("text_model.") == (layout == "text_model.") for k in keys) and len(keys) == 196
    return folders, reference


@pytest.fixture(scope="session")
def pack_module(pack):
    """The pack's root package as ComfyUI imported it; reach node modules with
    ``importlib.import_module(pack_module.__name__ + ".nodes.sld_nodes")``."""
    return headless.load_pack()


@pytest.fixture(scope="module", autouse=True)
def restore_comfyui_folders():
    """ComfyUI's model folders and output directory are process-global; a test module (e.g. the runner's, which
    puts a config's folders first) must not change where a later module's nodes read or write."""
    folder_paths = sys.modules.get("folder_paths")
    if folder_paths is None:
        yield
        return
    saved = {name: (list(paths), extensions) for name, (paths, extensions) in folder_paths.folder_names_and_paths.items()}
    output, temp = folder_paths.get_output_directory(), folder_paths.get_temp_directory()
    yield
    folder_paths.folder_names_and_paths.clear()
    folder_paths.folder_names_and_paths.update(saved)
    folder_paths.filename_list_cache.clear()
    folder_paths.set_output_directory(output)
    folder_paths.set_temp_directory(temp)


@pytest.fixture(scope="module")
def one_thread():
    """For modules that sample the tiny model (``pytestmark = pytest.mark.usefixtures("one_thread")``): its kernels
    are too small to share, so extra threads only contend on a loaded CI machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def toy_world_cache():
    """The toy-world part tests: the benchmark's budget of 2 threads while the module runs, and the folder its
    trained world models and detector are cached in (``$IMPLICIT_NEGATIVES_CACHE/toy-world``, shared by both
    designs and by .ci/run's two ComfyUI versions)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield os.path.join(os.environ.get("IMPLICIT_NEGATIVES_CACHE") or os.path.expanduser("~/.cache/implicit-negatives"),
                       "toy-world")
    torch.set_num_threads(threads)
