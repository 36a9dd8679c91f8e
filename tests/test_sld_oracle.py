"""Oracle: diffusers' StableDiffusionPipelineSafe, run with tiny random weights, against our core SLD step.

We record, at every denoising step, the three noise predictions the pipeline's UNet produced
(batch order uncond, text, safety) and the guided noise it handed to ``scheduler.step``. Our
``sld_noise``, fed the recorded predictions and its own momentum, must reproduce the guided noise.
"""

from __future__ import annotations

import os

import pytest
import torch

from implicit_negatives.cfg import cfg_noise
from implicit_negatives.sld import SLD_PRESETS, sld_enabled, sld_noise

from implicit_negatives.comfyui import headless, rig

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

MIN_STEPS = 14      # >= 10 steps, and always a few past the preset's warm-up so both phases run
CFG = 7.5
TOLERANCE = 1e-5


def clip_tokenizer():
    """A real CLIP BPE tokenizer from local files (no hub access): ComfyUI's copy of SD1's tokenizer."""
    path, how = headless.locate_comfyui(development_copy=True)
    folder = os.path.join(path, "comfy", "sd1_tokenizer") if path else None
    if folder is None or not os.path.isfile(os.path.join(folder, "vocab.json")):
        pytest.skip(f"the oracle needs CLIP tokenizer files (taken from ComfyUI's comfy/sd1_tokenizer): {how}")
    return transformers.CLIPTokenizer.from_pretrained(folder, model_max_length=77)


def steps_for(preset: str) -> int:
    return max(MIN_STEPS, SLD_PRESETS[preset].warmup_steps + 4)


@pytest.fixture(scope="module")
def tiny_safe_pipeline():
    """diffusers' own test-style tiny components (tests/pipelines/stable_diffusion_safe), random weights."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: extra threads only contend on a shared CI machine
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32)
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        block_out_channels=[32, 64], in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4)
    torch.manual_seed(0)
    tokenizer = clip_tokenizer()
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        hidden_size=32, intermediate_size=37, layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=5,
        vocab_size=len(tokenizer)))
    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = diffusers.StableDiffusionPipelineSafe(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    # The pipeline's random UNet makes |ε_p − ε_S| tiny; a stronger text encoder spreads the three branches
    # so that the threshold, the clamp at 1 and both signs of ε_p − ε_S all occur.
    with torch.no_grad():
        for parameter in text_encoder.parameters():
            parameter.mul_(4.0)
    yield pipe
    torch.set_num_threads(threads)


def record_run(pipe, preset: str):
    """Run the pipeline with a preset; return [(ε_u, ε_p, ε_S, guided ε)] per step."""
    raw, guided = [], []
    unet_forward, scheduler_step = pipe.unet.forward, pipe.scheduler.step

    def recording_forward(*args, **kwargs):
        out = unet_forward(*args, **kwargs)
        raw.append(out.sample.detach().clone())
        return out

    def recording_step(model_output, *args, **kwargs):
        guided.append(model_output.detach().clone())
        return scheduler_step(model_output, *args, **kwargs)

    pipe.unet.forward, pipe.scheduler.step = recording_forward, recording_step
    try:
        params = SLD_PRESETS[preset]
        pipe(prompt="a photo of a cat", num_inference_steps=steps_for(preset), guidance_scale=CFG, height=32, width=32,
             output_type="np", generator=torch.Generator().manual_seed(0),
             sld_guidance_scale=params.guidance_scale, sld_warmup_steps=params.warmup_steps,
             sld_threshold=params.threshold, sld_momentum_scale=params.momentum_scale,
             sld_mom_beta=params.momentum_beta)
    finally:
        pipe.unet.forward, pipe.scheduler.step = unet_forward, scheduler_step
    assert len(raw) == len(guided) == steps_for(preset)
    return [(*batch.chunk(3), out) for batch, out in zip(raw, guided)]


@pytest.mark.parametrize("preset", ["weak", "medium", "strong", "max"])
def test_sld_noise_reproduces_diffusers_guided_noise_at_every_step(tiny_safe_pipeline, preset):
    params = SLD_PRESETS[preset]
    assert sld_enabled(params)
    steps = record_run(tiny_safe_pipeline, preset)
    momentum, diffs, safety_effect = None, [], []
    for step, (eps_u, eps_p, eps_s, expected) in enumerate(steps):
        ours, momentum = sld_noise(eps_u, eps_p, eps_s, CFG, momentum, step, params)
        diffs.append((ours - expected).abs().max().item())
        safety_effect.append((cfg_noise(eps_u, eps_p, CFG) - expected).abs().max().item())
    print(f"{preset}: max |ours - diffusers| per step {max(diffs):.3g}; "
          f"max |CFG - diffusers| per step {[round(d, 4) for d in safety_effect]}")
    assert max(diffs) <= TOLERANCE
    # Not vacuous: before warm-up diffusers' output is plain CFG, afterwards SLD moves it.
    for step, effect in enumerate(safety_effect):
        if step < params.warmup_steps:
            assert effect <= TOLERANCE, (step, effect)
        else:
            assert effect > 1e-3, (step, effect)


def test_the_recorded_predictions_exercise_every_branch_of_the_weight(tiny_safe_pipeline):
    """Over the run, some elements clamp at 1, some stay below 1, and (Medium) some are cut by λ."""
    for preset in ("medium", "max"):
        params = SLD_PRESETS[preset]
        clamped = below = cut_any = False
        for eps_u, eps_p, eps_s, _ in record_run(tiny_safe_pipeline, preset):
            difference = eps_p - eps_s
            weight = difference.abs() * params.guidance_scale
            cut = difference >= params.threshold
            clamped |= bool((weight[~cut] >= 1).any())
            below |= bool((weight[~cut] < 1).any())
            cut_any |= bool(cut.any())
        assert clamped and below, preset
        assert cut_any or preset == "max"


def test_momentum_accumulates_during_warmup_and_changes_the_result(tiny_safe_pipeline):
    """Medium with momentum vs the same run with s_m = 0: diffusers and ours differ the same way."""
    steps = record_run(tiny_safe_pipeline, "medium")
    params = SLD_PRESETS["medium"]
    no_momentum = type(params)(params.guidance_scale, params.warmup_steps, params.threshold, 0.0, params.momentum_beta)
    momentum, free = None, None
    gap = 0.0
    for step, (eps_u, eps_p, eps_s, expected) in enumerate(steps):
        ours, momentum = sld_noise(eps_u, eps_p, eps_s, CFG, momentum, step, params)
        plain, free = sld_noise(eps_u, eps_p, eps_s, CFG, free, step, no_momentum)
        if step == params.warmup_steps:
            gap = (ours - plain).abs().max().item()
    assert gap > 1e-4  # momentum built up during warm-up is already in the first guided step
