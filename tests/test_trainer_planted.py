"""The ComfyUI inversion adapter on the tiny SD1.5 checkpoint: a planted concept is recovered.

Planted concept: a random target vector v*. Training examples are (x0, eps, sigma) triples built so
that the model, conditioned on "a photo of a <v*>", denoises them perfectly: draw x_t and sigma,
set eps := eps_theta(x_t, v*, sigma) (the model's own prediction) and x0 := x_t - sigma * eps.
Then v* has zero loss on every such triple, and any other conditioning does worse. Training starts
from the unrelated word "dog"; the held-out triples are never trained on.
"""

import importlib
import time

import pytest
import torch

from implicit_negatives.inversion import InversionConfig, invert_concept, step_generator

from implicit_negatives.comfyui import headless, rig

ONE_LAYER_CLIP = {"clip_l_model_config": {"num_hidden_layers": 1}}  # same weights, first layer only: fast on CPU


@pytest.fixture(scope="module")
def adapter(pack_module):
    return importlib.import_module("implicit_negatives.comfyui.inversion")


@pytest.fixture(scope="module")
def fast_sd15(comfy, tiny_checkpoint):
    """The tiny checkpoint with a one-layer text encoder, loaded outside inference mode."""
    import os
    import comfy.sd
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(os.path.join(*tiny_checkpoint),
                                                                te_model_options=ONE_LAYER_CLIP)
    return model, clip, vae


def planted_batches(adapter, modules, prompts, target, count, seed):
    g = torch.Generator().manual_seed(seed)
    batches = []
    with torch.no_grad():
        for _ in range(count):
            x_t = torch.randn(1, 4, 8, 8, generator=g)
            t = torch.randint(50, 950, (1,), generator=g)
            sigma = modules.model_sampling.sigma(t.float()).float()
            context = adapter.encode_vectors(modules, prompts, target)
            denoised = modules.base_model.apply_model(x_t, sigma, c_crossattn=context)
            eps = (x_t - denoised) / sigma.view(-1, 1, 1, 1)
            batches.append(adapter.TrainingBatch(x0=x_t - sigma.view(-1, 1, 1, 1) * eps, noise=eps, sigma=sigma,
                                                 prompts=[0]))
    return batches


def test_planted_concept_is_recovered(adapter, fast_sd15):
    model, clip, _ = fast_sd15
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    with adapter.training_modules(model, clip) as modules:
        prompts = [adapter.tokenize_caption(modules.tokenizer, "a photo of a {}", 1)]
        table = modules.encoder.transformer.get_input_embeddings().weight.float()
        target = torch.randn(1, 768, generator=torch.Generator().manual_seed(11)) * table.std()
        init = adapter.init_vectors_from_word(modules, "dog", 1)
        train = planted_batches(adapter, modules, prompts, target, 6, seed=1)
        held_out = planted_batches(adapter, modules, prompts, target, 6, seed=2)

        config = InversionConfig(steps=40, seed=0)  # the paper's lr 5e-3, batch 1
        sample = lambda step: train[int(torch.randint(0, len(train), (1,), generator=step_generator(0, step)))]
        started = time.perf_counter()
        result = invert_concept(adapter.make_loss_fn(modules, prompts, sample), init, config)
        seconds_per_step = (time.perf_counter() - started) / config.steps

        loss_target = adapter.evaluate_loss(modules, prompts, target, held_out)
        loss_init = adapter.evaluate_loss(modules, prompts, init, held_out)
        loss_learned = adapter.evaluate_loss(modules, prompts, result.vectors, held_out)
    print(f"\nheld-out loss: v* {loss_target:.3e}  init 'dog' {loss_init:.3e}  learned {loss_learned:.3e}; "
          f"train loss first10 {sum(result.losses[:10]) / 10:.3e} last10 {sum(result.losses[-10:]) / 10:.3e}; "
          f"{seconds_per_step:.2f} s/step (1-layer CLIP, 64 px, CPU)")
    assert loss_target < 1e-8
    assert loss_learned < 0.2 * loss_init  # measured 0.07-0.11
    assert sum(result.losses[-10:]) < 0.2 * sum(result.losses[:10])
    after = model.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_gradient_checkpointing_gives_the_same_gradient(adapter, fast_sd15):
    """Same gradient; and the cross-attention runs twice per step (forward + recomputation), proving the
    checkpointing is real."""
    model, clip, _ = fast_sd15
    gradients, calls = [], []
    for checkpointing in (False, True):
        with adapter.training_modules(model, clip, gradient_checkpointing=checkpointing) as modules:
            attention = next(m for n, m in modules.base_model.diffusion_model.named_modules() if n.endswith("attn2"))
            counter = []
            hook = attention.register_forward_hook(lambda *args: counter.append(1))
            prompts = [adapter.tokenize_caption(modules.tokenizer, "a photo of a {}", 2)]
            batch = adapter.TrainingBatch(x0=torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)),
                                          noise=torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)),
                                          sigma=torch.tensor([2.0]), prompts=[0])
            vectors = adapter.init_vectors_from_word(modules, "dog", 2).requires_grad_(True)
            loss = adapter.denoising_loss_on_batch(modules, prompts, vectors, batch)
            gradients.append(torch.autograd.grad(loss, [vectors])[0])
            hook.remove()
            calls.append(len(counter))
    assert calls == [1, 2]
    assert gradients[0].abs().max() > 0
    assert torch.allclose(gradients[0], gradients[1], rtol=1e-4, atol=1e-12)
    assert not any("forward" in block.__dict__ for block in model.model.diffusion_model.modules())  # unpatched
