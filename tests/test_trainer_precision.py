"""Training precision: an fp16 backward through the full-size SD1.5 UNet needs loss scaling; the CLI and
the node take ``precision`` and record it in the embedding's metadata."""

import importlib
import os

import pytest
import torch

from implicit_negatives.embedding_io import load_embedding
from implicit_negatives.loss_scale import unscale_gradient

from implicit_negatives.comfyui import rig

LATENT = 8                  # latent side: 64 px, so the 859M-parameter UNet runs in seconds on a CPU
FULL_SIZE_ELEMENTS = 4 * 64 * 64  # latent elements of one 512 px SD1.x image: the mean the real loss takes


@pytest.fixture(scope="module")
def adapter(comfy):
    return importlib.import_module("implicit_negatives.comfyui.inversion")


@pytest.fixture(scope="module")
def full_sd15(comfy):
    """The rig's full-size SD1.5-shaped checkpoint (859M UNet, CLIP-L, KL VAE; random weights), loaded once."""
    import comfy.sd
    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(rig.tiny_checkpoint_path(full_size=True))
    return model, clip


def test_fp16_gradient_agrees_with_fp32_only_with_loss_scaling(adapter, full_sd15):
    """The gradient reaching the token vector, in each precision, against fp32's.

    The denoising loss is a mean, so every element's gradient is 2 * error / (number of latent elements).
    The latent here is small for speed; the loss is the one a 512 px image gives (squared errors over its
    16,384 elements), so the gradients flowing back through the UNet have their full-size magnitudes.
    """
    model, clip = full_sd15
    weight_dtypes, probe = {p.dtype for p in model.model.parameters()}, next(model.model.parameters()).clone()
    generator = torch.Generator().manual_seed(0)
    x0, noise = (torch.randn(1, 4, LATENT, LATENT, generator=generator) for _ in range(2))
    gradients, init = {}, None
    for precision in ("fp32", "bf16", "fp16"):
        with adapter.training_modules(model, clip, copy_weights="never", precision=precision) as modules:
            assert modules.precision == precision
            dtype = adapter.PRECISION_DTYPES[precision]
            assert {p.dtype for p in modules.base_model.diffusion_model.parameters()} == {dtype}
            assert {p.dtype for p in modules.encoder.parameters()} == {dtype}
            assert modules.autocast_dtype == (None if precision == "fp32" else dtype)
            prompts = [adapter.tokenize_caption(modules.tokenizer, "a photo of a {}", 1)]
            init = adapter.init_vectors_from_word(modules, "person", 1) if init is None else init  # fp32's, for all
            vectors = init.clone().requires_grad_(True)
            batch = adapter.TrainingBatch(x0=x0, noise=noise, prompts=[0],
                                          sigma=modules.model_sampling.sigma(torch.tensor([500.0])).float())
            loss = adapter.denoising_loss_on_batch(modules, prompts, vectors, batch) * (x0.numel() / FULL_SIZE_ELEMENTS)
            scale = modules.loss_scale.scale if modules.loss_scale is not None else 1.0
            (scaled,) = torch.autograd.grad(loss * scale, [vectors], retain_graph=precision == "fp16")
            gradients[precision], finite = unscale_gradient(scaled, scale)
            assert finite
            if precision == "fp16":
                gradients["fp16 unscaled"] = torch.autograd.grad(loss, [vectors])[0]
    reference = gradients["fp32"]
    cosine = {k: float(torch.nn.functional.cosine_similarity(g.flatten(), reference.flatten(), dim=0))
              for k, g in gradients.items()}
    zeros = {k: float((g == 0).float().mean()) for k, g in gradients.items()}
    print("\n" + "\n".join(f"{k:14s} cosine to fp32 {cosine[k]:.5f}  |grad| {float(g.norm()):.3e}  "
                           f"zero elements {zeros[k]:.3f}" for k, g in gradients.items()))
    assert reference.norm() > 0 and zeros["fp32"] == 0
    assert cosine["fp16"] >= 0.99 and cosine["bf16"] >= 0.99
    assert zeros["fp16 unscaled"] > 0.9  # without scaling the fp16 backward underflows (measured: all zero)
    assert {p.dtype for p in model.model.parameters()} == weight_dtypes  # the shared model keeps its weights
    assert torch.equal(next(model.model.parameters()), probe)


def concept_folder(tmp_path):
    from PIL import Image
    generator = torch.Generator().manual_seed(1)
    for i in range(2):
        pixels = (torch.rand(64, 64, 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(tmp_path / f"concept_{i}.png")
    return tmp_path


def test_cli_trains_in_fp16_with_loss_scaling_and_records_it(pack_module, tiny_checkpoint, tmp_path):
    cli = importlib.import_module("trainer.cli")
    args = ["--checkpoint", os.path.join(*tiny_checkpoint), "--images", str(concept_folder(tmp_path)),
            "--resolution", "64", "--steps", "1", "--no-preview", "--work-dir", str(tmp_path / "work")]
    assert cli.main(args + ["--precision", "fp16", "--output", str(tmp_path / "fp16.safetensors")]) == 0
    metadata = load_embedding(str(tmp_path / "fp16.safetensors")).metadata
    assert metadata["precision"] == "fp16"
    assert float(metadata["loss_scale"]) > 0 and int(metadata["skipped_steps"]) >= 0
    with pytest.raises(SystemExit, match="contradicts --precision fp16"):
        cli.main(args + ["--precision", "fp16", "--no-mixed-precision", "--output", str(tmp_path / "x.safetensors")])


def test_node_trains_in_bf16_and_auto_is_fp32_on_a_cpu(pack, tiny_checkpoint, embeddings_dir):
    import comfy.sd
    with torch.inference_mode():  # as a loader node loads it
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(os.path.join(*tiny_checkpoint))
    dtypes = {p.dtype for p in model.model.parameters()} | {p.dtype for p in clip.cond_stage_model.parameters()}
    images = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    inputs = dict(images=images, steps=1, learning_rate=0.005, num_vectors=1, init_word="cat", seed=7,
                  resolution=64, templates="object", batch_size=1, concept="test", overwrite=True,
                  gradient_checkpointing=False)
    node = pack["TrainImplicitNegative"]
    with torch.inference_mode():
        node.execute(model, clip, vae, name="in_bf16", precision="bf16", **inputs)
        node.execute(model, clip, vae, name="in_auto", **inputs)  # a workflow saved before the input existed
    bf16 = load_embedding(str(embeddings_dir / "in_bf16.safetensors")).metadata
    assert bf16["precision"] == "bf16" and "loss_scale" not in bf16
    assert load_embedding(str(embeddings_dir / "in_auto.safetensors")).metadata["precision"] == "fp32"
    assert {p.dtype for p in model.model.parameters()} | {p.dtype for p in clip.cond_stage_model.parameters()} == dtypes
