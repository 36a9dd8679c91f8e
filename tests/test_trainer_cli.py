"""``python -m trainer`` on the tiny SD1.5 checkpoint: weight layouts, end-to-end output, kill + resume."""

import importlib
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import unlearned_layouts as layouts
from implicit_negatives.embedding_io import load_embedding
from implicit_negatives.inversion import load_state

from implicit_negatives.comfy import headless, rig


@pytest.fixture(scope="module")
def weights(pack_module):
    return importlib.import_module("implicit_negatives.comfy.weights")


@pytest.fixture(scope="module")
def cli(pack_module):
    return importlib.import_module("trainer.cli")


def diffusers_unet_state(model, only=lambda key: True, scale=1.0):
    """The tiny model's UNet under diffusers key names (what ESD/UCE/RECE save), optionally filtered."""
    import comfy.utils
    ldm_state = model.model.diffusion_model.state_dict()
    mapping = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    return {d: (ldm_state[k].float() * scale).contiguous() for d, k in mapping.items() if k in ldm_state and only(d)}


def test_partial_diffusers_unet_is_merged_as_patches_with_a_report(weights, tiny_sd15, tmp_path):
    model = tiny_sd15[0]
    partial = diffusers_unet_state(model, lambda d: "attn2.to_k" in d or "attn2.to_v" in d, scale=0.0)
    partial["not.a.unet.key"] = torch.zeros(3)
    path = str(tmp_path / "esd-x-strict.safetensors")
    save_file(partial, path)
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    with pytest.raises(weights.WeightLayoutError, match=rf"1 of its {len(partial)} tensors do not fit .*not\.a\.unet"):
        weights.apply_unet_weights(model, path)
    patched, report = weights.apply_unet_weights(model, path, allow_partial=True)
    assert report.layout == f"partial ({len(partial) - 1} of 122 weights) UNet, diffusers keys"
    assert (report.matched, report.total) == (len(partial) - 1, len(partial)) and report.matched >= 4
    assert report.unmatched == ["not.a.unet.key"]
    assert f"{report.matched}/{report.total} tensors used" in report.describe()
    import comfy.utils
    ldm = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    assert set(patched.patches) - set(model.patches) == {"diffusion_model." + ldm[d] for d in partial if d in ldm}
    key = next(k for k in patched.patches if "attn2.to_k" in k)
    assert patched.patches[key][-1][1][0] == "set"  # (strength, ("set", (weight,)), ...) in ComfyUI's patch list
    assert all(torch.equal(before[k], v) for k, v in model.model.state_dict().items())  # the shared model is untouched


def test_full_diffusers_unet_and_mismatches(weights, tiny_sd15, tmp_path):
    model = tiny_sd15[0]
    full = diffusers_unet_state(model)
    patches, report = weights.unet_patches(model, full, "full.pt")
    assert report.layout == "full UNet, diffusers keys" and report.matched == len(model.model.diffusion_model.state_dict())
    with pytest.raises(weights.WeightLayoutError, match="none of its 2 tensors"):
        weights.unet_patches(model, {"foo.weight": torch.zeros(1), "bar": torch.zeros(1)}, "other.safetensors")
    key = next(k for k in full if "attn2.to_k" in k)
    with pytest.raises(weights.WeightLayoutError, match="different architecture"):
        weights.unet_patches(model, {key: torch.zeros(320, 1024)}, "sd2.safetensors")


def test_lora_is_applied_through_comfyui_with_a_report(weights, tiny_sd15, tmp_path):
    model, clip, _ = tiny_sd15
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    lora = {f"{name}.lora_down.weight": torch.randn(1, 320) * 0.01, f"{name}.lora_up.weight": torch.randn(320, 1) * 0.01,
            f"{name}.alpha": torch.tensor(1.0)}
    path = str(tmp_path / "spm.safetensors")
    save_file(lora, path)
    new_model, new_clip, report = weights.apply_lora(model, clip, path, 1.0)
    assert (report.matched, report.total) == (3, 3) and new_model is not model  # tensors, not patched modules
    save_file({"lora_te_nothing.lora_down.weight": torch.zeros(1, 2)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(weights.WeightLayoutError, match="none of its 1 tensors"):
        weights.apply_lora(model, clip, str(tmp_path / "bad.safetensors"), 1.0)


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def run_inputs(tmp_path_factory, tiny_checkpoint, tiny_sd15):
    """Two 64x80 concept images (one captioned) and a partial ESD-style UNet patch."""
    folder = tmp_path_factory.mktemp("cli")
    images = folder / "images"
    images.mkdir()
    generator = torch.Generator().manual_seed(0)
    for i in range(2):
        pixels = (torch.rand(80, 64, 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(images / f"{i}.png")
    (images / "1.txt").write_text("a red {} on a table")
    unet = folder / "esd-x.safetensors"
    save_file(diffusers_unet_state(tiny_sd15[0], lambda d: "attn2.to_v" in d, scale=0.5), str(unet))
    base = ["--checkpoint", os.path.join(*tiny_checkpoint), "--unet", str(unet), "--images", str(images),
            "--resolution", "64", "--steps", "3", "--checkpoint-every", "1", "--init-word", "cat", "--seed", "4",
            "--concept", "test concept"]
    return folder, base


@pytest.fixture(scope="module")
def uninterrupted(cli, run_inputs, embeddings_dir):
    folder, base = run_inputs
    import io
    from contextlib import redirect_stdout
    log = io.StringIO()
    with redirect_stdout(log):
        code = cli.main(base + ["--name", "cli_test", "--work-dir", str(folder / "work_a"), "--preview-steps", "2"])
    assert code == 0
    return embeddings_dir / "cli_test.safetensors", folder / "work_a", log.getvalue()


def test_cli_writes_an_embedding_comfyui_loads(comfy, pack_module, uninterrupted, tiny_sd15, embeddings_dir):
    path, work, log = uninterrupted
    import re
    assert re.search(r"esd-x\.safetensors: partial \((\d+) of 122 weights\) UNet, diffusers keys, \1/\1 tensors used",
                     log), log
    embedding = load_embedding(str(path))
    assert embedding.vectors["clip_l"].shape == (1, 768)
    meta = embedding.metadata
    assert meta["steps"] == "3" and meta["init_word"] == "cat" and meta["concept"] == "test concept"
    assert meta["intended_use"] == "negative" and len(meta["base_model_hash"]) == 64
    assert "partial (" in meta["unlearned_model"]
    adapter = importlib.import_module("implicit_negatives.comfy.clip")
    assert meta["text_encoder_fingerprint"] == adapter.clip_fingerprint(tiny_sd15[1])  # same CLIP: no warning
    identity = importlib.import_module("implicit_negatives.comfy.model_identity")
    assert len(meta["model_fingerprint"]) == 16  # of the ESD-patched model, so it differs from the plain one
    assert meta["model_fingerprint"] != identity.model_fingerprint(tiny_sd15[0])
    from comfy.sd1_clip import load_embed
    assert torch.equal(load_embed("cli_test", [str(embeddings_dir)], 768, "clip_l"),
                       embedding.vectors["clip_l"])
    encode = comfy.NODE_CLASS_MAPPINGS["CLIPTextEncode"]().encode
    with_embedding = encode(tiny_sd15[1], "embedding:cli_test")[0][0][0]
    assert (with_embedding - encode(tiny_sd15[1], "")[0][0][0]).abs().max() > 1e-3
    rows = (work / "loss.csv").read_text().splitlines()
    assert rows[0] == "step,loss,ema" and len(rows) == 4
    assert Image.open(work / "loss.png").size == (800, 400)
    assert Image.open(work / "preview-final.png").size == (64, 64)
    assert not [n for n in os.listdir(os.path.dirname(path)) if n.startswith(".tmp-")]


def test_killed_run_resumes_to_the_uninterrupted_result(cli, run_inputs, uninterrupted, tmp_path):
    """SIGKILL the CLI after its first checkpoint; --resume then reproduces the uninterrupted embedding."""
    folder, base = run_inputs
    target = tmp_path / "resumed.safetensors"
    work = tmp_path / "work_b"
    args = base + ["--output", str(target), "--work-dir", str(work), "--no-preview"]
    comfy_path, _ = headless.locate_comfyui(development_copy=True)
    env = dict(os.environ, COMFYUI_PATH=comfy_path)
    process = subprocess.Popen([sys.executable, "-m", "trainer", *args], cwd=headless.PACK_ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    state_path = work / "state.pt"
    while not state_path.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate()
    assert state_path.exists(), stderr.decode()[-2000:]
    killed_at = load_state(str(state_path))["step"]
    assert 1 <= killed_at < 3 and not target.exists()  # never a partial output at the destination

    assert cli.main(args + ["--resume"]) == 0
    resumed = load_embedding(str(target)).vectors["clip_l"]
    assert torch.equal(resumed, load_embedding(str(uninterrupted[0])).vectors["clip_l"])
    assert load_state(str(state_path))["losses"].tolist() == load_state(str(uninterrupted[1] / "state.pt"))["losses"].tolist()


def test_cli_without_comfyui_says_how_to_point_at_it(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}
    result = subprocess.run([sys.executable, "-m", "trainer", "--help"], cwd=headless.PACK_ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "COMFYUI_PATH" in result.stderr
    env["COMFYUI_PATH"] = str(tmp_path)
    result = subprocess.run([sys.executable, "-m", "trainer", "--help"], cwd=headless.PACK_ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "not a ComfyUI source tree" in result.stderr


def test_cli_generates_its_data_from_a_reference_model(cli, tiny_checkpoint, tmp_path):
    """--generate-from samples the concept images with ComfyUI's sampler, saves them, and trains on them."""
    checkpoint = os.path.join(*tiny_checkpoint)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\n\na photo of a dog\n")
    work = tmp_path / "work"
    assert cli.main(["--checkpoint", checkpoint, "--generate-from", checkpoint, "--generate-prompts", str(prompts),
                     "--generate-count", "1", "--generate-steps", "2", "--resolution", "64", "--steps", "1",
                     "--no-preview", "--output", str(tmp_path / "gen.safetensors"), "--work-dir", str(work)]) == 0
    assert sorted(os.listdir(work / "generated")) == ["generated_000_000.png", "generated_001_000.png"]
    meta = load_embedding(str(tmp_path / "gen.safetensors")).metadata
    assert "generated by" in meta["training"] and '"images": 2' in meta["training"]
    with pytest.raises(SystemExit, match="exactly one of"):
        cli.main(["--checkpoint", checkpoint, "--output", str(tmp_path / "x.safetensors")])


@pytest.mark.parametrize("layout", ["text_model.", "no prefix"])
def test_replaced_text_encoder_in_either_transformers_layout_encodes_as_the_reference(
        weights, tiny_sd15, saved_text_encoders, layout):
    """AdvUnlearn ships a transformers CLIPTextModel folder: ComfyUI's conditioning from it equals transformers'."""
    folders, reference = saved_text_encoders
    clip = tiny_sd15[1]
    replaced, report = weights.replace_text_encoder(clip, str(folders[layout]))
    assert replaced is not clip and (report.matched, report.total) == (196, 196)
    assert "196/196 tensors used" in report.describe()
    layouts.assert_encodes_as(replaced, reference)


def test_incomplete_or_foreign_text_encoders_are_refused_naming_the_keys(weights, tiny_sd15, saved_text_encoders,
                                                                           tmp_path):
    clip = tiny_sd15[1]
    cut = layouts.truncated_text_encoder(saved_text_encoders[0]["no prefix"], str(tmp_path / "truncated.safetensors"))
    with pytest.raises(weights.WeightLayoutError, match=r"192 of the 196 weights of this checkpoint's text encoder") as refused:
        weights.replace_text_encoder(clip, str(tmp_path / "truncated.safetensors"))
    assert len(cut) == 4 and all(k in str(refused.value) for k in cut) and "unexpected: none" in str(refused.value)
    extra = {"text_model.vision_model.post_layernorm.weight": torch.ones(768)}
    with pytest.raises(weights.WeightLayoutError, match=r"196 of the 196 .* unexpected: text_model.vision_model"):
        weights.text_encoder_state(clip, {**layouts.clip_l_state(clip), **extra}, "with_vision.safetensors")
    with pytest.raises(weights.WeightLayoutError, match=r"another model family"):
        weights.text_encoder_state(clip, {"text_model.embeddings.position_embedding.weight": torch.zeros(77, 1024)})
    with pytest.raises(weights.WeightLayoutError, match="holds no model.safetensors"):
        weights.replace_text_encoder(clip, str(tmp_path))


def test_a_text_encoder_with_broken_output_is_refused_before_training(weights, tiny_sd15, saved_text_encoders,
                                                                      tmp_path):
    """Keys can all match and the encoder still be unusable: NaN weights in the file, or zeroed ones."""
    import implicit_negatives.comfy.inversion as ci
    model, clip, _ = tiny_sd15
    state = load_file(str(saved_text_encoders[0]["no prefix"] / "model.safetensors"))
    state["final_layer_norm.weight"] = torch.full_like(state["final_layer_norm.weight"], float("nan"))
    save_file(state, str(tmp_path / "nan.safetensors"))
    with pytest.raises(ci.TrainingSetupError, match="nan.safetensors: .* NaN/Inf values"):
        weights.replace_text_encoder(clip, str(tmp_path / "nan.safetensors"))
    zeroed, _ = weights.replace_text_encoder(clip, str(saved_text_encoders[0]["text_model."]))
    with torch.no_grad():
        zeroed.cond_stage_model.clip_l.transformer.text_model.final_layer_norm.weight.zero_()
    with pytest.raises(ci.TrainingSetupError, match="same vector at every token position"):
        with ci.training_modules(model, zeroed):
            pass
