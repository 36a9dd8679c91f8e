"""EncodeNegationSet and SafeDenoiser inside ComfyUI's real sampling engine, on the tiny random-weight SD1.5 checkpoint."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from implicit_negatives.safe_denoiser import (NegationSet, NegationSetError, SafeDenoiserParams,
                                              project_negation_latents, safe_denoised)

STEPS = 6
CFG = 7.5
SETTINGS = dict(strength=0.33, start_percent=0.0, end_percent=0.5, bandwidth=3.15)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def conds(comfy, tiny_sd15):
    encode = comfy.NODE_CLASS_MAPPINGS["CLIPTextEncode"]().encode
    clip = tiny_sd15[1]
    return {"positive": encode(clip, "a photo of a person on a beach")[0], "negative": encode(clip, "low quality")[0],
            "safety": encode(clip, "nudity")[0]}


def images(count=3, size=64, seed=0):
    return torch.rand(count, size, size, 3, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def negation(pack, tiny_sd15):
    return pack["EncodeNegationSet"].execute(images(), tiny_sd15[2]).result[0]


def safe_model(pack, model, negation_set, **settings):
    return pack["SafeDenoiser"].execute(model, negation_set, **{**SETTINGS, **settings}).result[0]


def ksample(comfy, model, conds, steps=STEPS, negative=None, latent=None, sampler="euler"):
    samples = latent if latent is not None else torch.zeros(1, 4, 8, 8)
    return comfy.NODE_CLASS_MAPPINGS["KSampler"]().sample(
        model, 3, steps, CFG, sampler, "normal", conds["positive"], negative or conds["negative"],
        {"samples": samples})[0]["samples"]


def hook_of(model):
    """The SafeDenoiserPatch a patched MODEL carries (its post-CFG function is a bound method)."""
    return model.model_options["sampler_post_cfg_function"][-1].__self__


def recording(model, calls):
    """A clone whose next post-CFG function records (sigma, denoised) and passes it on unchanged."""
    recorder = model.clone()
    recorder.set_model_sampler_post_cfg_function(
        lambda args: calls.append((float(args["sigma"].max()), args["denoised"].clone())) or args["denoised"])
    return recorder


def test_negation_set_holds_the_stock_vae_encode_latents(comfy, tiny_sd15, negation):
    stock = comfy.NODE_CLASS_MAPPINGS["VAEEncode"]().encode(tiny_sd15[2], images())[0]["samples"]
    assert isinstance(negation, NegationSet) and "3 images 64×64" in negation.source
    assert torch.equal(negation.latents, stock.float())


def test_in_the_window_the_sampler_steps_with_the_core_safe_denoiser(comfy, pack, tiny_sd15, conds, negation):
    """Record the x0 prediction just before and just after the patch: after = core(before) inside the window."""
    before, after = [], []
    model = recording(safe_model(pack, recording(tiny_sd15[0], before), negation), after)
    ksample(comfy, model, conds)
    sampling = model.get_model_object("model_sampling")
    sigma_end = sampling.percent_to_sigma(SETTINGS["end_percent"])
    projected = project_negation_latents(model.model.process_latent_in(negation.latents))
    params = SafeDenoiserParams(strength=SETTINGS["strength"], bandwidth=SETTINGS["bandwidth"])
    inside = [i for i, (sigma, _) in enumerate(before) if sigma >= sigma_end]
    assert len(before) == STEPS and 0 < len(inside) < STEPS
    for i, ((sigma, x0), (_, out)) in enumerate(zip(before, after)):
        if i in inside:
            expected = safe_denoised(x0, projected, params)
            assert torch.allclose(out, expected, atol=1e-5) and (out - x0).abs().max() > 1e-3
        else:
            assert torch.equal(out, x0)


def test_strength_zero_is_exactly_the_unpatched_sampler(comfy, pack, tiny_sd15, conds, negation):
    plain = ksample(comfy, tiny_sd15[0], conds)
    assert torch.equal(ksample(comfy, safe_model(pack, tiny_sd15[0], negation, strength=0.0), conds), plain)
    assert (ksample(comfy, safe_model(pack, tiny_sd15[0], negation), conds) - plain).abs().max() > 1e-3


def test_runs_do_not_leak_into_each_other(comfy, pack, tiny_sd15, conds, negation):
    """Same model twice, with another patched model sampled in between, and a fresh patch: all identical."""
    model = safe_model(pack, tiny_sd15[0], negation)
    other = safe_model(pack, tiny_sd15[0], pack["EncodeNegationSet"].execute(images(seed=9), tiny_sd15[2]).result[0])
    first = ksample(comfy, model, conds)
    ksample(comfy, other, conds, latent=torch.zeros(1, 4, 8, 8))
    assert torch.equal(ksample(comfy, model, conds), first)
    assert torch.equal(ksample(comfy, safe_model(pack, tiny_sd15[0], negation), conds), first)


def test_clones_share_nothing_that_changes(comfy, pack, tiny_sd15, conds, negation):
    model = safe_model(pack, tiny_sd15[0], negation)
    clone = model.clone()
    hook = hook_of(model)
    assert hook_of(clone) is hook   # the negation tensor is not copied at every clone ...
    with pytest.raises(dataclasses.FrozenInstanceError):
        hook.params = None          # ... because nothing in the hook can be reassigned
    assert not [name for name, value in vars(hook).items() if isinstance(value, (list, dict, set))]
    assert torch.equal(ksample(comfy, clone, conds), ksample(comfy, model, conds))


def test_the_input_model_is_not_modified(pack, tiny_sd15, negation):
    model = tiny_sd15[0]
    before = {k: list(v) if isinstance(v, list) else v for k, v in model.model_options.items()}
    patched = safe_model(pack, model, negation)
    assert patched is not model and patched.model is model.model
    assert {k: list(v) if isinstance(v, list) else v for k, v in model.model_options.items()} == before
    assert len(patched.model_options["sampler_post_cfg_function"]) == len(
        model.model_options.get("sampler_post_cfg_function", [])) + 1


@pytest.mark.parametrize("sampler", ["heun", "dpmpp_2m", "euler_ancestral"])
def test_other_samplers_run(comfy, pack, tiny_sd15, conds, negation, sampler):
    out = ksample(comfy, safe_model(pack, tiny_sd15[0], negation), conds, sampler=sampler)
    assert torch.isfinite(out).all()


def test_stacks_with_safe_latent_guidance_and_an_implicit_negative_prompt(comfy, pack, tiny_sd15, conds, negation,
                                                                          embeddings_dir):
    """SLD first, the safe denoiser on SLD's output, an implicit negative as the KSampler's negative prompt."""
    from implicit_negatives.embedding_io import save_embedding
    save_embedding(str(embeddings_dir / "safe_denoiser_test_negative.safetensors"),
                   {"clip_l": torch.randn(1, 768, generator=torch.Generator().manual_seed(5)) * 0.3}, {"concept": "test"})
    concept = pack["LoadImplicitNegative"].execute("safe_denoiser_test_negative.safetensors", 1.0).result[0]
    implicit = pack["ImplicitNegativeConditioning"].execute(tiny_sd15[1], concept, "", "embedding_only").result[0]
    sld = pack["SafeLatentGuidance"].execute(
        tiny_sd15[0], conds["safety"], "max", "fraction_of_run", 1000.0, 10, 0.0, 0.01, 0.3, 0.4, False).result[0]
    before, after = [], []
    stacked = recording(safe_model(pack, recording(sld, before), negation), after)
    out = ksample(comfy, stacked, conds, negative=implicit)
    sld_only = ksample(comfy, sld, conds, negative=implicit)
    assert torch.isfinite(out).all() and (out - sld_only).abs().max() > 1e-3
    assert [f.__self__ for f in stacked.model_options["sampler_post_cfg_function"][:1]] == [
        sld.model_options["sampler_post_cfg_function"][0].__self__]
    assert not torch.equal(after[0][1], before[0][1])   # the first step is in the window: changed after SLD


# --------------------------------------------------------------------------- fail closed

def test_unusable_negation_sets_are_refused(pack, tiny_sd15, negation):
    model = tiny_sd15[0]
    with pytest.raises(NegationSetError, match="empty"):
        safe_model(pack, model, NegationSet(latents=torch.zeros(0, 4, 8, 8), source="test"))
    with pytest.raises(NegationSetError, match="16-channel"):
        safe_model(pack, model, NegationSet(latents=torch.zeros(2, 16, 8, 8), source="test"))
    with pytest.raises(NegationSetError, match="NaN"):
        safe_model(pack, model, NegationSet(latents=torch.full((2, 4, 8, 8), float("nan")), source="test"))
    with pytest.raises(NegationSetError, match="Expected a NEGATION_SET"):
        safe_model(pack, model, negation.latents)
    with pytest.raises(ValueError, match="start_percent"):
        safe_model(pack, model, negation, start_percent=0.6, end_percent=0.5)
    with pytest.raises(NegationSetError, match="No images"):
        pack["EncodeNegationSet"].execute(torch.zeros(0, 64, 64, 3), tiny_sd15[2])


def test_a_latent_of_another_size_stops_sampling(comfy, pack, tiny_sd15, conds, negation):
    model = safe_model(pack, tiny_sd15[0], negation)
    with pytest.raises(NegationSetError, match="encode the negation images at the size you sample"):
        ksample(comfy, model, conds, latent=torch.zeros(1, 4, 16, 16))


def test_nan_in_the_prediction_stops_sampling(comfy, pack, tiny_sd15, conds, negation):
    poisoned = tiny_sd15[0].clone()
    poisoned.set_model_sampler_post_cfg_function(lambda args: args["denoised"] * float("nan"))
    with pytest.raises(FloatingPointError, match="NaN/Inf"):
        ksample(comfy, safe_model(pack, poisoned, negation), conds)
