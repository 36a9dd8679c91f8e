"""SAFREE nodes in ComfyUI's real engine with the tiny SD1.5 checkpoint (full-size CLIP-L, random weights).

CLIP-L forwards dominate the cost on CPU, so prompts are short, concepts have one keyword and
each SafreeConditioning result is computed once per module.
"""

import importlib
import json
import os
import re

import pytest
import torch

from implicit_negatives.embedding_io import save_embedding
from implicit_negatives.safree import filter_end_percent

from implicit_negatives.comfyui import headless

SCHEDULE_STEPS = 4  # = the KSampler's steps below, so t' counts KSampler steps exactly
UP_T = 2  # t' in {0, 1, 2}: at least the last of 4 steps always runs unfiltered


@pytest.fixture(scope="module")
def safree(pack_module):
    return importlib.import_module("implicit_negatives.comfyui.safree_patch")


@pytest.fixture(scope="module")
def planted_negative(pack, embeddings_dir):
    """An implicit negative whose single vector is planted in the prompt below."""
    vector = torch.randn(1, 768, generator=torch.Generator().manual_seed(11))
    save_embedding(str(embeddings_dir / "safree_planted.safetensors"), {"clip_l": vector}, {"concept": "test"})
    return pack["LoadImplicitNegative"].execute("safree_planted.safetensors", 1.0).result[0]


def run_safree(pack, clip, prompt, keywords, concept_negative="empty", implicit=None):
    return pack["SafreeConditioning"].execute(clip, prompt, keywords, 0.01, True, UP_T, "default", SCHEDULE_STEPS,
                                              concept_negative, implicit).result


@pytest.fixture(scope="module")
def text_run(pack, tiny_sd15):
    return run_safree(pack, tiny_sd15[1], "a zebra on grass", "zebra", concept_negative="concept")


@pytest.fixture(scope="module")
def implicit_run(pack, tiny_sd15, planted_negative):
    return run_safree(pack, tiny_sd15[1], "a embedding:safree_planted on grass", "", concept_negative="concept",
                      implicit=planted_negative)


def clip_text_encode(comfy, clip, text):
    return comfy.NODE_CLASS_MAPPINGS["CLIPTextEncode"]().encode(clip, text)[0]


def last_filtered_step(report):
    return int(re.search(r"steps 0\.\.(\d+) of", report).group(1))


def check_filtered_only_at_flagged_rows(positive, reference, report, planted_row):
    """Two entries: filtered for [0, end), original for [end, 1]; they differ only at flagged rows."""
    assert len(positive) == 2, report
    (filtered, f_opts), (original, o_opts) = positive
    assert torch.equal(original, reference[0][0])  # the unfiltered entry is exactly CLIPTextEncode's
    assert torch.equal(f_opts["pooled_output"], reference[0][1]["pooled_output"])
    end = filter_end_percent(last_filtered_step(report), SCHEDULE_STEPS)
    assert (f_opts["start_percent"], f_opts["end_percent"]) == (0.0, end)
    assert (o_opts["start_percent"], o_opts["end_percent"]) == (end, 1.0)
    changed = (filtered[0] != original[0]).any(dim=-1).nonzero().flatten().tolist()
    flagged = [int(row) for row in re.findall(r"@(\d+)", report)]
    assert changed == flagged and planted_row in flagged
    assert len(flagged) < 4  # detection is selective: not every prompt token


def test_text_concept_filters_only_flagged_tokens(comfy, tiny_sd15, text_run):
    positive, negative, report = text_run
    check_filtered_only_at_flagged_rows(positive, clip_text_encode(comfy, tiny_sd15[1], "a zebra on grass"),
                                        report, planted_row=2)  # rows: <start> a zebra on grass <end>
    assert torch.equal(negative[0][0], clip_text_encode(comfy, tiny_sd15[1], "zebra")[0][0])  # SAFREE's CFG negative


def test_implicit_concept_filters_only_flagged_tokens(comfy, pack, tiny_sd15, implicit_run, planted_negative):
    positive, negative, report = implicit_run
    reference = clip_text_encode(comfy, tiny_sd15[1], "a embedding:safree_planted on grass")
    check_filtered_only_at_flagged_rows(positive, reference, report, planted_row=2)
    assert "implicit negative 'safree_planted'" in report
    stock = pack["ImplicitNegativeConditioning"].execute(tiny_sd15[1], planted_negative, "", "embedding_only").result[0]
    assert torch.equal(negative[0][0], stock[0][0])  # no keywords: the negative is the implicit negative alone


def official_safree(comfy, clip, prompt, concept_prompts, alpha=0.01):
    """SAFREE's steps 1-3 as the official code runs them (github.com/jaehong31/SAFREE b8b2c3f), on ComfyUI's own
    encoder: ``negative_prompt_space`` = the concept prompts, each encoded alone, whose pooled outputs span
    ``projection_matrix``; ``negative_prompt = ", ".join(space)``; ``_masked_encode_prompt`` sets token i to id
    0; ``safree_projection`` keeps token i unless d_i >= (1 + alpha) mean_{j != i} d_j. C* enters as its prompt
    ``embedding:NAME``, as a textual-inversion token enters the official pipeline. Returns (hidden states with the
    trigger rows projected (T, D) float64, trigger rows (T,) bool, the negative CONDITIONING)."""
    def pooled(tokens):
        return clip.encode_from_tokens(tokens, return_pooled="unprojected")[1][0].double()

    chunk = clip.tokenize(prompt)["l"][0]
    masked = torch.stack([pooled({"l": [row]}) for row in official_masked_rows(chunk)])
    hidden = clip_text_encode(comfy, clip, prompt)[0][0][0].double()
    concept = torch.stack([pooled(clip.tokenize(text)) for text in concept_prompts])
    filtered, triggers = official_projection(concept, masked, hidden, alpha)
    return filtered, triggers, clip_text_encode(comfy, clip, ", ".join(concept_prompts))


def official_masked_rows(chunk: list) -> list[list]:
    """``_masked_encode_prompt``'s token rows: the prompt with prompt token i (1..n, between start and end token)
    replaced by id 0, one row per i."""
    n = next(i for i, (token, *_) in enumerate(chunk) if isinstance(token, int) and token == 49407) - 1
    return [chunk[:i] + [(0, chunk[i][1])] + chunk[i + 1:] for i in range(1, n + 1)]


def official_projection(concept: torch.Tensor, masked: torch.Tensor, hidden: torch.Tensor, alpha: float):
    """``projection_matrix`` + ``safree_projection`` of the official code in float64: ``concept`` (K, D) pooled
    outputs spanning the concept, ``masked`` (n, D) the leave-one-out pooled outputs of prompt tokens 1..n,
    ``hidden`` (T, D) the prompt's hidden states. Token i triggers unless d_i < (1 + alpha) mean_{j != i} d_j;
    trigger rows are projected (away from the concept, inside the prompt's span). Returns (filtered (T, D),
    triggers (T,) bool)."""
    space = concept.T
    concept_projection = space @ torch.linalg.pinv(space.T @ space) @ space.T
    inside = masked.T @ torch.linalg.pinv(masked @ masked.T) @ masked
    away = torch.eye(concept_projection.shape[0], dtype=torch.float64) - concept_projection
    distance = (away @ masked.T).norm(dim=0)
    n = masked.shape[0]
    mean_of_others = torch.stack([torch.cat([distance[:i], distance[i + 1:]]).mean() for i in range(n)])
    triggers = torch.zeros(hidden.shape[0], dtype=torch.bool)
    triggers[1:n + 1] = ~(distance < (1.0 + alpha) * mean_of_others)
    return torch.where(triggers[:, None], (away @ inside @ hidden.T).T, hidden), triggers


PLANTED_PROMPT = "a embedding:safree_planted zebra"
CONCEPTS = {  # implicit_negative_use -> (keywords written, implicit negative connected, the official concept space)
    "text": ("zebra", False, ["zebra"]),
    "replace": ("zebra", True, ["embedding:safree_planted"]),
    "add": ("zebra", True, ["zebra", "embedding:safree_planted"]),
}


@pytest.fixture(scope="module")
def official(comfy, tiny_sd15, planted_negative):
    return {use: official_safree(comfy, tiny_sd15[1], PLANTED_PROMPT, space) for use, (*_, space) in CONCEPTS.items()}


@pytest.mark.parametrize("use", list(CONCEPTS))
def test_subspace_and_negative_with_and_without_the_implicit_negative_follow_the_official_steps(
        pack, tiny_sd15, planted_negative, official, use):
    """Text concept; C* replacing the keywords (the default, the paper's SAFREE + C*); C* added to them: the
    filtered prompt and the CFG negative are the official code's for the concept space each one means."""
    keywords, connected, _ = CONCEPTS[use]
    inputs = {} if use == "text" else {"implicit_negative_use": use}
    positive, negative, report = pack["SafreeConditioning"].execute(
        tiny_sd15[1], PLANTED_PROMPT, keywords, 0.01, True, UP_T, "default", SCHEDULE_STEPS, "concept",
        planted_negative if connected else None, **inputs).result
    expected, triggers, expected_negative = official[use]
    assert triggers.any() and len(positive) == 2, report
    assert [int(row) for row in re.findall(r"@(\d+)", report)] == triggers.nonzero().flatten().tolist()
    filtered = positive[0][0][0].double()
    assert (filtered - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert torch.equal(filtered[~triggers], expected[~triggers])  # untouched rows are CLIPTextEncode's, bit for bit
    assert torch.equal(negative[0][0], expected_negative[0][0])
    for other, (other_expected, _, _) in official.items():  # the comparison tells the three concepts apart
        if other != use:
            assert (filtered - other_expected).abs().max() > 1e-3 * expected.abs().max(), other
    if use == "replace":
        assert "alone (replace; the 1 keyword(s) are not used)" in report


def test_replace_is_the_default_with_an_implicit_negative(pack, tiny_sd15, planted_negative):
    schema = pack["SafreeConditioning"].define_schema()
    assert [i.id for i in schema.inputs][-2:] == ["implicit_negative", "implicit_negative_use"]  # appended
    use = schema.inputs[-1]
    assert use.default == "replace" and use.optional


def test_batched_pooled_outputs_equal_comfyui_unprojected_pooled(safree, tiny_sd15):
    clip = tiny_sd15[1]
    tokens = clip.tokenize("a zebra")
    ours = safree.pooled_outputs(clip, "l", [tokens["l"][0], clip.tokenize("grass")["l"][0]])
    _, stock = clip.encode_from_tokens(tokens, return_pooled="unprojected")
    assert ours.shape == (2, 768)
    assert torch.allclose(ours[0], stock[0].float(), atol=1e-5)


class StepRecorder:
    """An APPLY_MODEL wrapper recording, per call, the step index and the positive rows' cross-attention."""

    def __init__(self, sigmas):
        self.sigmas, self.calls = sigmas, []

    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kw):
        step = int((self.sigmas - t[0].item()).abs().argmin())
        kinds = transformer_options["cond_or_uncond"]
        per_chunk = x.shape[0] // len(kinds)
        for j, kind in enumerate(kinds):
            if kind == 0:
                self.calls.append((step, c_crossattn[j * per_chunk].clone(), transformer_options.get("safree_lra")))
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kw)


def sample(comfy, model, positive, negative, seed=3):
    latent = comfy.NODE_CLASS_MAPPINGS["EmptyLatentImage"]().generate(64, 64, 1)[0]
    return comfy.NODE_CLASS_MAPPINGS["KSampler"]().sample(model, seed, SCHEDULE_STEPS, 5.0, "euler", "simple",
                                                            positive, negative, latent)[0]["samples"]


def recorded_model(model):
    import comfy.patcher_extension
    import comfy.samplers
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", SCHEDULE_STEPS)
    recorder = StepRecorder(sigmas[:-1])
    recorded = model.clone()
    recorded.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test_recorder", recorder)
    return recorded, recorder


def test_ksampler_uses_the_filtered_prompt_exactly_for_steps_up_to_t_prime(comfy, tiny_sd15, text_run):
    positive, negative, report = text_run
    model, recorder = recorded_model(tiny_sd15[0])
    sample(comfy, model, positive, negative)
    last = last_filtered_step(report)
    filtered, original = positive[0][0][0], positive[1][0][0]
    seen = {}
    for step, rows, _ in recorder.calls:
        kind = "filtered" if torch.equal(rows, filtered) else "original" if torch.equal(rows, original) else "other"
        seen.setdefault(step, set()).add(kind)
    assert seen == {step: {"filtered" if step <= last else "original"} for step in range(SCHEDULE_STEPS)}


def test_reattention_switch_off_returns_the_model_untouched(pack, tiny_sd15, text_run):
    model = tiny_sd15[0]
    assert pack["SafreeLatentReAttention"].execute(model, text_run[0], False, 0.9, 0.2).result[0] is model


def test_reattention_pairs_the_original_branch_only_while_filtering(comfy, pack, tiny_sd15, text_run):
    """On the tiny UNet (no 640/1280 stage) the extra branch must leave the result unchanged."""
    positive, negative, report = text_run
    patched = pack["SafreeLatentReAttention"].execute(tiny_sd15[0], positive, True, 0.9, 0.2).result[0]
    model, recorder = recorded_model(patched)
    with_lra = sample(comfy, model, positive, negative)
    without = sample(comfy, tiny_sd15[0], positive, negative)
    assert torch.allclose(with_lra, without, atol=1e-4)
    last = last_filtered_step(report)
    paired_steps = sorted({step for step, _, pairs in recorder.calls if pairs is not None})
    assert paired_steps == list(range(last + 1))
    for step, rows, pairs in recorder.calls:
        if pairs is not None:  # one latent, one filtered row; its original-prompt twin appended after the batch
            assert pairs["filtered"].numel() == 1 and pairs["original"].numel() == 1
            assert pairs["original"].item() > pairs["filtered"].item()


def test_reattention_refuses_a_conditioning_that_is_not_safree(comfy, pack, tiny_sd15):
    plain = clip_text_encode(comfy, tiny_sd15[1], "a cat")
    with pytest.raises(ValueError, match="positive' output of SAFREE Conditioning"):
        pack["SafreeLatentReAttention"].execute(tiny_sd15[0], plain, True, 0.9, 0.2)


def test_conditioning_refuses_an_empty_concept(pack, tiny_sd15):
    with pytest.raises(ValueError, match="needs a concept"):
        run_safree(pack, tiny_sd15[1], "a cat", " , ")


def tiny_unet():
    """A 3-level ComfyUI UNet (32/64/128 channels) so FreeU's 2x and 4x stages exist."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    unet = UNetModel(image_size=8, in_channels=4, model_channels=32, out_channels=4, num_res_blocks=[1, 1, 1],
                     channel_mult=[1, 2, 4], transformer_depth=[0, 0, 0], transformer_depth_output=[0] * 6,
                     transformer_depth_middle=-2, num_heads=1, use_spatial_transformer=False,
                     operations=comfy.ops.disable_weight_init)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in unet.named_parameters():  # comfy ops skip init: fill deterministically
            parameter.copy_(torch.ones_like(parameter) if "norm" in name and name.endswith("weight")
                            else torch.randn(parameter.shape, generator=generator) * 0.1)
    return unet


def test_reattention_patch_changes_only_paired_rows_at_the_two_freeu_stages(safree):
    from implicit_negatives.safree import latent_reattention
    unet = tiny_unet()
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))  # rows: uncond, filtered, original
    timesteps = torch.tensor([500.0, 500.0, 500.0])

    def run(patches, pairs=None):
        seen = []
        options = {"patches": {"output_block_patch": patches + [lambda h, hsp, o: seen.append(
            (int(h.shape[1]), hsp.clone())) or (h, hsp)]}}
        if pairs is not None:
            options["safree_lra"] = pairs
        with torch.no_grad():
            unet(x, timesteps, transformer_options=options)
        return seen

    pairs = {"filtered": torch.tensor([1]), "original": torch.tensor([2])}
    patch = safree.reattention_output_block_patch({128: 0.9, 64: 0.2})
    baseline, patched = run([]), run([patch], pairs)
    assert [c for c, _ in baseline] == [c for c, _ in patched] and {128, 64, 32} <= {c for c, _ in baseline}
    for (channels, before), (_, after) in zip(baseline, patched):
        assert torch.equal(after[0], before[0]) and torch.equal(after[2], before[2])  # uncond, original untouched
        if channels in (128, 64):
            scale = 0.9 if channels == 128 else 0.2
            expected = latent_reattention(before[1:2], before[2:3], scale)[0]
            assert torch.allclose(after[1], expected, atol=1e-5)
            assert not torch.allclose(after[1], before[1], atol=1e-4)
        else:
            assert torch.equal(after[1], before[1])  # the base-channel stage is not FreeU's
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(baseline, run([patch])))  # no pairs -> no change


def test_api_workflow_runs_in_comfyui_executor(comfy, pack, tiny_checkpoint, planted_negative):
    with open(os.path.join(headless.PACK_ROOT, "workflows", "api", "safree_implicit_negative.json")) as handle:
        graph = json.load(handle)
    for node in graph.values():
        inputs = node["inputs"]
        if node["class_type"] == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = tiny_checkpoint[1]
        if node["class_type"] == "LoadImplicitNegative":
            inputs["embedding"] = "safree_planted.safetensors"
        if node["class_type"] == "SafreeConditioning":
            inputs.update(prompt="a embedding:safree_planted on grass", concept_keywords="zebra")
        if node["class_type"] == "EmptyLatentImage":
            inputs.update(width=64, height=64)
        if node["class_type"] == "KSampler":
            inputs["steps"] = 2
        if node["class_type"] == "SaveImage":
            inputs["filename_prefix"] = "safree_graph_test"
    outputs = headless.GraphRunner().run(graph)

    images = [image for out in outputs.values() for image in out.get("images", [])]
    assert len(images) == 1
