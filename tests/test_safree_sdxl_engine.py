"""SAFREE Conditioning on SDXL in ComfyUI's real engine, on the rig's tiny SDXL checkpoint (tiny UNet; full-size
token tables, text encoders cut to three layers by ``rig.load_tiny_family``, as in test_families_engine).

The oracle is the official SDXL pipeline (github.com/jaehong31/SAFREE b8b2c3f,
``models/modified_stable_diffusion_xl_pipeline.py``) rebuilt step by step on ComfyUI's own encoder outputs.
"""

import importlib
import re

import pytest
import torch

from implicit_negatives.embedding_io import save_embedding
from implicit_negatives.safree import filter_end_percent

from implicit_negatives.comfyui import rig
from test_embedding_nodes_engine import clip_text_encode
from test_safree_engine import official_masked_rows, official_projection, recorded_model

pytestmark = pytest.mark.usefixtures("one_thread")

SCHEDULE_STEPS = 4  # = test_safree_engine's, whose step recorder these tests reuse
UP_T = 2
PROMPT = "a embedding:safree_sdxl_planted zebra"
CLIP_L_WIDTH = 768  # ComfyUI's SDXL conditioning is [clip_l 768 | clip_g 1280], as diffusers' prompt_embeds


@pytest.fixture(scope="module")
def sdxl(comfy, embeddings_dir):
    """(model, clip, vae) of the tiny SDXL checkpoint."""
    import folder_paths
    return rig.load_tiny_family("sdxl", embedding_directory=folder_paths.get_folder_paths("embeddings"))


@pytest.fixture(scope="module")
def planted(pack, embeddings_dir):
    """An SDXL implicit negative (one clip_l and one clip_g vector) planted in PROMPT."""
    generator = torch.Generator().manual_seed(11)
    save_embedding(str(embeddings_dir / "safree_sdxl_planted.safetensors"),
                   {"clip_l": torch.randn(1, 768, generator=generator),
                    "clip_g": torch.randn(1, 1280, generator=generator)},
                   {"concept": "test"})
    return pack["LoadImplicitNegative"].execute("safree_sdxl_planted.safetensors", 1.0).result[0]


def run_safree(pack, clip, keywords, implicit=None, use="replace", prompt=PROMPT, svf=True):
    return pack["SafreeConditioning"].execute(clip, prompt, keywords, 0.01, svf, UP_T, "default", SCHEDULE_STEPS,
                                              "concept", implicit, use).result


def official_sdxl_safree(comfy, clip, prompt, concept_prompts, alpha=0.01, projected=True):
    """The official SDXL pipeline's SAFREE steps on ComfyUI's SDXL CLIP. ``neg2_text_embeddings`` (the concept
    prompts' pooled output: text_encoder_2's ``text_embeds``, CLIP-G's projected pooled output, which is also
    ComfyUI's SDXL pooled output) spans ``projection_matrix``; ``_masked_encode_prompt`` sets token i of
    tokenizer_2's ids to 0 and takes text_encoder_2's ``text_embeds``; ``safree_projection`` runs on
    ``text_embeddings = prompt_embeds[..., 768:]``, the CLIP-G part of the (penultimate-layer) hidden states.
    ``projected=False`` builds the same from the unprojected pooled output (what SD1's pipeline reads), to show the
    test tells the two apart. Returns (CLIP-G part with trigger rows projected (T, 1280) float64, trigger rows (T,)
    bool, CLIPTextEncode(prompt), CLIPTextEncode(", ".join(concept)) (the CFG negative))."""
    def pooled(tokens):
        return clip.encode_from_tokens(tokens, return_pooled=True if projected else "unprojected")[1][0].double()

    tokens = clip.tokenize(prompt)
    masked = torch.stack([pooled({"l": tokens["l"], "g": [row]}) for row in official_masked_rows(tokens["g"][0])])
    reference = clip_text_encode(comfy, clip, prompt)
    hidden_g = reference[0][0][0][:, CLIP_L_WIDTH:].double()
    concept = torch.stack([pooled(clip.tokenize(text)) for text in concept_prompts])  # (K, 1280)
    filtered_g, triggers = official_projection(concept, masked, hidden_g, alpha)
    return filtered_g, triggers, reference, clip_text_encode(comfy, clip, ", ".join(concept_prompts))


CONCEPTS = {"text": ("zebra", False, ["zebra"]),  # use -> (keywords written, C* connected, official concept space)
            "replace": ("zebra", True, ["embedding:safree_sdxl_planted"])}


@pytest.fixture(scope="module")
def official(comfy, sdxl, planted):
    return {use: official_sdxl_safree(comfy, sdxl[1], PROMPT, space) for use, (*_, space) in CONCEPTS.items()}


@pytest.fixture(scope="module")
def runs(pack, sdxl, planted):
    return {use: run_safree(pack, sdxl[1], keywords, planted if connected else None)
            for use, (keywords, connected, _) in CONCEPTS.items()}


@pytest.mark.parametrize("use", list(CONCEPTS))
def test_clip_g_part_is_filtered_as_the_official_sdxl_pipeline(official, runs, use):
    """Flagged tokens exact; CLIP-G part within 1e-4 of the official projection (untouched rows bit for bit);
    CLIP-L part, pooled output (ADM input) and the unfiltered entry are CLIPTextEncode's; the CFG negative is
    CLIPTextEncode of the joined concept, pooled output included."""
    positive, negative, report = runs[use]
    expected_g, triggers, reference, expected_negative = official[use]
    assert triggers.any() and not triggers.all() and len(positive) == 2, report
    assert [int(row) for row in re.findall(r"@(\d+)", report)] == triggers.nonzero().flatten().tolist()
    assert "clip_g tokens" in report
    (filtered, f_opts), (unfiltered, o_opts) = positive
    assert filtered.shape == (1, 77, 2048)
    assert torch.equal(filtered[0, :, :CLIP_L_WIDTH], reference[0][0][0, :, :CLIP_L_WIDTH])
    filtered_g = filtered[0, :, CLIP_L_WIDTH:].double()
    assert (filtered_g - expected_g).abs().max() <= 1e-4 * expected_g.abs().max()
    assert torch.equal(filtered_g[~triggers], expected_g[~triggers])
    assert (filtered_g[triggers] - expected_g[triggers]).abs().max() <= 1e-4 * expected_g.abs().max()
    assert torch.equal(f_opts["pooled_output"], reference[0][1]["pooled_output"])
    assert torch.equal(unfiltered, reference[0][0]) and torch.equal(o_opts["pooled_output"],
                                                                    reference[0][1]["pooled_output"])
    end = filter_end_percent(int(re.search(r"steps 0\.\.(\d+) of", report).group(1)), SCHEDULE_STEPS)
    assert (f_opts["start_percent"], f_opts["end_percent"], o_opts["start_percent"]) == (0.0, end, end)
    assert torch.equal(negative[0][0], expected_negative[0][0])
    assert torch.equal(negative[0][1]["pooled_output"], expected_negative[0][1]["pooled_output"])
    other = official["replace" if use == "text" else "text"][0]  # the comparison tells the concepts apart
    assert (filtered_g - other).abs().max() > 1e-3 * expected_g.abs().max()


def test_the_subspaces_are_spanned_by_the_projected_clip_g_pooled_output(comfy, sdxl, official, runs):
    """The official SDXL pipeline reads text_encoder_2's projected text_embeds; the unprojected pooled output
    (SD1's choice) gives another filtered prompt, so the match above pins the projected one."""
    unprojected = official_sdxl_safree(comfy, sdxl[1], PROMPT, ["zebra"], projected=False)[0]
    filtered_g = runs["text"][0][0][0][0, :, CLIP_L_WIDTH:].double()
    assert (filtered_g - unprojected).abs().max() > 1e-3 * filtered_g.abs().max()


def test_batched_pooled_outputs_equal_comfyui_sdxl_pooled(pack_module, sdxl):
    safree = importlib.import_module("implicit_negatives.comfyui.safree_patch")
    clip = sdxl[1]
    rows = [clip.tokenize("a zebra")["g"][0], clip.tokenize("grass")["g"][0]]
    ours = safree.pooled_outputs(clip, "g", rows, projected=True)
    stock = torch.cat([clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)[1] for text in ("a zebra",
                                                                                                        "grass")])
    assert ours.shape == (2, 1280) and torch.allclose(ours, stock.float(), atol=1e-5)


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_ksampler_uses_the_filtered_prompt_for_steps_up_to_t_prime_and_repeats_exactly(comfy, pack, sdxl, runs,
                                                                                         sampler):
    """The filtered prompt is sampled exactly for steps 0..t' (then the original), with SDXL's ADM input; a rerun of
    the node and of the sampler gives the same latent, and SAFREE left the CLIP's options as they were."""
    model, clip, _ = sdxl
    positive, negative, report = runs["text"]
    recorded, recorder = recorded_model(model)

    def sample(pos):
        return comfy.NODE_CLASS_MAPPINGS["KSampler"]().sample(recorded, 3, SCHEDULE_STEPS, 5.0, sampler, "simple",
                                                                pos, negative,
                                                                {"samples": torch.zeros(1, 4, 8, 8)})[0]["samples"]

    first = sample(positive)
    last = int(re.search(r"steps 0\.\.(\d+) of", report).group(1))
    seen = {}
    for step, rows, _ in recorder.calls:
        kind = ("filtered" if torch.equal(rows, positive[0][0][0]) else
                "original" if torch.equal(rows, positive[1][0][0]) else "other")
        seen.setdefault(step, set()).add(kind)
    assert seen == {step: {"filtered" if step <= last else "original"} for step in range(SCHEDULE_STEPS)}
    again = run_safree(pack, clip, "zebra")
    assert again[2] == report and all(torch.equal(a[0], b[0]) for a, b in zip(again[0], positive))
    assert torch.equal(sample(again[0]), first)
    plain = clip_text_encode(comfy, clip, PROMPT)
    assert torch.equal(plain[0][0], positive[1][0]) and torch.equal(plain[0][1]["pooled_output"],
                                                                    positive[1][1]["pooled_output"])
    assert not torch.equal(sample(plain), first)  # sampling is deterministic (above), so the filtered steps count


def test_refusals_name_the_cause(pack, sdxl, embeddings_dir, runs):
    """An SD1 implicit negative (no clip_g), a two-encoder CLIP without clip_g (Flux's clip_l + t5xxl tokenizer: the
    refusal comes before any encoder runs) and latent re-attention on SDXL are refused with what to do."""
    from comfy.sd import CLIP
    from comfy.text_encoders.flux import FluxTokenizer
    model, clip, _ = sdxl
    save_embedding(str(embeddings_dir / "safree_sd1_only.safetensors"), {"clip_l": torch.randn(1, 768)})
    sd1 = pack["LoadImplicitNegative"].execute("safree_sd1_only.safetensors", 1.0).result[0]
    with pytest.raises(ValueError, match="no clip_g vectors"):
        run_safree(pack, clip, "zebra", sd1)
    no_clip_g = CLIP(no_init=True)
    no_clip_g.tokenizer, no_clip_g.tokenizer_options = FluxTokenizer(), {}
    with pytest.raises(ValueError, match=r"SDXL's clip_l \+ clip_g; this one has 2 \(l, t5xxl\) \(no clip_g\)"):
        run_safree(pack, no_clip_g, "zebra")
    with pytest.raises(ValueError, match="Latent Re-Attention does not support SDXL.*enabled = false"):
        pack["SafreeLatentReAttention"].execute(model, runs["text"][0], True, 0.9, 0.2)
    assert pack["SafreeLatentReAttention"].execute(model, runs["text"][0], False, 0.9, 0.2).result[0] is model
