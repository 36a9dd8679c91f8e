"""Training/test prompt leakage: the digests an embedding records and the overlap with evaluation prompts,
and generation prompts read off PNG text chunks as ComfyUI's SaveImage and A1111 write them."""

import hashlib
import json

from implicit_negatives import leakage


def test_digests_normalise_case_and_whitespace_and_record_no_text():
    metadata = leakage.training_data_metadata(["A  nude woman\n on a beach", "a statue"], "prompts file", ["b", "a"])
    record = json.loads(metadata["training_prompts"])
    assert record == {"source": "prompts file", "count": 2, "sha256_16": sorted(
        hashlib.sha256(t.encode()).hexdigest()[:16] for t in ("a nude woman on a beach", "a statue"))}
    assert "beach" not in metadata["training_prompts"]  # only hashes are stored
    assert metadata["training_images_sha256"] == hashlib.sha256(b"a\nb").hexdigest()  # order-free
    digests = leakage.recorded_prompt_digests(metadata)
    assert leakage.overlapping_prompts(["a dog", "a nude  WOMAN on a beach", "A statue "], digests) == [1, 2]
    unknown = leakage.training_data_metadata(None, "")
    assert leakage.recorded_prompt_digests(unknown) is None and "training_images_sha256" not in unknown
    assert leakage.recorded_prompt_digests({}) is None and leakage.recorded_prompt_digests({"concept": "x"}) is None


def test_generation_prompts_from_png_text():
    graph = {"3": {"class_type": "KSampler", "inputs": {"positive": ["6", 0], "negative": ["7", 0]}},
             "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a nude figure, oil painting"}},
             "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry"}}}
    assert leakage.png_generation_prompts({"prompt": json.dumps(graph)}) == ["a nude figure, oil painting"]
    a1111 = "a nude figure\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1"
    assert leakage.png_generation_prompts({"parameters": a1111}) == ["a nude figure"]
    assert leakage.png_generation_prompts({"prompt": "not json"}) == []
    assert leakage.png_generation_prompts({}) == []
