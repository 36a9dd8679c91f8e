"""The embedding nodes inside ComfyUI's real engine, checked against ComfyUI's own `embedding:NAME` path."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from implicit_negatives.embedding_io import ImplicitNegative, load_embedding, save_embedding

from implicit_negatives.comfyui import headless, rig


def clip_text_encode(comfy, clip, text):
    return comfy.NODE_CLASS_MAPPINGS["CLIPTextEncode"]().encode(clip, text)[0]


def our_conditioning(pack, embeddings_dir, clip, name, text="", mode="in_text_chunk", strength=1.0):
    negative = pack["LoadImplicitNegative"].execute(f"{name}.safetensors", strength).result[0]
    return pack["ImplicitNegativeConditioning"].execute(clip, negative, text, mode).result[0]


def max_diff(a, b):
    assert len(a) == len(b)
    diffs = []
    for (ca, oa), (cb, ob) in zip(a, b):
        assert ca.shape == cb.shape, (ca.shape, cb.shape)
        diffs.append((ca - cb).abs().max().item())
        diffs.append((oa["pooled_output"] - ob["pooled_output"]).abs().max().item())
    return max(diffs)


@pytest.fixture(scope="module")
def planted(embeddings_dir):
    """Embeddings written by our writer: 1 and 8 vectors of CLIP-L-scale values."""
    generator = torch.Generator().manual_seed(7)
    for count in (1, 8):
        save_embedding(str(embeddings_dir / f"neg{count}.safetensors"),
                       {"clip_l": torch.randn(count, 768, generator=generator) * 0.3}, {"concept": "test"})
    return embeddings_dir


@pytest.mark.parametrize("count", [1, 8])
def test_embedding_alone_equals_comfyui_embedding_syntax(comfy, pack, tiny_sd15, planted, count):
    clip = tiny_sd15[1]
    ours = our_conditioning(pack, planted, clip, f"neg{count}")
    stock = clip_text_encode(comfy, clip, f"embedding:neg{count}")
    empty = clip_text_encode(comfy, clip, "")
    assert max_diff(ours, stock) <= 1e-6
    assert (ours[0][0] - empty[0][0]).abs().max() > 1e-2  # the embedding really is in there


@pytest.mark.parametrize("count", [1, 8])
@pytest.mark.parametrize("text", ["low quality,", "low quality", ", ".join(["blurry watermark text"] * 24)])
def test_in_chunk_mode_equals_comfyui_text_plus_embedding(comfy, pack, tiny_sd15, planted, count, text):
    """Includes a 73-token text, where the vectors must move to (or split into) a second chunk."""
    clip = tiny_sd15[1]
    ours = our_conditioning(pack, planted, clip, f"neg{count}", text=text)
    stock = clip_text_encode(comfy, clip, f"{text} embedding:neg{count}")
    assert max_diff(ours, stock) <= 1e-6


def test_strength_equals_comfyui_prompt_weight(comfy, pack, tiny_sd15, planted):
    clip = tiny_sd15[1]
    ours = our_conditioning(pack, planted, clip, "neg8", text="low quality", strength=0.6)
    stock = clip_text_encode(comfy, clip, "low quality (embedding:neg8:0.6)")
    assert max_diff(ours, stock) <= 1e-6


def test_appended_chunk_equals_conditioning_concat(comfy, pack, tiny_sd15, planted):
    clip = tiny_sd15[1]
    ours = our_conditioning(pack, planted, clip, "neg1", text="low quality", mode="appended_chunk")
    concat = comfy.NODE_CLASS_MAPPINGS["ConditioningConcat"]().concat(
        clip_text_encode(comfy, clip, "low quality"), clip_text_encode(comfy, clip, "embedding:neg1"))[0]
    assert ours[0][0].shape == (1, 154, 768)
    assert max_diff(ours, concat) <= 1e-6


def test_embedding_only_refuses_text(pack, tiny_sd15, planted):
    with pytest.raises(ValueError, match="embedding_only"):
        our_conditioning(pack, planted, tiny_sd15[1], "neg1", text="low quality", mode="embedding_only")


@pytest.fixture(scope="module")
def templated(embeddings_dir):
    """Embeddings that record their training templates: as the trainer writes them now, and as it wrote them
    before (the template set named in ``training``); and one that records none."""
    vectors = {"clip_l": torch.randn(2, 768, generator=torch.Generator().manual_seed(5)) * 0.3}
    save_embedding(str(embeddings_dir / "templated.safetensors"), vectors,
                   {"caption_templates": json.dumps(["a photo of a {}", "a rendering of a {}"])})
    save_embedding(str(embeddings_dir / "named_set.safetensors"), vectors,
                   {"training": json.dumps({"templates": "style"})})
    save_embedding(str(embeddings_dir / "no_templates.safetensors"), vectors, {"concept": "test"})
    save_embedding(str(embeddings_dir / "suffixed.safetensors"), vectors,
                   {"caption_templates": json.dumps(["a photo of a {} in the snow, high detail"])})
    return embeddings_dir


def templated_conditioning(pack, clip, name, text="", mode="in_text_chunk"):
    negative = pack["LoadImplicitNegative"].execute(f"{name}.safetensors", 1.0).result[0]
    return pack["ImplicitNegativeConditioning"].execute(clip, negative, text, mode, None, "training_template").result[0]


def same_conditioning(a, b):
    return len(a) == len(b) and all(torch.equal(ca, cb) and torch.equal(oa["pooled_output"], ob["pooled_output"])
                                    for (ca, oa), (cb, ob) in zip(a, b))


@pytest.mark.parametrize("text", ["", "low quality", ", ".join(["blurry watermark text"] * 24)])
def test_the_training_template_context_equals_comfyui_on_the_template_text(comfy, pack, tiny_sd15, templated, text):
    """context = training_template is CLIPTextEncode of the first recorded template with ``embedding:NAME`` in
    its placeholder, bit for bit; the default (bare) is not."""
    clip = tiny_sd15[1]
    phrase = "a photo of a embedding:templated"
    stock = clip_text_encode(comfy, clip, f"{text} {phrase}" if text else phrase)
    assert same_conditioning(templated_conditioning(pack, clip, "templated", text), stock)
    assert not same_conditioning(our_conditioning(pack, templated, clip, "templated", text=text), stock)
    if text:
        concat = comfy.NODE_CLASS_MAPPINGS["ConditioningConcat"]().concat(
            clip_text_encode(comfy, clip, text), clip_text_encode(comfy, clip, phrase))[0]
        assert same_conditioning(templated_conditioning(pack, clip, "templated", text, "appended_chunk"), concat)
    else:
        assert same_conditioning(templated_conditioning(pack, clip, "templated", "", "embedding_only"), stock)


@pytest.mark.parametrize("text", ["", "low quality"])
def test_a_training_template_with_words_after_the_vectors_equals_comfyui_too(comfy, pack, tiny_sd15, templated, text):
    """The words after the placeholder follow the vectors in their chunk, as ComfyUI packs ``embedding:NAME`` in
    the middle of a prompt (old code: refused, "has words after the placeholder")."""
    clip = tiny_sd15[1]
    phrase = "a photo of a embedding:suffixed in the snow, high detail"
    stock = clip_text_encode(comfy, clip, f"{text} {phrase}" if text else phrase)
    assert same_conditioning(templated_conditioning(pack, clip, "suffixed", text), stock)
    if text:
        concat = comfy.NODE_CLASS_MAPPINGS["ConditioningConcat"]().concat(
            clip_text_encode(comfy, clip, text), clip_text_encode(comfy, clip, phrase))[0]
        assert same_conditioning(templated_conditioning(pack, clip, "suffixed", text, "appended_chunk"), concat)


def test_the_template_of_older_files_comes_from_their_named_set_and_none_is_refused(comfy, pack, tiny_sd15, templated):
    clip = tiny_sd15[1]
    stock = clip_text_encode(comfy, clip, "a painting in the style of embedding:named_set")  # CAPTION_TEMPLATES style[0]
    assert same_conditioning(templated_conditioning(pack, clip, "named_set"), stock)
    with pytest.raises(ValueError, match="records no caption templates.*context = bare"):
        templated_conditioning(pack, clip, "no_templates")
    schema = pack["ImplicitNegativeConditioning"].define_schema()
    assert [i.id for i in schema.inputs][-2:] == ["model", "context"] and schema.inputs[-1].default == "bare"


def test_our_file_loads_through_comfyui_load_embed(comfy, planted):
    import comfy.sd1_clip
    stock = comfy.sd1_clip.load_embed("neg8", [str(planted)], 768, "clip_l")
    assert torch.equal(stock, load_embedding(str(planted / "neg8.safetensors")).vectors["clip_l"])


def test_wrong_width_is_an_error_naming_both_widths(comfy, pack, tiny_sd15, embeddings_dir):
    save_file({"emb_params": torch.randn(2, 1024)}, str(embeddings_dir / "sd2neg.safetensors"))
    save_file({"clip_g": torch.randn(1, 1280), "clip_l": torch.randn(1, 768)}, str(embeddings_dir / "xlneg.safetensors"))
    clip = tiny_sd15[1]
    with pytest.raises(ValueError, match=r"clip_h 1024.*clip_l 768.*SD2\.x embedding used with an SD1\.x model"):
        our_conditioning(pack, embeddings_dir, clip, "sd2neg")
    # An SDXL file carries a clip_l half, which is exactly what an SD1 CLIP needs.
    assert our_conditioning(pack, embeddings_dir, clip, "xlneg")[0][0].shape == (1, 77, 768)


def test_names_escaping_the_embeddings_folders_are_rejected(pack, tmp_path):
    outside = tmp_path / "outside.safetensors"
    save_embedding(str(outside), {"clip_l": torch.zeros(1, 768)})
    for name in ["../outside.safetensors", str(outside), "../../etc/passwd"]:
        with pytest.raises(ValueError, match="not a file inside"):
            pack["LoadImplicitNegative"].execute(name, 1.0)


def test_a_symlinked_embedding_is_listed_and_loads(pack, embeddings_dir, tmp_path):
    """A per-file symlink (one shared model store) is in the node's list, so it must load too, as in ComfyUI."""
    import folder_paths
    store = tmp_path / "store"
    store.mkdir()
    vectors = torch.randn(2, 768, generator=torch.Generator().manual_seed(11))
    save_embedding(str(store / "shared.safetensors"), {"clip_l": vectors})
    os.symlink(store / "shared.safetensors", embeddings_dir / "linked.safetensors")
    assert "linked.safetensors" in folder_paths.get_filename_list("embeddings")
    negative = pack["LoadImplicitNegative"].execute("linked.safetensors", 1.0).result[0]
    assert torch.equal(negative.embedding.vectors["clip_l"], vectors)


def test_pack_registers_its_nodes_and_embeddings_folder(comfy, pack):
    import folder_paths
    assert {"LoadImplicitNegative", "ImplicitNegativeConditioning"} <= set(pack)
    assert os.path.join(headless.PACK_ROOT, "embeddings") in folder_paths.get_folder_paths("embeddings")


def test_graph_runs_to_an_image_in_comfyui_executor(comfy, pack, tiny_checkpoint, planted):
    import json
    import folder_paths
    with open(os.path.join(headless.PACK_ROOT, "workflows", "api", "implicit_negative_txt2img.json")) as handle:
        graph = json.load(handle)
    graph["1"]["inputs"]["ckpt_name"] = tiny_checkpoint[1]
    graph["2"]["inputs"]["embedding"] = "neg8.safetensors"
    graph["8"]["inputs"]["filename_prefix"] = "in_graph_test"
    for node in graph.values():
        if node["class_type"] == "EmptyLatentImage":
            node["inputs"].update(width=64, height=64)
        if node["class_type"] == "KSampler":
            node["inputs"]["steps"] = 3
    outputs = headless.GraphRunner().run(graph)
    images = outputs["8"]["images"]
    assert len(images) == 1
    path = os.path.join(folder_paths.get_output_directory(), images[0]["subfolder"], images[0]["filename"])
    from PIL import Image
    assert Image.open(path).size == (64, 64)


def test_metadata_is_shown_and_a_foreign_text_encoder_is_warned_about(pack, pack_module, tiny_sd15, embeddings_dir, caplog):
    import importlib
    adapter = importlib.import_module("implicit_negatives.comfyui.clip")
    clip = tiny_sd15[1]
    same = adapter.clip_fingerprint(clip)
    assert same is not None
    vectors = {"clip_l": torch.randn(2, 768)}
    save_embedding(str(embeddings_dir / "same_te.safetensors"), vectors,
                   {"concept": "nudity", "unlearned_model": "duo-2000", "text_encoder_fingerprint": same})
    save_embedding(str(embeddings_dir / "other_te.safetensors"), vectors,
                   {"concept": "nudity", "unlearned_model": "advunlearn", "text_encoder_fingerprint": "0123456789abcdef"})
    output = pack["LoadImplicitNegative"].execute("same_te.safetensors", 1.0)
    negative, info = output.result
    assert "concept: nudity" in info and "unlearned_model: duo-2000" in info and "2 vector(s), SD1.x" in info
    with caplog.at_level("WARNING"):
        pack["ImplicitNegativeConditioning"].execute(clip, negative, "", "in_text_chunk")
        assert "different text encoder" not in caplog.text
        other = pack["LoadImplicitNegative"].execute("other_te.safetensors", 1.0).result[0]
        pack["ImplicitNegativeConditioning"].execute(clip, other, "", "in_text_chunk")
        assert "different text encoder" in caplog.text and "advunlearn" in caplog.text


def test_a_different_model_is_warned_about_when_connected(pack, pack_module, tiny_sd15, embeddings_dir, caplog):
    import importlib
    identity = importlib.import_module("implicit_negatives.comfyui.model_identity")
    model, clip = tiny_sd15[0], tiny_sd15[1]
    trained_on = identity.model_fingerprint(model)
    patched = model.clone()  # stands in for an unlearned variant: one attention weight replaced by a patch
    key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    patched.add_patches({key: ("set", (torch.zeros_like(model.model.state_dict()[key]),))}, 1.0)
    assert identity.model_fingerprint(patched) != trained_on
    assert identity.model_fingerprint(model.clone()) == trained_on  # clones of one model agree
    save_embedding(str(embeddings_dir / "model_bound.safetensors"), {"clip_l": torch.randn(1, 768)},
                   {"unlearned_model": "tiny-esd", "model_fingerprint": trained_on})
    negative = pack["LoadImplicitNegative"].execute("model_bound.safetensors", 1.0).result[0]
    conditioning = pack["ImplicitNegativeConditioning"]
    with caplog.at_level("WARNING"):
        same = conditioning.execute(clip, negative, "", "in_text_chunk", model).result[0]
        conditioning.execute(clip, negative, "", "in_text_chunk").result[0]  # no model: nothing to compare
        assert "learned on a different model" not in caplog.text
        other = conditioning.execute(clip, negative, "", "in_text_chunk", patched).result[0]
        assert "learned on a different model" in caplog.text and "tiny-esd" in caplog.text
    assert torch.equal(same[0][0], other[0][0])  # a warning, never a change of the conditioning


@pytest.mark.parametrize("name", ["not-trained-yet.safetensors", ""])
def test_a_missing_embedding_says_how_to_get_one(comfy, pack, tiny_checkpoint, name):
    """No embedding yet is the first state of every install: ComfyUI's own validation of a shipped template
    must stop with the pack's message (the template and the trainer command), not the combo check's bare
    "not in []"."""
    import json
    with open(os.path.join(headless.PACK_ROOT, "workflows", "api", "implicit_negative_txt2img.json")) as handle:
        graph = json.load(handle)
    graph["1"]["inputs"]["ckpt_name"] = tiny_checkpoint[1]
    graph["2"]["inputs"]["embedding"] = name
    problems, _ = headless.GraphRunner().validate(graph)
    assert len(problems) == 1 and "not in [" not in problems[0] and "not in (" not in problems[0], problems
    assert "start_here" in problems[0] and "python -m trainer --checkpoint" in problems[0], problems
    with pytest.raises(FileNotFoundError, match="start_here"):  # 0.3.64 let such names reach the node
        pack["LoadImplicitNegative"].execute(name, 1.0)
