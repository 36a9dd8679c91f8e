"""Embedding file I/O (core, no ComfyUI): every layout reads to the same tensor; bad files fail clearly."""

import os
import pickle

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from implicit_negatives.embedding_io import (
    EmbeddingFormatError, load_embedding, save_embedding, sha256_file)

VECTORS = torch.randn(3, 768, generator=torch.Generator().manual_seed(1))
G_VECTORS = torch.randn(3, 1280, generator=torch.Generator().manual_seed(2))


def write_every_layout(folder):
    """{layout name: path} of the same 3x768 vectors in each format users have."""
    paths = {}

    def st(name, tensors, metadata=None):
        paths[name] = str(folder / f"{name}.safetensors")
        save_file(tensors, paths[name], metadata=metadata)

    st("clip_l", {"clip_l": VECTORS})
    st("emb_params", {"emb_params": VECTORS})
    st("emp_params", {"emp_params": VECTORS})
    st("diffusers_token", {"<nude-ish>": VECTORS})
    paths["a1111_pt"] = str(folder / "a1111.pt")
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": VECTORS}, "name": "x", "step": 3000,
                "sd_checkpoint": "abc", "sd_checkpoint_name": "sd14"}, paths["a1111_pt"])
    paths["diffusers_bin"] = str(folder / "learned_embeds.bin")
    torch.save({"<concept>": VECTORS}, paths["diffusers_bin"])
    return paths


def test_every_layout_loads_to_the_same_tensor(tmp_path):
    paths = write_every_layout(tmp_path)
    assert len(paths) == 6
    for layout, path in paths.items():
        loaded = load_embedding(path)
        assert set(loaded.vectors) == {"clip_l"}, layout
        assert torch.equal(loaded.vectors["clip_l"], VECTORS), layout


def test_single_vector_diffusers_bin_becomes_one_token(tmp_path):
    path = tmp_path / "learned_embeds.bin"
    torch.save({"<c>": VECTORS[0]}, path)
    assert load_embedding(str(path)).vectors["clip_l"].shape == (1, 768)


def test_sdxl_dual_file_and_sd2_width(tmp_path):
    save_file({"clip_l": VECTORS, "clip_g": G_VECTORS}, str(tmp_path / "xl.safetensors"))
    xl = load_embedding(str(tmp_path / "xl.safetensors"))
    assert xl.family == "SDXL" and torch.equal(xl.vectors["clip_g"], G_VECTORS)
    save_file({"emb_params": torch.zeros(2, 1024)}, str(tmp_path / "sd2.safetensors"))
    assert load_embedding(str(tmp_path / "sd2.safetensors")).family == "SD2.x"


@pytest.mark.parametrize("tensors, message", [
    ({"emb_params": torch.zeros(2, 1000)}, "1000 wide"),
    ({"emb_params": torch.full((2, 768), float("nan"))}, "NaN"),
    ({"emb_params": torch.zeros(2, 3, 768)}, "shape"),
    ({"emb_params": torch.zeros(0, 768)}, "zero vectors"),
    ({"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(3, 1280)}, "disagree"),
    ({"clip_l": torch.zeros(2, 1280)}, "must be 768"),
])
def test_invalid_tensors_give_clear_errors(tmp_path, tensors, message):
    path = str(tmp_path / "bad.safetensors")
    save_file(tensors, path)
    with pytest.raises(EmbeddingFormatError, match=message):
        load_embedding(path)


def test_empty_and_truncated_files(tmp_path):
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(EmbeddingFormatError, match="empty"):
        load_embedding(str(empty))
    good = tmp_path / "good.safetensors"
    save_file({"clip_l": VECTORS}, str(good))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(EmbeddingFormatError, match="truncated"):
        load_embedding(str(truncated))
    truncated_pt = tmp_path / "truncated.pt"
    torch.save({"string_to_param": {"*": VECTORS}}, truncated_pt)
    truncated_pt.write_bytes(truncated_pt.read_bytes()[:200])
    with pytest.raises(EmbeddingFormatError, match="truncated"):
        load_embedding(str(truncated_pt))


class CodePayload:
    """Unpickling this calls os.system: what a malicious embedding does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_code_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump({"string_to_param": {"*": VECTORS}, "x": CodePayload(str(marker))}, handle)
    # The payload is real: plain pickle would run it.
    with open(path, "rb") as handle:
        pickle.load(handle)
    assert marker.exists()
    marker.unlink()
    with pytest.raises(EmbeddingFormatError, match="Refusing"):
        load_embedding(str(path))
    assert not marker.exists()


def test_writer_metadata_and_atomic_replace(tmp_path):
    path = str(tmp_path / "sub" / "neg.safetensors")
    digest = save_embedding(path, {"clip_l": VECTORS}, {"concept": "nudity", "steps": 3000, "loss": 0.125})
    assert digest == sha256_file(path)
    assert [p for p in os.listdir(tmp_path / "sub")] == ["neg.safetensors"]  # no temp file left behind
    with safe_open(path, framework="pt") as handle:
        meta = handle.metadata()
        assert list(handle.keys()) == ["clip_l"]
    assert meta["intended_use"] == "negative" and meta["concept"] == "nudity"
    assert meta["steps"] == "3000" and meta["vectors"] == "3" and meta["model_family"] == "SD1.x"
    loaded = load_embedding(path)
    assert torch.equal(loaded.vectors["clip_l"], VECTORS) and loaded.metadata["loss"] == "0.125"
    # byte-identical output for identical input (sorted metadata)
    again = str(tmp_path / "again.safetensors")
    assert save_embedding(again, {"clip_l": VECTORS}, {"loss": 0.125, "steps": 3000, "concept": "nudity"}) == digest


def test_failed_write_keeps_the_old_file(tmp_path):
    path = str(tmp_path / "neg.safetensors")
    first = save_embedding(path, {"clip_l": VECTORS})
    with pytest.raises(EmbeddingFormatError):
        save_embedding(path, {"clip_l": torch.full((1, 768), float("inf"))})
    assert sha256_file(path) == first and os.listdir(tmp_path) == ["neg.safetensors"]
