"""The protocol runner with SD1.5, SD2.x (v-prediction) and SDXL model setups in one config, SDXL at its own size, on
the rig's tiny checkpoints: every image equals stock ComfyUI sampling of the same graph at that model's size, the SDXL size
conditioning is diffusers' pipeline default, a rerun reuses every item and another size is another protocol; what
the pack refuses on SDXL (SAFREE's latent re-attention, a replaced text encoder) and a negation set of another size
are refused before the first image.

The runner loads the SDXL file through the stock CheckpointLoaderSimple, so its text encoders are full size (about
ten seconds per SDXL text encode on a CPU); one prompt keeps that to four SDXL encodes, and the stock reference runs
in the runner's own executor, whose cache keeps the checkpoint loaded."""

import json
import os
import types

import numpy as np
import pytest
import torch

from implicit_negatives.comfyui import rig
from test_eval_runner import PROMPTS, engine, ev, pixels, scorer  # noqa: F401 (module fixtures)

XL_WIDTH, XL_HEIGHT = 128, 96

CONFIG = """
[run]
prompts = "prompts.csv"
width = 64
height = 64
steps = 2
limit = 1

[models.tiny]
checkpoint = "{sd15}"

[models.sd2]
checkpoint = "{sd2}"

[models.xl]
checkpoint = "{sdxl}"
width = {width}
height = {height}

[negatives.text]
text = "nudity"

[[rows]]
name = "Tiny"
model = "tiny"

[[rows]]
name = "SD2"
model = "sd2"

[[rows]]
name = "XL"
model = "xl"
"""

REFUSED_ROWS = """
[negation_sets.exported]
path = "{negation_set}"

[[rows]]
name = "Tiny + Safe Denoiser"
model = "tiny"
negation_set = "exported"

[[rows]]
name = "XL + SAFREE"
model = "xl"
guidance = "safree"
negative = "text"

[[rows]]
name = "XL + SAFREE + re-attention"
model = "xl"
guidance = "safree"
negative = "text"
safree_reattention = true

[[rows]]
name = "XL + Safe Denoiser"
model = "xl"
negation_set = "exported"

[models.xl_advunlearn]
checkpoint = "{sdxl}"
text_encoder = "{negation_set}"

[[rows]]
name = "XL AdvUnlearn"
model = "xl_advunlearn"
"""


@pytest.fixture(scope="module")
def families_dir(tmp_path_factory, tiny_checkpoint):
    folder = tmp_path_factory.mktemp("families")
    (folder / "prompts.csv").write_text(PROMPTS)
    (folder / "config.toml").write_text(CONFIG.format(sd15=os.path.join(*tiny_checkpoint), width=XL_WIDTH,
                                                      height=XL_HEIGHT, sdxl=rig.tiny_family_checkpoint_path("sdxl"),
                                                      sd2=rig.tiny_family_checkpoint_path("sd2")))
    return folder


@pytest.fixture(scope="module")
def families_run(ev, families_dir, engine, scorer, tmp_path_factory):  # noqa: F811
    config = ev("protocol").load_config(str(families_dir / "config.toml"))
    out = tmp_path_factory.mktemp("families_run")
    stats = ev("runner").generate(engine, config, str(out), scorer=scorer)
    return config, out, stats


def stock_graph(checkpoint, text, seed, width, height, steps, cfg, prefix):
    """An item's graph written out with ComfyUI's stock nodes only (one short prompt: no TruncatePrompts needed)."""
    encode = lambda words: {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": words}}
    return {"ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": os.path.basename(checkpoint)}},
            "pos": encode(text), "empty": encode(""),
            "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height, "batch_size": 1}},
            "sample": {"class_type": "KSampler", "inputs": {
                "model": ["ckpt", 0], "positive": ["pos", 0], "negative": ["empty", 0], "latent_image": ["latent", 0],
                "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
            "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["ckpt", 2]}},
            "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": prefix}}}


@torch.inference_mode()  # as ComfyUI's executor runs nodes
def recorded_size_conditioning(comfy, model, clip, text, width, height):
    """The ADM input ``y`` of every UNet call of a stock CLIPTextEncode -> EmptyLatentImage -> KSampler sampling."""
    encode = comfy.NODE_CLASS_MAPPINGS["CLIPTextEncode"]().encode
    recorded, recorder = [], model.clone()

    def unet(apply_model, args):
        recorded.append(args["c"]["y"])
        return apply_model(args["input"], args["timestep"], **args["c"])
    recorder.set_model_unet_function_wrapper(unet)
    latent = comfy.NODE_CLASS_MAPPINGS["EmptyLatentImage"]().generate(width, height, 1)[0]
    comfy.NODE_CLASS_MAPPINGS["KSampler"]().sample(recorder, 1, 2, 7.5, "euler", "normal", encode(clip, text)[0],
                                                   encode(clip, "")[0], latent)
    return recorded


def diffusers_time_ids_embedding(width, height):
    """diffusers' StableDiffusionXLPipeline defaults (original_size = target_size = (height, width), crops (0, 0),
    its ``_get_add_time_ids``) through the SDXL UNet's ``add_time_proj`` (Timesteps(256, flip_sin_to_cos, 0))."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.models.embeddings import Timesteps
    unet = types.SimpleNamespace(config=types.SimpleNamespace(addition_time_embed_dim=256),
                                 add_embedding=types.SimpleNamespace(linear_1=types.SimpleNamespace(in_features=2816)))
    ids = StableDiffusionXLPipeline._get_add_time_ids(types.SimpleNamespace(unet=unet), (height, width), (0, 0),
                                                      (height, width), torch.float32, text_encoder_projection_dim=1280)
    return Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)(ids.flatten()).reshape(1, -1)


def test_each_model_samples_at_its_own_size_as_stock_comfyui_with_diffusers_size_conditioning(
        comfy, ev, engine, families_run):  # noqa: F811
    config, out, stats = families_run
    assert sorted(stats.generated) == ["sd2/00000", "tiny/00000", "xl/00000"]
    prompt = ev("protocol").read_prompts(config.prompts_path, config.cfg, config.default_seed, config.limit)[0]
    # SDXL first: the engine's cache still holds the checkpoint of the run's last row
    for slug, size in (("xl", (XL_WIDTH, XL_HEIGHT)), ("sd2", (64, 64)), ("tiny", (64, 64))):
        ours = pixels(out / "images" / slug / "00000.png")
        assert ours.shape == (size[1], size[0], 3)
        saved = engine.run(stock_graph(config.models[slug].checkpoint, prompt.prompt, prompt.seed, *size,
                                       config.steps, config.cfg, f"stock/{slug}"))["save"]["images"][0]
        assert np.array_equal(ours, pixels(os.path.join(engine.output_directory(), saved["subfolder"],
                                                        saved["filename"]))), slug
        assert json.loads((out / "scores" / slug / "00000.json").read_text())["size"] == list(size)
    # Stock sampling at that size gives SDXL's UNet diffusers' default time ids, for the prompt and the empty prompt
    model, clip, _ = rig.load_tiny_family("sdxl")
    recorded = recorded_size_conditioning(comfy, model, clip, prompt.prompt, XL_WIDTH, XL_HEIGHT)
    expected = diffusers_time_ids_embedding(XL_WIDTH, XL_HEIGHT)
    assert recorded and all(y.shape[-1] == 2816 for y in recorded) and sum(len(y) for y in recorded) == 4
    for y in recorded:
        assert torch.allclose(y[:, 1280:].float(), expected.expand(len(y), -1), atol=1e-5)


def test_a_rerun_reuses_every_size_and_another_size_is_another_protocol(ev, families_dir, engine, families_run):  # noqa: F811
    config, out, _ = families_run
    again = ev("runner").generate(engine, config, str(out))
    assert again.generated == [] and sorted(again.reused) == ["sd2/00000", "tiny/00000", "xl/00000"]
    text = (families_dir / "config.toml").read_text()
    (families_dir / "square.toml").write_text(text.replace(f"height = {XL_HEIGHT}", f"height = {XL_WIDTH}"))
    square = ev("protocol").load_config(str(families_dir / "square.toml"))
    assert square.generation_fingerprint() != config.generation_fingerprint()
    with pytest.raises(ev("protocol").ConfigError, match="holds a run of another protocol"):
        ev("runner").generate(engine, square, str(out))
    # the run's own size stated explicitly for a model (here sd2) is the same protocol
    (families_dir / "explicit.toml").write_text(text.replace("[models.xl]", "width = 64\nheight = 64\n\n[models.xl]"))
    assert ev("protocol").load_config(str(families_dir / "explicit.toml")).generation_fingerprint() == \
        config.generation_fingerprint()


def test_reattention_or_a_text_encoder_on_sdxl_and_a_negation_set_of_another_size_are_refused_first(
        ev, pack, families_dir, engine, tiny_sd15, tmp_path):  # noqa: F811
    from implicit_negatives.comfyui.negation_sets import export_negation_set
    for node in ("LoadNegationSet", "SafeDenoiser", "SafreeConditioning", "SafreeLatentReAttention"):
        if node not in pack:
            pytest.skip(f"{node} is not in this version of the pack")
    negation_set = families_dir / "concept.negation_set.safetensors"
    export_negation_set(str(negation_set), tiny_sd15[2], torch.randn(2, 4, 8, 8), [("a.png", "0" * 64)], 64, "test")
    rows = REFUSED_ROWS.format(negation_set=negation_set, sdxl=rig.tiny_family_checkpoint_path("sdxl"))
    text = (families_dir / "config.toml").read_text()
    protocol = ev("protocol")
    with pytest.raises(protocol.ConfigError, match="row 'XL \\+ Safe Denoiser' samples model 'xl' at width 128, height 96"):
        (families_dir / "not_square.toml").write_text(text + rows)  # read when the config is loaded
        protocol.load_config(str(families_dir / "not_square.toml"))
    (families_dir / "refused.toml").write_text(text.replace(f"height = {XL_HEIGHT}", f"height = {XL_WIDTH}") + rows)
    config = protocol.load_config(str(families_dir / "refused.toml"))
    out = tmp_path / "run"
    with pytest.raises(protocol.ConfigError) as error:
        ev("runner").generate(engine, config, str(out))
    message = str(error.value)
    assert "3 problem(s), nothing generated" in message and not out.exists()
    assert "row 'XL + SAFREE + re-attention': model 'xl' is SDXL" in message and "Re-Attention does not" in message
    assert "row 'XL + SAFREE'" not in message  # SAFREE Conditioning runs on SDXL
    assert "row 'XL AdvUnlearn': model 'xl_advunlearn' is SDXL" in message and "SDXL has two" in message
    assert (f"row 'XL + Safe Denoiser': negation set '{negation_set}' holds latents of 64 px images, but model 'xl' "
            f"samples {XL_WIDTH}x{XL_WIDTH}") in message
