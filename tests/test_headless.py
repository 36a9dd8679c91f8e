"""The headless engine names what failed: ComfyUI's validation objections and execution errors as readable lines."""

import pytest

from implicit_negatives.comfyui import headless


def sld_graph(comfy, checkpoint: str) -> dict:
    """Tiny txt2img through SafeLatentGuidance whose safety concept is all zeros (SLD refuses it when it runs)."""
    schema = comfy.NODE_CLASS_MAPPINGS["SafeLatentGuidance"].INPUT_TYPES()["required"]
    defaults = {name: spec[1]["default"] for name, spec in schema.items() if len(spec) > 1 and "default" in spec[1]}
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "text": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "nudity"}},
        "zero": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["text", 0]}},
        "sld": {"class_type": "SafeLatentGuidance",
                "inputs": {**defaults, "model": ["ckpt", 0], "safety_concept": ["zero", 0]}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "sample": {"class_type": "KSampler", "inputs": {
            "model": ["sld", 0], "positive": ["text", 0], "negative": ["text", 0], "latent_image": ["latent", 0],
            "seed": 0, "steps": 1, "cfg": 7.5, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["ckpt", 2]}},
        "show": {"class_type": "PreviewImage", "inputs": {"images": ["decode", 0]}},
    }


def test_an_execution_error_is_reported_with_the_node_and_the_message(comfy, pack, tiny_checkpoint):
    with pytest.raises(headless.GraphError, match=r"SafeLatentGuidance node 'sld': [\w.]*SafeLatentGuidanceError: "
                                                  r"Safety concept entry 0 is all zeros"):
        headless.GraphRunner().run(sld_graph(comfy, tiny_checkpoint[1]))


def test_a_validation_objection_names_node_input_and_value(comfy, pack, tiny_checkpoint):
    problems, _ = headless.GraphRunner().validate(sld_graph(comfy, "no-such.safetensors"))
    assert any("CheckpointLoaderSimple node 'ckpt'" in p and "no-such.safetensors" in p for p in problems), problems
