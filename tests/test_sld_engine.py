"""SafeLatentGuidance inside ComfyUI's real sampling engine, on the tiny random-weight SD1.5 checkpoint."""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
from dataclasses import astuple

import pytest
import torch

from implicit_negatives.sld import SLD_PRESETS, sld_noise

STEPS = 6
CFG = 7.5
DEFAULTS = dict(preset="max", warmup_unit="fraction_of_run", sld_guidance_scale=1000.0, sld_warmup_steps=10,
                sld_warmup_fraction=0.2, sld_threshold=0.01, sld_momentum_scale=0.3, sld_mom_beta=0.4,
                fast_batched=False)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def conds(comfy, tiny_sd15):
    encode = comfy.NODE_CLASS_MAPPINGS["CLIPTextEncode"]().encode
    clip = tiny_sd15[1]
    return {"positive": encode(clip, "a photo of a person on a beach")[0],
            "negative": encode(clip, "low quality")[0],
            "safety": encode(clip, "nudity, violence, blood")[0]}


def safe_model(pack, model, safety, **settings):
    return pack["SafeLatentGuidance"].execute(model, safety, **{**DEFAULTS, **settings}).result[0]


def hooks_of(model):
    """The SafeLatentGuidancePatch a patched MODEL carries (its post-CFG function is a bound method)."""
    return model.model_options["sampler_post_cfg_function"][-1].__self__


def close(a, b, rel=1e-5):
    """Equal up to float32 batching noise, relative to the values' scale (random weights give large latents)."""
    return (a - b).abs().max() <= rel * max(a.abs().max(), 1.0)


def ksample(comfy, model, conds, sampler="euler", steps=STEPS, cfg=CFG, denoise=1.0, batch=1, seed=3, latent=None):
    samples = latent if latent is not None else torch.zeros(batch, 4, 8, 8)
    return comfy.NODE_CLASS_MAPPINGS["KSampler"]().sample(
        model, seed, steps, cfg, sampler, "normal", conds["positive"], conds["negative"], {"samples": samples},
        denoise=denoise)[0]["samples"]


# (sampler, model evaluations per run of N steps)
SAMPLERS = [("euler", lambda n: n), ("heun", lambda n: 2 * n - 1), ("dpmpp_2m", lambda n: n),
            ("euler_ancestral", lambda n: n), ("dpmpp_2s_ancestral", lambda n: 2 * n - 1)]


@pytest.mark.parametrize("sampler,evaluations", SAMPLERS, ids=[s for s, _ in SAMPLERS])
def test_samplers_run_and_momentum_advances_once_per_step(comfy, pack, tiny_sd15, conds, sampler, evaluations):
    model = safe_model(pack, tiny_sd15[0], conds["safety"], preset="medium")
    guided = ksample(comfy, model, conds, sampler=sampler)
    plain = ksample(comfy, tiny_sd15[0], conds, sampler=sampler)
    run = hooks_of(model).last_run
    assert torch.isfinite(guided).all()
    assert run.evaluations == evaluations(STEPS)     # Heun / DPM++ 2S evaluate the model twice per step
    assert run.momentum.updates == STEPS - 1         # ... but the momentum advances once per step
    assert run.momentum.step == STEPS - 1
    assert run.safety_passes == run.evaluations
    assert run.warmup_steps == 1                     # Medium: δ = 10 of 50 → 0.2 × 6 steps
    assert (guided - plain).abs().max() > 1e-4


def recorded_sampling(comfy, model, conds, sampler="euler"):
    """Sample while recording every calc_cond_batch result and the post-CFG input/output."""
    from comfy.patcher_extension import WrappersMP
    batches, calls = [], []
    recorder = model.clone()

    def record_batches(executor, *args, **kwargs):
        out = executor(*args, **kwargs)
        batches.append([o.clone() for o in out])
        return out

    def record_output(args):
        calls.append({k: args[k] for k in ("input", "sigma", "denoised", "cond_scale")})
        return args["denoised"]

    recorder.add_wrapper_with_key(WrappersMP.CALC_COND_BATCH, "test", record_batches)
    recorder.set_model_sampler_post_cfg_function(record_output)
    result = ksample(comfy, recorder, conds, sampler=sampler)
    return result, batches, calls


@pytest.mark.parametrize("fast_batched", [False, True])
@pytest.mark.parametrize("preset", ["medium", "max"])
def test_engine_output_is_the_core_sld_step_in_x0_space(comfy, pack, tiny_sd15, conds, preset, fast_batched):
    """Every post-CFG output equals x − σ·sld_noise(ε_u, ε_p, ε_S) of the core, with its momentum.

    Compared in x0 space: dividing by the last steps' small σ would only magnify float32 rounding."""
    model = safe_model(pack, tiny_sd15[0], conds["safety"], preset=preset, warmup_unit="steps",
                       fast_batched=fast_batched)
    _, batches, calls = recorded_sampling(comfy, model, conds)
    per_call = 1 if fast_batched else 2
    assert len(batches) == per_call * len(calls) == per_call * STEPS
    params, momentum, gaps = SLD_PRESETS[preset], None, []
    for step, call in enumerate(calls):
        if fast_batched:
            cond, uncond, safety = batches[step]
        else:
            (cond, uncond), (_, safety) = batches[2 * step], batches[2 * step + 1]
        x, sigma = call["input"], call["sigma"].reshape(-1, 1, 1, 1)
        eps = [(x - d) / sigma for d in (uncond, cond, safety)]
        expected, momentum = sld_noise(*eps, call["cond_scale"], momentum, step, params)
        gaps.append((call["denoised"] - (x - sigma * expected)).abs().max().item())
    assert max(gaps) <= 1e-5, gaps


def builtin_node(comfy, filename, node_id):
    """A comfy_extras node, registered by ComfyUI's own loader (the engine fixture loads only nodes.py)."""
    if node_id not in comfy.NODE_CLASS_MAPPINGS:
        path = os.path.join(os.path.dirname(comfy.__file__), "comfy_extras", filename)
        assert asyncio.run(comfy.load_custom_node(path, module_parent="comfy_extras"))
    return comfy.NODE_CLASS_MAPPINGS[node_id]


def schema_default(pack, name):
    """What a new node gets in the frontend (and what object_info reports)."""
    return next(i.default for i in pack["SafeLatentGuidance"].define_schema().inputs if i.id == name)


def test_the_default_batched_path_equals_the_separate_pass(comfy, pack, tiny_sd15, conds):
    assert schema_default(pack, "fast_batched") is True
    separate = safe_model(pack, tiny_sd15[0], conds["safety"], preset="max", fast_batched=False)
    default = safe_model(pack, tiny_sd15[0], conds["safety"], preset="max",
                         fast_batched=schema_default(pack, "fast_batched"))
    a, b = ksample(comfy, separate, conds), ksample(comfy, default, conds)
    assert hooks_of(separate).last_run.safety_passes == STEPS and hooks_of(default).last_run.safety_passes == 0
    assert close(a, b)


def test_an_occupied_calc_cond_batch_slot_falls_back_to_the_separate_pass(comfy, pack, tiny_sd15, conds, caplog):
    """SkipLayerGuidanceDiTSimple holds the slot (on a UNet its DiT layer patch is inert: it only evaluates cond
    and uncond in two calls); SLD keeps it there, says so once, and evaluates the safety concept separately."""
    slg_node = builtin_node(comfy, "nodes_slg.py", "SkipLayerGuidanceDiTSimple")
    slg = slg_node.execute(tiny_sd15[0], 0.0, 1.0, "7", "7").result[0]
    held = slg.model_options["sampler_calc_cond_batch_function"]
    with caplog.at_level(logging.INFO):
        model = safe_model(pack, slg, conds["safety"], preset="max", fast_batched=True)
    assert [r.levelno for r in caplog.records if "calc_cond_batch slot" in r.getMessage()] == [logging.INFO]
    assert model.model_options["sampler_calc_cond_batch_function"] is held
    fallback = ksample(comfy, model, conds)
    assert hooks_of(model).last_run.safety_passes == STEPS
    separate = ksample(comfy, safe_model(pack, tiny_sd15[0], conds["safety"], preset="max", fast_batched=False), conds)
    assert close(fallback, separate)


def test_running_the_same_patched_model_twice_gives_identical_images(comfy, pack, tiny_sd15, conds):
    model = safe_model(pack, tiny_sd15[0], conds["safety"], preset="strong")
    first = ksample(comfy, model, conds)
    first_run = hooks_of(model).last_run
    assert first_run.momentum.current is not None and first_run.momentum.current.abs().max() > 0
    second = ksample(comfy, model, conds)
    assert hooks_of(model).last_run is not first_run
    assert torch.equal(first, second)
    assert torch.equal(first, ksample(comfy, safe_model(pack, tiny_sd15[0], conds["safety"], preset="strong"), conds))


def test_a_clone_of_the_patched_model_samples_the_same(comfy, pack, tiny_sd15, conds):
    """Nodes downstream (LoRA loaders, other patches) clone the MODEL: the hooks come along, state stays per run."""
    model = safe_model(pack, tiny_sd15[0], conds["safety"], preset="strong")
    clone = model.clone()
    assert hooks_of(clone) is hooks_of(model)
    assert torch.equal(ksample(comfy, clone, conds), ksample(comfy, model, conds))


def test_state_resets_when_the_schedule_or_shape_changes_within_one_patch(comfy, pack, tiny_sd15, conds):
    """Base + hires style reuse: a different step count and latent size through the same patched model."""
    model = safe_model(pack, tiny_sd15[0], conds["safety"], preset="max")
    ksample(comfy, model, conds, steps=4)
    small = hooks_of(model).last_run
    ksample(comfy, model, conds, steps=3, latent=torch.zeros(1, 4, 16, 16))
    big = hooks_of(model).last_run
    assert (small.total_steps, tuple(small.shape)) == (4, (1, 4, 8, 8))
    assert (big.total_steps, tuple(big.shape), big.momentum.updates) == (3, (1, 4, 16, 16), 2)


def test_zero_safety_scale_is_exactly_plain_cfg(comfy, pack, tiny_sd15, conds):
    off = safe_model(pack, tiny_sd15[0], conds["safety"], preset="custom", sld_guidance_scale=0.0,
                     sld_momentum_scale=0.5, sld_warmup_fraction=0.0)
    on = safe_model(pack, tiny_sd15[0], conds["safety"], preset="custom", sld_guidance_scale=5000.0,
                    sld_momentum_scale=0.5, sld_warmup_fraction=0.0)
    plain = ksample(comfy, tiny_sd15[0], conds)
    assert torch.equal(ksample(comfy, off, conds), plain)
    assert (ksample(comfy, on, conds) - plain).abs().max() > 1e-4


def test_img2img_counts_the_steps_actually_run(comfy, pack, tiny_sd15, conds):
    model = safe_model(pack, tiny_sd15[0], conds["safety"], preset="medium")
    start = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    ksample(comfy, model, conds, steps=10, denoise=0.5, latent=start)
    run = hooks_of(model).last_run
    assert run.total_steps == 10 and run.warmup_steps == 2
    assert run.guided_evaluations == 8 and run.momentum.updates == 9
    assert run.sigmas[0] < float(model.get_model_object("model_sampling").sigma_max) / 2


def test_batch_momentum_is_per_sample(comfy, pack, tiny_sd15, conds):
    """Sample 0 of a batch of two equals the same seed sampled alone: no state leaks across the batch."""
    model = safe_model(pack, tiny_sd15[0], conds["safety"], preset="max")
    single = ksample(comfy, model, conds, batch=1)
    batch = ksample(comfy, model, conds, batch=2)
    assert tuple(hooks_of(model).last_run.momentum.current.shape) == (2, 4, 8, 8)
    assert close(batch[:1], single)
    assert (batch[1:] - single).abs().max() > 1e-3


def test_the_input_model_is_not_modified(pack, tiny_sd15, conds):
    model = tiny_sd15[0]
    before = (dict(model.model_options), {k: dict(v) for k, v in model.wrappers.items()})
    patched = safe_model(pack, model, conds["safety"], fast_batched=True)
    assert patched is not model and patched.model is model.model
    assert (dict(model.model_options), {k: dict(v) for k, v in model.wrappers.items()}) == before
    assert "sampler_calc_cond_batch_function" in patched.model_options
    assert not patched.model_options.get("disable_cfg1_optimization")  # cfg == 1 keeps ComfyUI's fast path


@pytest.mark.parametrize("fast_batched", [False, True])
@pytest.mark.parametrize("cfg", [1.0, 0.5])
def test_cfg_off_turns_sld_off_with_a_warning_and_equals_plain_cfg_exactly(comfy, pack, tiny_sd15, conds, caplog,
                                                                             cfg, fast_batched):
    """diffusers: ``enable_safety_guidance = sld_guidance_scale > 1 and guidance_scale > 1``; at cfg <= 1 the image
    is ComfyUI's plain sampling bit for bit (no safety pass, and cfg == 1 keeps ComfyUI's cond-only shortcut)."""
    model = safe_model(pack, tiny_sd15[0], conds["safety"], preset="max", fast_batched=fast_batched)
    with caplog.at_level(logging.WARNING):
        guided = ksample(comfy, model, conds, cfg=cfg)
    warnings = [r for r in caplog.records if "turns classifier-free guidance off" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert hooks_of(model).last_run is None  # no SLD state: no safety pass, no momentum
    assert torch.equal(guided, ksample(comfy, tiny_sd15[0], conds, cfg=cfg))
    assert (ksample(comfy, model, conds, cfg=1.5) - ksample(comfy, tiny_sd15[0], conds, cfg=1.5)).abs().max() > 1e-4


def test_both_paths_present_the_safety_pass_as_uncond_to_attention_patches(comfy, pack, tiny_sd15, conds):
    """A real attn2 patch records, for every batch chunk it sees, transformer_options["cond_or_uncond"] and which
    conditioning the chunk carries: the safety concept reads 1 ("uncond") on the separate and the batched path."""
    def record(seen):
        def patch(n, context, value, extra_options):
            kinds = extra_options["cond_or_uncond"]
            for j, chunk in enumerate(context.chunk(len(kinds))):
                name = next(k for k, c in conds.items() if torch.equal(chunk[0].float(), c[0][0][0].float()))
                seen.add((name, kinds[j], len(kinds)))
            return n, context, value
        return patch

    for fast_batched in (False, True):
        seen = set()
        patched = tiny_sd15[0].clone()
        patched.set_model_attn2_patch(record(seen))
        model = safe_model(pack, patched, conds["safety"], preset="max", fast_batched=fast_batched)
        ksample(comfy, model, conds, steps=2)
        kinds = {(name, kind) for name, kind, _ in seen}
        assert kinds == {("positive", 0), ("negative", 1), ("safety", 1)}, (fast_batched, seen)
        assert max(chunks for *_, chunks in seen) == (3 if fast_batched else 2), seen  # batched: one 3-chunk call


# --------------------------------------------------------------------------- fail closed

def test_empty_or_mismatched_safety_concept_is_refused(pack, tiny_sd15, conds):
    model = tiny_sd15[0]
    with pytest.raises(ValueError, match="safety concept is empty"):
        safe_model(pack, model, [])
    sd2_width = [[torch.zeros(1, 77, 1024), {"pooled_output": torch.zeros(1, 1024)}]]
    with pytest.raises(ValueError, match="width 1024 does not fit .* 768"):
        safe_model(pack, model, sd2_width)
    masked = [[conds["safety"][0][0], {**conds["safety"][0][1], "mask": torch.ones(1, 8, 8)}]]
    with pytest.raises(ValueError, match="carries mask"):
        safe_model(pack, model, masked)
    ranged = [[conds["safety"][0][0], {**conds["safety"][0][1], "start_percent": 0.5}]]
    with pytest.raises(ValueError, match="timestep range"):
        safe_model(pack, model, ranged)


def test_flow_models_are_refused(comfy, pack, tiny_sd15, conds):
    import comfy.model_sampling as sampling

    class FlowSampling(sampling.ModelSamplingDiscreteFlow, sampling.CONST):  # what ModelSamplingSD3 installs
        pass

    flow = tiny_sd15[0].clone()
    flow.add_object_patch("model_sampling", FlowSampling(flow.model.model_config))
    with pytest.raises(ValueError, match="flow-matching"):
        safe_model(pack, flow, conds["safety"])


def test_nan_in_the_safety_branch_stops_sampling(comfy, pack, tiny_sd15, conds):
    poisoned = [[torch.full_like(conds["safety"][0][0], float("nan")), dict(conds["safety"][0][1])]]
    model = safe_model(pack, tiny_sd15[0], poisoned)
    with pytest.raises(FloatingPointError, match="safety-concept pass returned NaN"):
        ksample(comfy, model, conds)


def test_a_zeroed_or_empty_text_safety_concept_is_refused(comfy, pack, tiny_sd15, conds):
    """ConditioningZeroOut gives zeros; an empty CLIPTextEncode gives non-zero start/end-token states."""
    encode = comfy.NODE_CLASS_MAPPINGS["CLIPTextEncode"]().encode
    empty = encode(tiny_sd15[1], "")[0]
    assert empty[0][0].any()
    zeroed = comfy.NODE_CLASS_MAPPINGS["ConditioningZeroOut"]().zero_out(conds["safety"])[0]
    with pytest.raises(ValueError, match="all zeros .*ConditioningZeroOut"):
        safe_model(pack, tiny_sd15[0], zeroed)
    for fast_batched in (False, True):  # the empty text as the safety concept and as the negative: SLD is a no-op
        model = safe_model(pack, tiny_sd15[0], empty, fast_batched=fast_batched)
        with pytest.raises(ValueError, match="same conditioning as the sampler's negative prompt"):
            ksample(comfy, model, {**conds, "negative": encode(tiny_sd15[1], "")[0]})


def test_an_empty_text_encode_feeding_the_safety_concept_is_refused_in_a_graph(comfy, pack, tiny_checkpoint):
    from implicit_negatives.comfyui import headless
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny_checkpoint[1]}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "  "}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a photo of a person"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "low quality"}},
        "5": {"class_type": "SafeLatentGuidance", "inputs": {"model": ["1", 0], "safety_concept": ["2", 0], **DEFAULTS}},
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "7": {"class_type": "KSampler", "inputs": {"model": ["5", 0], "positive": ["3", 0], "negative": ["4", 0],
                                                   "latent_image": ["6", 0], "seed": 1, "steps": 2, "cfg": 5.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
        "9": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}},
    }
    builtin_node(comfy, "nodes_primitive.py", "PrimitiveStringMultiline")
    runner = headless.GraphRunner()

    def failure(graph) -> str:
        with pytest.raises(headless.GraphError):
            runner.run(graph)
        return " ".join(data["exception_message"] for event, data in runner.executor.status_messages
                        if event == "execution_error")

    assert "safety concept is an empty text (CLIPTextEncode" in failure(graph)
    graph["10"] = {"class_type": "PrimitiveStringMultiline", "inputs": {"value": ""}}
    graph["2"]["inputs"]["text"] = ["10", 0]
    assert "safety concept is an empty text" in failure(graph)
    graph["10"]["inputs"]["value"] = "nudity"
    assert runner.run(graph)["9"]["images"]


def test_presets_and_warmup_units_resolve_as_documented(pack_module):
    nodes = importlib.import_module(pack_module.__name__ + ".nodes.sld_nodes")
    params, warmup = nodes.resolve_settings("medium", "fraction_of_run", **{k: DEFAULTS[k] for k in (
        "sld_guidance_scale", "sld_warmup_steps", "sld_warmup_fraction", "sld_threshold", "sld_momentum_scale",
        "sld_mom_beta")})
    assert astuple(params) == astuple(SLD_PRESETS["medium"]) and warmup.steps_for(50) == 10 and warmup.steps_for(20) == 4
    params, warmup = nodes.resolve_settings("weak", "steps", 0, 0, 0, 0, 0, 0)
    assert params.guidance_scale == 20.0 and warmup.steps_for(20) == 15
    params, warmup = nodes.resolve_settings("custom", "steps", 200.0, 3, 0.9, 0.0, 0.0, 0.0)
    assert params.guidance_scale == 200.0 and warmup.steps_for(20) == 3
    with pytest.raises(ValueError, match="preset"):
        nodes.resolve_settings("extreme", "steps", 0, 0, 0, 0, 0, 0)


# --------------------------------------------------------------------------- the shipped workflow

def test_api_workflow_runs_to_an_image_in_comfyui_executor(comfy, pack, tiny_checkpoint, embeddings_dir):
    """workflows/api/sld_implicit_negative.json (twin of the UI workflow) through ComfyUI's validator and executor."""
    import json
    import os

    import folder_paths
    from PIL import Image

    from implicit_negatives.comfyui import headless, rig
    from implicit_negatives.embedding_io import save_embedding

    save_embedding(str(embeddings_dir / "sld_test_negative.safetensors"),
                   {"clip_l": torch.randn(1, 768, generator=torch.Generator().manual_seed(5)) * 0.3}, {"concept": "test"})
    with open(os.path.join(headless.PACK_ROOT, "workflows", "api", "sld_implicit_negative.json")) as handle:
        graph = json.load(handle)
    by_type = {node["class_type"]: node["inputs"] for node in graph.values()}
    assert by_type["KSampler"]["model"] == [next(k for k, n in graph.items() if n["class_type"] == "SafeLatentGuidance"), 0]
    by_type["CheckpointLoaderSimple"]["ckpt_name"] = tiny_checkpoint[1]
    by_type["LoadImplicitNegative"]["embedding"] = "sld_test_negative.safetensors"
    by_type["EmptyLatentImage"].update(width=64, height=64)
    by_type["KSampler"]["steps"] = 5
    by_type["SaveImage"]["filename_prefix"] = "sld_graph_test"
    outputs = headless.GraphRunner().run(graph)
    save_id = next(k for k, n in graph.items() if n["class_type"] == "SaveImage")
    images = outputs[save_id]["images"]
    path = os.path.join(folder_paths.get_output_directory(), images[0]["subfolder"], images[0]["filename"])
    assert Image.open(path).size == (64, 64)
