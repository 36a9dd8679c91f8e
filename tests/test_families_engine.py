"""SDXL and SD2.x inside ComfyUI's real engine, on the rig's tiny random-weight checkpoints.

The UNets are tiny; the files' text encoders are full size (ComfyUI fixes their configs), and are loaded cut to
three layers (``rig.load_tiny_family``), as the SD1 planted-concept test cuts CLIP-L to one: a full SDXL text encode
costs about ten seconds on a CPU. The ``family`` fixture is module-scoped and parametrized, so pytest holds one
family's checkpoint at a time.
"""

from __future__ import annotations

import os

import pytest
import torch
from safetensors import safe_open

from implicit_negatives.embedding_io import save_embedding
from implicit_negatives.safe_denoiser import SafeDenoiserParams, project_negation_latents, safe_denoised
from implicit_negatives.sld import SLD_PRESETS, sld_noise

from implicit_negatives.comfyui import rig
from test_embedding_nodes_engine import clip_text_encode, max_diff, our_conditioning
from test_safe_denoiser_engine import SETTINGS, images, recording
from test_safe_denoiser_engine import safe_model as safe_denoiser_model
from test_sld_engine import close, hooks_of, ksample, recorded_sampling, safe_model

pytestmark = pytest.mark.usefixtures("one_thread")

# family: (ComfyUI model config class, model_base class, model sampling, {embedding key: width})
FAMILIES = {"sd2": ("SD20", "BaseModel", "V_PREDICTION", {"clip_h": 1024}),
            "sdxl": ("SDXL", "SDXL", "EPS", {"clip_l": 768, "clip_g": 1280})}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, comfy, embeddings_dir):
    """(family, checkpoint filename, (model, clip, vae), {"positive", "negative", "safety", "implicit"} conds)."""
    import folder_paths
    name = request.param
    path = rig.tiny_family_checkpoint_path(name)
    loaded = rig.load_tiny_family(name, embedding_directory=folder_paths.get_folder_paths("embeddings"))
    generator = torch.Generator().manual_seed(7)
    save_embedding(str(embeddings_dir / f"{name}_neg.safetensors"),
                   {key: torch.randn(4, width, generator=generator) * 0.3 for key, width in FAMILIES[name][3].items()},
                   {"concept": "test"})
    clip = loaded[1]
    conds = {"positive": clip_text_encode(comfy, clip, "a photo of a person on a beach"),
             "negative": clip_text_encode(comfy, clip, "low quality"),
             "safety": clip_text_encode(comfy, clip, f"low quality (embedding:{name}_neg:0.6)")}
    yield name, os.path.basename(path), loaded, conds


def test_the_rig_checkpoint_is_detected_as_its_family(comfy, family):
    import comfy.model_sampling
    name, filename, (model, clip, vae), conds = family
    config, base, sampling, widths = FAMILIES[name]
    assert type(model.model.model_config).__name__ == config and type(model.model).__name__ == base
    assert isinstance(model.get_model_object("model_sampling"), getattr(comfy.model_sampling, sampling))
    assert {tok.embedding_key: tok.embedding_size for tok in
            (getattr(clip.tokenizer, f"clip_{k}") for k in clip.tokenize("").keys())} == widths
    # The file's text encoder went through ComfyUI's own conversion: its fused OpenCLIP q/k/v loads as q_proj.
    encoder = clip.cond_stage_model.clip_g if name == "sdxl" else clip.cond_stage_model.clip_h
    prefix = "conditioner.embedders.1.model." if name == "sdxl" else "cond_stage_model.model."
    with safe_open(rig.tiny_family_checkpoint_path(name), "pt") as handle:
        fused = handle.get_tensor(prefix + "transformer.resblocks.0.attn.in_proj_weight")
    q_proj = encoder.transformer.text_model.encoder.layers[0].self_attn.q_proj.weight
    assert torch.equal(q_proj.float(), fused[:fused.shape[0] // 3].float())
    assert conds["positive"][0][0].shape[-1] == model.model.model_config.unet_config["context_dim"]
    assert conds["positive"][0][1]["pooled_output"].shape[-1] == (1280 if name == "sdxl" else 1024)


def test_the_conditioning_node_equals_comfyui_embedding_syntax(comfy, pack, embeddings_dir, family):
    """ImplicitNegativeConditioning(text, strength) == CLIPTextEncode("text (embedding:NAME:strength)"), pooled output
    included (SDXL: CLIP-G's projected pooled output, the ADM input), and the vectors really are in there."""
    name, _, (_, clip, _), conds = family
    ours = our_conditioning(pack, embeddings_dir, clip, f"{name}_neg", text="low quality", strength=0.6)
    assert max_diff(ours, conds["safety"]) <= 1e-6
    assert (ours[0][0] - conds["negative"][0][0]).abs().max() > 1e-2
    assert (ours[0][1]["pooled_output"] - conds["negative"][0][1]["pooled_output"]).abs().max() > 1e-4


def test_an_sd1_embedding_is_refused_naming_both_widths(pack, embeddings_dir, family):
    name, _, (_, clip, _), _ = family
    save_embedding(str(embeddings_dir / "sd1_only.safetensors"), {"clip_l": torch.randn(1, 768)})
    expected = "no clip_g vectors" if name == "sdxl" else r"clip_l 768.*clip_h 1024.*SD1\.x embedding used with an SD2\.x"
    with pytest.raises(ValueError, match=expected):
        our_conditioning(pack, embeddings_dir, clip, "sd1_only")


@pytest.mark.parametrize("fast_batched", [False, True])
def test_sld_output_is_the_core_step_with_the_safety_concept_conditioned_as_a_negative(comfy, pack, family, fast_batched):
    """Every post-CFG output is the core SLD step, and the safety pass is the model ComfyUI runs for a negative
    prompt: on SDXL with the safety concept's own pooled output and the size conditioning (ADM ``y``)."""
    name, _, (model, _, _), conds = family
    patched = safe_model(pack, model, conds["safety"], preset="max", warmup_unit="steps", fast_batched=fast_batched)
    _, batches, calls = recorded_sampling(comfy, patched, conds)
    params, momentum, gaps = SLD_PRESETS["max"], None, []
    safeties = []
    for step, call in enumerate(calls):
        if fast_batched:
            cond, uncond, safety = batches[step]
        else:
            (cond, uncond), (_, safety) = batches[2 * step], batches[2 * step + 1]
        safeties.append(safety)
        x, sigma = call["input"], call["sigma"].reshape(-1, 1, 1, 1)
        eps = [(x - d) / sigma for d in (uncond, cond, safety)]
        expected, momentum = sld_noise(*eps, call["cond_scale"], momentum, step, params)
        gaps.append(((call["denoised"] - (x - sigma * expected)).abs().max() / x.abs().max()).item())
    assert max(gaps) <= 1e-5, gaps
    # Oracle for the safety pass: the stock sampler with the safety concept as its negative, at the same first x.
    _, stock_batches, _ = recorded_sampling(comfy, model, {**conds, "negative": conds["safety"]})
    assert close(safeties[0], stock_batches[0][1])
    if name == "sdxl":  # the pooled output (ADM input) of the concept matters: without it the pass differs
        other = [[conds["safety"][0][0], {**conds["safety"][0][1],
                                          "pooled_output": conds["negative"][0][1]["pooled_output"]}]]
        _, other_batches, _ = recorded_sampling(comfy, model, {**conds, "negative": other})
        assert (other_batches[0][1] - safeties[0]).abs().max() > 1e-4 * safeties[0].abs().max()


@pytest.mark.parametrize("sampler,evaluations", [("dpmpp_2s_ancestral", lambda n: 2 * n - 1)])  # euler: above
def test_sld_samplers_reset_state_and_repeat_exactly(comfy, pack, family, sampler, evaluations):
    _, _, (model, _, _), conds = family
    patched, steps = safe_model(pack, model, conds["safety"], preset="strong"), 4
    first = ksample(comfy, patched, conds, sampler=sampler, steps=steps)
    run = hooks_of(patched).last_run
    assert run.evaluations == evaluations(steps) and run.momentum.updates == steps - 1
    second = ksample(comfy, patched, conds, sampler=sampler, steps=steps)
    assert hooks_of(patched).last_run is not run and torch.equal(first, second)
    assert (first - ksample(comfy, model, conds, sampler=sampler, steps=steps)).abs().max() > 1e-4


def test_sld_refuses_a_concept_of_another_family_or_without_pooled_output(pack, family):
    name, _, (model, _, _), conds = family
    with pytest.raises(ValueError, match="width 768 does not fit"):
        safe_model(pack, model, [[torch.randn(1, 77, 768), {"pooled_output": torch.randn(1, 768)}]])
    if name == "sdxl":
        with pytest.raises(ValueError, match="needs a pooled text embedding"):
            safe_model(pack, model, [[conds["safety"][0][0], {}]])


def test_safree_runs_on_sd2_and_sdxl_and_refuses_reattention_on_sdxl(comfy, pack, family):
    """SD2 with latent re-attention; SDXL without it (refused: the official SDXL pipeline has none). SDXL's match with
    the official steps is in test_safree_sdxl_engine."""
    name, _, (model, clip, _), conds = family
    positive, negative, _ = pack["SafreeConditioning"].execute(clip, "a zebra on grass", "zebra", 0.01, True, 2,
                                                               "default", 4, "concept", None).result
    assert positive[-1][0][0].shape == ((77, 2048) if name == "sdxl" else (77, 1024))
    if name == "sdxl":
        with pytest.raises(ValueError, match="Latent Re-Attention does not support SDXL"):
            pack["SafreeLatentReAttention"].execute(model, positive, True, 0.9, 0.2)
        patched = model
    else:
        patched = pack["SafreeLatentReAttention"].execute(model, positive, True, 0.9, 0.2).result[0]
    latent = ksample(comfy, patched, {"positive": positive, "negative": negative}, steps=4)
    assert torch.isfinite(latent).all()


def test_safe_denoiser_steps_with_the_core_in_the_familys_latent_space(comfy, pack, family):
    """EncodeNegationSet is the stock VAEEncode of the family's VAE, and every x0 prediction inside the window is the
    core Safe Denoiser step against the negation latents in the model's latent space, the prediction outside it
    untouched (as on SD1.5, test_safe_denoiser_engine.py). The projection is unit norm over channels, so the latent
    scale (SDXL 0.13025, SD1/SD2 0.18215) cancels."""
    _, _, (model, _, vae), conds = family
    negation = pack["EncodeNegationSet"].execute(images(), vae).result[0]
    assert torch.equal(negation.latents, comfy.NODE_CLASS_MAPPINGS["VAEEncode"]().encode(vae, images())[0]["samples"].float())
    before, after, steps = [], [], 4
    patched = recording(safe_denoiser_model(pack, recording(model, before), negation), after)
    ksample(comfy, patched, conds, steps=steps)
    sigma_end = patched.get_model_object("model_sampling").percent_to_sigma(SETTINGS["end_percent"])
    projected = project_negation_latents(model.model.process_latent_in(negation.latents))
    params = SafeDenoiserParams(strength=SETTINGS["strength"], bandwidth=SETTINGS["bandwidth"])
    inside = [i for i, (sigma, _) in enumerate(before) if sigma >= sigma_end]
    assert len(before) == steps and 0 < len(inside) < steps
    for i, ((_, x0), (_, out)) in enumerate(zip(before, after)):
        if i in inside:
            assert torch.allclose(out, safe_denoised(x0, projected, params), atol=1e-5) and (out - x0).abs().max() > 1e-3
        else:
            assert torch.equal(out, x0)
