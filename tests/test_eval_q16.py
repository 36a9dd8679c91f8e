"""Q16 without the real weights: the classification rule, safe loading of the prompts, clear errors, and the
whole path through a tiny random CLIP saved locally (the real ViT-L/14 only changes the numbers)."""

import os
import pickle

import numpy as np
import pytest


from evaluation import cli
from evaluation import q16_scorer as q16


def test_rule_is_softmax_of_100_cosines():
    prompts = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    features = np.array([[2.0, 0.1], [0.1, 3.0], [1.0, 1.0]], np.float32)
    probabilities = q16.q16_probabilities(features, prompts)
    import torch
    cos = torch.nn.functional.normalize(torch.from_numpy(features), dim=-1) @ torch.nn.functional.normalize(
        torch.from_numpy(prompts), dim=-1).T
    assert np.allclose(probabilities, torch.softmax(100 * cos, dim=-1).numpy(), atol=1e-6)
    assert probabilities[0, 1] < 1e-30 and probabilities[1, 0] < 1e-30 and probabilities[2, 1] == pytest.approx(0.5)


def test_pickle_is_converted_without_running_code(tmp_path):
    prompts = np.random.default_rng(0).normal(size=(2, 768)).astype(np.float16)  # Q16 keeps fp16 arrays
    with open(tmp_path / "prompts.p", "wb") as handle:
        pickle.dump(prompts, handle)
    assert cli.main(["convert-q16", str(tmp_path / "prompts.p"), str(tmp_path / "q16.safetensors")]) == 0
    assert np.array_equal(q16.load_q16_prompts(str(tmp_path / "q16.safetensors")), prompts.astype(np.float32))
    np.save(tmp_path / "q16.npy", prompts.astype(np.float32))
    assert np.array_equal(q16.load_q16_prompts(str(tmp_path / "q16.npy")), prompts.astype(np.float32))

    class Exploit:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    with open(tmp_path / "evil.p", "wb") as handle:
        pickle.dump(Exploit(), handle)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load (posix|nt|os).system"):
        q16.convert_q16_pickle(str(tmp_path / "evil.p"), str(tmp_path / "evil.safetensors"))
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(q16.Q16Unavailable, match="convert Q16's prompts.p"):
        q16.load_q16_prompts(str(tmp_path / "prompts.p"))


def test_missing_weights_give_clear_errors(tmp_path, capsys):
    np.save(tmp_path / "q16.npy", np.zeros((2, 768), np.float32))
    with pytest.raises(q16.Q16Unavailable, match="local CLIP ViT-L/14 folder"):
        q16.Q16Classifier(str(tmp_path / "no-clip"), str(tmp_path / "q16.npy"))
    with pytest.raises(q16.Q16Unavailable, match="prompts file not found"):
        q16.load_q16_prompts(str(tmp_path / "none.safetensors"))
    np.save(tmp_path / "bad.npy", np.zeros((3, 768), np.float32))
    with pytest.raises(q16.Q16Unavailable, match="\\(2, D\\) array"):
        q16.load_q16_prompts(str(tmp_path / "bad.npy"))
    (tmp_path / "imgs").mkdir()
    assert cli.main(["q16", str(tmp_path / "imgs"), "--clip", str(tmp_path / "no-clip"),
                     "--prompts", str(tmp_path / "q16.npy")]) == 2
    assert "local CLIP ViT-L/14 folder" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel
    import torch
    torch.manual_seed(0)
    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(text_config=dict(small, vocab_size=100, max_position_embeddings=16),
                        vision_config=dict(small, image_size=32, patch_size=16), projection_dim=8)
    folder = tmp_path_factory.mktemp("tiny-clip")
    CLIPModel(config).save_pretrained(str(folder))
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(str(folder))
    return folder


def test_classifier_decides_by_the_nearer_prompt(tiny_clip, tmp_path):
    from safetensors.numpy import save_file
    image = np.random.default_rng(1).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    save_file({"prompts": np.zeros((2, 8), np.float32) + 1}, str(tmp_path / "probe.safetensors"))
    probe = q16.Q16Classifier(str(tiny_clip), str(tmp_path / "probe.safetensors"))
    import torch
    inputs = probe.processor(images=[image], return_tensors="pt")
    with torch.no_grad():
        output = probe.model.get_image_features(**inputs)
    embedding = getattr(output, "pooler_output", output)[0].numpy()
    for order, expected in [((-embedding, embedding), True), ((embedding, -embedding), False)]:
        save_file({"prompts": np.stack(order).astype(np.float32)}, str(tmp_path / "p.safetensors"))
        result = q16.Q16Classifier(str(tiny_clip), str(tmp_path / "p.safetensors")).classify([image])
        assert result[0]["inappropriate"] is expected
        assert result[0]["p_inappropriate"] == pytest.approx(1.0 if expected else 0.0, abs=1e-6)
    save_file({"prompts": np.zeros((2, 768), np.float32)}, str(tmp_path / "wide.safetensors"))
    with pytest.raises(q16.Q16Unavailable, match="768 wide but this CLIP projects to 8"):
        q16.Q16Classifier(str(tiny_clip), str(tmp_path / "wide.safetensors"))
