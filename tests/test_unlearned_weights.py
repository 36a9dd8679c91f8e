"""Unlearned weights in the layouts the methods publish, through the pack's nodes, the trainer's loader and the
evaluation runner's graphs, on the tiny SD1.5 checkpoint. Each file is written by the method's own saving code
path (diffusers + peft, ``unlearned_layouts``); the oracle is diffusers' UNet forward with the file's weights."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import unlearned_layouts as layouts
from implicit_negatives.comfyui import headless
from implicit_negatives.embedding_io import save_embedding


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def weights(comfy):
    from implicit_negatives.comfyui import weights
    return weights


@pytest.fixture(scope="module")
def folders(comfy, tmp_path_factory):
    """Fresh models/diffusion_models, models/loras and models/text_encoders folders, registered with ComfyUI."""
    import folder_paths
    found = {}
    for kind in ("diffusion_models", "loras", "text_encoders"):
        found[kind] = tmp_path_factory.mktemp(kind)
        folder_paths.add_model_folder_path(kind, str(found[kind]), is_default=True)
    return found


@pytest.fixture(scope="module")
def conds(comfy, tiny_sd15):
    encode = comfy.NODE_CLASS_MAPPINGS["CLIPTextEncode"]().encode
    return encode(tiny_sd15[1], "a photo of a person")[0], encode(tiny_sd15[1], "")[0]


def ksample(comfy, model, conds):
    return comfy.NODE_CLASS_MAPPINGS["KSampler"]().sample(
        model, 3, 3, 7.5, "euler", "normal", conds[0], conds[1], {"samples": torch.zeros(1, 4, 8, 8)})[0]["samples"]


def unet_outputs(model, diffusers_unet):
    """(ComfyUI's UNet output, diffusers' output) for one fixed input: equal when the weights agree."""
    import comfy.model_management
    generator = torch.Generator().manual_seed(1)
    x, t = torch.randn(1, 4, 8, 8, generator=generator), torch.tensor([500.0])
    context = torch.randn(1, 77, 768, generator=generator)
    comfy.model_management.load_models_gpu([model], force_full_load=True)
    with torch.no_grad():
        ours = model.model.diffusion_model(x, timesteps=t, context=context).float()
        theirs = diffusers_unet(x, t, encoder_hidden_states=context).sample
    return ours, theirs


def assert_same_unet(model, diffusers_unet):
    ours, theirs = unet_outputs(model, diffusers_unet)
    assert (ours - theirs).abs().max() <= 1e-5 * max(theirs.abs().max(), 1.0)


def assert_applied(comfy, base, patched, conds, diffusers_unet=None):
    """The patched model samples something else (and, given the oracle, computes what diffusers computes with the
    file's weights); the shared base model is unchanged: same patches, same samples before and after."""
    patches = {k: list(v) for k, v in base.patches.items()}
    first = ksample(comfy, base, conds)
    assert (ksample(comfy, patched, conds) - first).abs().max() > 1e-3
    if diffusers_unet is not None:
        assert_same_unet(patched, diffusers_unet)
    assert torch.equal(ksample(comfy, base, conds), first)
    assert {k: list(v) for k, v in base.patches.items()} == patches


# --------------------------------------------------------------------------- LoRAs


def test_duo_lora_applies_fully_and_equals_peft(comfy, pack, weights, tiny_sd15, conds, folders):
    """DUO's pytorch_lora_weights.safetensors (peft -> diffusers keys), which ComfyUI's own loader skips."""
    from comfy.sd import load_lora_for_models
    model, clip, _ = tiny_sd15
    unet = layouts.diffusers_unet(model)
    path = layouts.duo_lora(unet, str(folders["loras"] / "duo"))
    stock, _ = load_lora_for_models(model, clip, load_file(path), 1.0, 1.0)  # what the stock Load LoRA does
    assert stock.patches == model.patches  # not one patch: it would sample the base model
    node = pack["LoadUnlearnedLoRA"].execute(model, clip, "duo/pytorch_lora_weights.safetensors", 1.0, 1.0, False)
    patched, new_clip, report = node.result
    assert report == "pytorch_lora_weights.safetensors: LoRA, diffusers/peft keys, 48/48 tensors used"
    assert node.ui["text"] == [report] and new_clip is not clip
    assert_applied(comfy, model, patched, conds, unet)
    half, _, _ = weights.apply_lora(model, clip, path, 0.5)
    assert half.patches[next(iter(set(half.patches) - set(model.patches)))][-1][0] == 0.5


def test_peft_lora_alpha_from_diffusers_metadata(weights, tiny_sd15, tmp_path):
    """lora_alpha != rank is recorded only in diffusers' lora_adapter_metadata (ComfyUI would assume alpha = rank)."""
    model, clip, _ = tiny_sd15
    unet = layouts.diffusers_unet(model)
    path = layouts.duo_lora(unet, str(tmp_path), lora_alpha=8, with_metadata=True)
    patched, _, report = weights.apply_lora(model, clip, path)
    assert (report.matched, report.total) == (48, 48)
    assert_same_unet(patched, unet)


def test_kohya_spm_lora_patches_unet_and_text_encoder(comfy, pack, tiny_sd15, conds, folders):
    model, clip, _ = tiny_sd15
    unet = layouts.diffusers_unet(model)
    layouts.spm_lora(unet, str(folders["loras"] / "spm.safetensors"), text_encoder_layers=1)
    patched, new_clip, report = pack["LoadUnlearnedLoRA"].execute(model, clip, "spm.safetensors", 1.0, 1.0,
                                                                  False).result
    assert report == "spm.safetensors: LoRA, 120/120 tensors used"  # (36 UNet + 4 text-encoder modules) x 3
    assert len(new_clip.patcher.patches) == len(clip.patcher.patches) + 4
    assert_applied(comfy, model, patched, conds)


def test_lora_with_tensors_that_fit_nothing_needs_allow_partial(weights, tiny_sd15, tmp_path):
    model, clip, _ = tiny_sd15
    path = layouts.duo_lora(layouts.diffusers_unet(model), str(tmp_path))
    state = load_file(path)
    state["unet.mid_block.attentions.0.proj_in.lora.down.weight"] = torch.zeros(4, 320)  # the tiny UNet has none
    save_file(state, path)
    with pytest.raises(weights.WeightLayoutError,
                       match=r"1 of its 49 tensors do not fit .*unet\.mid_block\.attentions\.0\.proj_in.*allow_part"):
        weights.apply_lora(model, clip, path)
    _, _, report = weights.apply_lora(model, clip, path, allow_partial=True)
    assert report.describe().endswith("48/49 tensors used; unused (allowed as partial): "
                                      "unet.mid_block.attentions.0.proj_in.lora.down.weight")


def test_lora_for_another_architecture_is_an_error(weights, tiny_sd15, tmp_path):
    """An SD2-width LoRA on SD1: ComfyUI matches the names, then only logs that it cannot merge the shapes."""
    model, clip, _ = tiny_sd15
    path = layouts.duo_lora(layouts.diffusers_unet(cross_attention_dim=1024), str(tmp_path))
    with pytest.raises(weights.WeightLayoutError, match=r"cannot merge 6 of its patches.*attn2\.to_k.*"
                                                        r"different architecture"):
        weights.apply_lora(model, clip, path, allow_partial=True)


# --------------------------------------------------------------------------- UNet files


@pytest.mark.parametrize("method", ["esd-x", "esd-u", "uce"], ids=["new-esd-x", "new-esd-u", "new-uce"])
def test_partial_diffusers_unet_files(comfy, pack, tiny_sd15, conds, folders, method):
    """New ESD and UCE code: only the edited weights, diffusers names (ESD in bfloat16)."""
    model = tiny_sd15[0]
    unet = layouts.diffusers_unet(model)
    name = f"{method}.safetensors"
    path = str(folders["diffusion_models"] / name)
    layouts.uce_partial(unet, path) if method == "uce" else layouts.esd_partial(unet, path, method)
    patched, report = pack["LoadUnlearnedWeights"].execute(model, name, False).result
    edited = load_file(path)
    assert report == (f"{name}: partial ({len(edited)} of 122 weights) UNet, diffusers keys, "
                      f"{len(edited)}/{len(edited)} tensors used")
    unet.load_state_dict({k: v.float() for k, v in edited.items()}, strict=False)
    assert_applied(comfy, model, patched, conds, unet)


@pytest.mark.parametrize("layout", ["torch-save-diffusers", "mace-pipeline", "ldm-keys"])
def test_full_unet_files(comfy, pack, tiny_sd15, conds, folders, layout):
    """The whole UNet: torch.save(unet.state_dict()) (old ESD's diffusers export, old UCE, RECE), MACE's
    save_pretrained pipeline folder, and LDM keys under ``model.diffusion_model.`` (ComfyUI's own UNet saves)."""
    from comfy.utils import unet_to_diffusers
    model = tiny_sd15[0]
    unet = layouts.perturb_all(layouts.diffusers_unet(model))
    folder = folders["diffusion_models"] / layout
    folder.mkdir()
    if layout == "torch-save-diffusers":
        path = layouts.full_unet_pt(unet, str(folder / "erased-nudity.pt"))
    elif layout == "mace-pipeline":
        path = layouts.mace_pipeline_unet(unet, str(folder))
    else:
        to_ldm = unet_to_diffusers(model.model.model_config.unet_config)
        path = str(folder / "unet.safetensors")
        save_file({"model.diffusion_model." + to_ldm[k]: v for k, v in unet.state_dict().items()}, path)
    patched, report = pack["LoadUnlearnedWeights"].execute(model, os.path.relpath(path, folders["diffusion_models"]),
                                                           False).result
    keys = "LDM keys" if layout == "ldm-keys" else "diffusers keys"
    assert report == f"{os.path.basename(path)}: full UNet, {keys}, 122/122 tensors used"
    assert_applied(comfy, model, patched, conds, unet)


@pytest.mark.parametrize("lightning", [False, True], ids=["old-esd-compvis", "selective-amnesia"])
def test_whole_compvis_checkpoint_loads_as_a_checkpoint_not_a_unet(comfy, pack, weights, tiny_sd15, tiny_checkpoint,
                                                                   conds, folders, lightning):
    """Old ESD's compvis-*.pt is torch.save(model.state_dict()) of the whole LatentDiffusion; SA's is a Lightning
    .ckpt with it under "state_dict". Both are checkpoints (CheckpointLoaderSimple / --checkpoint)."""
    state = load_file(os.path.join(*tiny_checkpoint))
    generator = torch.Generator().manual_seed(2)
    state = {k: layouts.perturbed(v.float(), generator, 0.01).half() if k.startswith("model.diffusion_model.") else v
             for k, v in state.items()}
    path = str(folders["diffusion_models"] / ("sa.ckpt" if lightning else "compvis-nudity.pt"))
    torch.save({"state_dict": state, "global_step": 10} if lightning else state, path)
    unlearned, _, _ = weights.load_checkpoint(path)
    assert_applied(comfy, tiny_sd15[0], unlearned, conds)
    with pytest.raises(weights.WeightLayoutError, match=r"of its \d+ tensors do not fit .*cond_stage_model.*"
                                                        r"whole checkpoint: load it with CheckpointLoaderSimple"):
        pack["LoadUnlearnedWeights"].execute(tiny_sd15[0], os.path.basename(path), False)


def test_unet_file_for_another_architecture_is_an_error(pack, weights, tiny_sd15, folders):
    save_file(layouts.diffusers_unet(cross_attention_dim=1024).state_dict(),
              str(folders["diffusion_models"] / "sd2-unet.safetensors"))
    with pytest.raises(weights.WeightLayoutError, match=r"attn2\.to_k\.weight has shape \(320, 1024\) but the "
                                                        r"model's .* is \(320, 768\).*different architecture"):
        pack["LoadUnlearnedWeights"].execute(tiny_sd15[0], "sd2-unet.safetensors", True)


def test_unrelated_files_are_errors_that_name_the_right_loader(pack, weights, tiny_sd15, folders):
    model, clip, _ = tiny_sd15
    embedding = {"clip_l": torch.randn(1, 768)}
    save_embedding(str(folders["diffusion_models"] / "embedding.safetensors"), embedding, {})
    save_embedding(str(folders["loras"] / "embedding.safetensors"), embedding, {})
    layouts.duo_lora(layouts.diffusers_unet(model), str(folders["diffusion_models"] / "lora"))
    save_file(layouts.diffusers_unet(model).state_dict(), str(folders["loras"] / "unet.safetensors"))
    unet_node, lora_node = pack["LoadUnlearnedWeights"], pack["LoadUnlearnedLoRA"]
    for allow_partial in (False, True):
        with pytest.raises(weights.WeightLayoutError, match=r"none of its 1 tensors .*\) matches this checkpoint"):
            unet_node.execute(model, "embedding.safetensors", allow_partial)
        with pytest.raises(weights.WeightLayoutError, match=r"none of its 48 tensors .*\(a LoRA goes into Load "
                                                            "Unlearned LoRA"):
            unet_node.execute(model, "lora/pytorch_lora_weights.safetensors", allow_partial)
        with pytest.raises(weights.WeightLayoutError, match=r"none of its 1 tensors .*\) is a LoRA for this model"):
            lora_node.execute(model, clip, "embedding.safetensors", 1.0, 1.0, allow_partial)
        with pytest.raises(weights.WeightLayoutError, match="none of its 122 tensors .*a UNet state dict goes into "
                                                            "Load Unlearned Weights"):
            lora_node.execute(model, clip, "unet.safetensors", 1.0, 1.0, allow_partial)


# --------------------------------------------------------------------------- text encoders


@pytest.fixture(scope="module")
def text_encoder_names(comfy, saved_text_encoders, folders):
    """{layout: the name Load Unlearned Text Encoder lists} for the transformers-saved encoders."""
    import shutil
    names = {}
    for layout, folder in saved_text_encoders[0].items():
        shutil.copytree(folder, folders["text_encoders"] / folder.name)
        names[layout] = f"{folder.name}/model.safetensors"
    return names


@pytest.mark.parametrize("layout", ["text_model.", "no prefix"])
def test_advunlearn_text_encoder_node_encodes_as_the_reference(comfy, pack, tiny_sd15, saved_text_encoders,
                                                               text_encoder_names, layout):
    """Either layout transformers writes; a stock Load CLIP runs the unprefixed one uninitialised (NaN)."""
    clip = tiny_sd15[1]
    encode = comfy.NODE_CLASS_MAPPINGS["CLIPTextEncode"]().encode
    before = encode(clip, "a photo of a cat")[0][0][0]
    node = pack["LoadUnlearnedTextEncoder"].execute(clip, text_encoder_names[layout])
    replaced, report = node.result
    keys = "text_model.* keys" if layout == "text_model." else "keys without text_model."
    assert report == f"model.safetensors: text encoder, {keys}, 196/196 tensors used" and node.ui["text"] == [report]
    layouts.assert_encodes_as(replaced, saved_text_encoders[1])
    assert replaced is not clip and torch.equal(encode(clip, "a photo of a cat")[0][0][0], before)
    last_layer = clip.clone()
    last_layer.clip_layer(-2)  # Set CLIP Last Layer before the node is kept
    penultimate = pack["LoadUnlearnedTextEncoder"].execute(last_layer, text_encoder_names[layout]).result[0]
    assert (encode(penultimate, "a photo")[0][0][0] - encode(last_layer, "a photo")[0][0][0]).abs().max() < 1e-2


def test_text_encoder_node_refuses_a_truncated_file_or_a_patched_clip(pack, weights, tiny_sd15, saved_text_encoders,
                                                                     text_encoder_names, folders):
    model, clip, _ = tiny_sd15
    cut = layouts.truncated_text_encoder(saved_text_encoders[0]["no prefix"],
                                         str(folders["text_encoders"] / "truncated.safetensors"))
    with pytest.raises(weights.WeightLayoutError, match=r"truncated.safetensors: 192 of the 196 weights") as refused:
        pack["LoadUnlearnedTextEncoder"].execute(clip, "truncated.safetensors")
    assert len(cut) == 4 and all(key in str(refused.value) for key in cut)
    layouts.spm_lora(layouts.diffusers_unet(model), str(folders["loras"] / "spm-te.safetensors"), text_encoder_layers=1)
    _, with_lora, _ = pack["LoadUnlearnedLoRA"].execute(model, clip, "spm-te.safetensors", 1.0, 1.0, False).result
    with pytest.raises(weights.WeightLayoutError, match="4 weight patches .* load the text encoder first, then the"):
        pack["LoadUnlearnedTextEncoder"].execute(with_lora, text_encoder_names["text_model."])


# --------------------------------------------------------------------------- trainer and evaluation runner


def test_trainer_lora_flag_applies_duo_and_refuses_a_partial_fit(weights, tiny_checkpoint, tmp_path):
    from trainer import cli
    path = layouts.duo_lora(layouts.diffusers_unet(), str(tmp_path))
    checkpoint = os.path.join(*tiny_checkpoint)
    _, _, _, reports = weights.load_unlearned_model(checkpoint, loras=cli.parse_loras([f"{path}:0.5"]))
    assert reports[0].describe() == "pytorch_lora_weights.safetensors: LoRA, diffusers/peft keys, 48/48 tensors used"
    state = load_file(path)
    state["unet.not_a_module.lora.down.weight"] = torch.zeros(1)
    save_file(state, path)
    (tmp_path / "images").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "images" / "a.png")  # the images are checked before the model loads
    args = ["--checkpoint", checkpoint, "--lora", path, "--images", str(tmp_path / "images"), "--resolution", "64",
            "--output", str(tmp_path / "x")]
    assert cli.build_parser().parse_args(args + ["--allow-partial"]).allow_partial
    with pytest.raises(SystemExit, match=r"error: .*1 of its 49 tensors do not fit .*unet\.not_a_module"):
        cli.main(args)


def test_evaluation_graphs_load_unlearned_weights_with_the_same_nodes(comfy, pack, tiny_sd15, tiny_checkpoint, folders,
                                                                    text_encoder_names, tmp_path):
    """[models.*] tables with unet + lora, and with a text_encoder (transformers 5 layout: the stock CLIPLoader
    runs it uninitialised), run in ComfyUI's executor through the pack's loader nodes."""
    import folder_paths
    from evaluation import graphs, protocol
    model = tiny_sd15[0]
    layouts.duo_lora(layouts.diffusers_unet(model), str(folders["loras"] / "eval-duo"))
    layouts.esd_partial(layouts.diffusers_unet(model), str(folders["diffusion_models"] / "eval-esd.safetensors"))
    (tmp_path / "p.csv").write_text("prompt,seed\na photo,1\n")
    (tmp_path / "c.toml").write_text(f"""
[run]
prompts = "p.csv"
width = 64
height = 64
steps = 2
[models.base]
checkpoint = "{tiny_checkpoint[1]}"
[models.unlearned]
checkpoint = "{tiny_checkpoint[1]}"
unet = "eval-esd.safetensors"
lora = "eval-duo/pytorch_lora_weights.safetensors"
[models.advunlearn]
checkpoint = "{tiny_checkpoint[1]}"
text_encoder = "{text_encoder_names["no prefix"]}"
[[rows]]
name = "base"
model = "base"
[[rows]]
name = "unlearned"
model = "unlearned"
[[rows]]
name = "advunlearn"
model = "advunlearn"
""")
    config = protocol.load_config(str(tmp_path / "c.toml"))
    runner, pixels, built = headless.GraphRunner(), {}, {}
    for row in config.rows:
        built[row.name] = graphs.build_item_graph(config, row, protocol.PromptRecord(0, "a photo", 1, 7.5),
                                                  lambda f, v: v, f"eval-{row.slug}")
        image = runner.run(built[row.name])[graphs.SAVE_NODE]["images"][0]
        pixels[row.name] = np.asarray(Image.open(os.path.join(folder_paths.get_output_directory(), image["subfolder"],
                                                              image["filename"]))).astype(int)
    unlearned = built["unlearned"]
    assert unlearned["unet"]["class_type"] == "LoadUnlearnedWeights"
    assert unlearned["lora"]["class_type"] == "LoadUnlearnedLoRA"
    assert np.abs(pixels["base"] - pixels["unlearned"]).max() > 0
    assert built["advunlearn"]["te"]["class_type"] == "LoadUnlearnedTextEncoder"
    assert np.array_equal(pixels["base"], pixels["advunlearn"])  # the file holds the checkpoint's own CLIP-L
