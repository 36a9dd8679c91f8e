"""The inversion adapter on the tiny SD2.x (v-prediction) checkpoint: diffusers' v-prediction loss, and a planted
concept recovered. Text encoders are cut to three layers (``rig.load_tiny_family``)."""

import importlib

import pytest
import torch

from implicit_negatives.inversion import InversionConfig, invert_concept, step_generator

from implicit_negatives.comfyui import rig
from test_trainer_planted import planted_batches

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def adapter(pack_module):
    return importlib.import_module("implicit_negatives.comfyui.inversion")


@pytest.fixture(scope="module")
def tiny_sd2(comfy):
    return rig.load_tiny_family("sd2")


def test_sd2_loss_is_diffusers_v_prediction_loss(adapter, tiny_sd2):
    """diffusers' textual-inversion loss for a v-prediction model: MSE between the UNet output at the noised latent
    (its DDPMScheduler.add_noise) and DDPMScheduler.get_velocity, with SD2's training schedule."""
    from diffusers import DDPMScheduler
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", prediction_type="v_prediction")
    model, clip, _ = tiny_sd2
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
    t = torch.tensor([150, 800])
    with adapter.training_modules(model, clip) as modules, torch.no_grad():
        prompts = [adapter.tokenize_caption(modules.tokenizer, "a photo of a {}", 2)]
        vectors = adapter.init_vectors_from_word(modules, "dog", 2)
        sigma = modules.model_sampling.sigma(t.float()).float()
        ours = adapter.denoising_loss_on_batch(modules, prompts, vectors,
                                               adapter.TrainingBatch(x0=x0, noise=noise, sigma=sigma, prompts=[0, 0]))
        context = adapter.encode_vectors(modules, prompts * 2, vectors)
        v_pred = modules.base_model.diffusion_model(scheduler.add_noise(x0, noise, t), timesteps=t.float(),
                                                    context=context)
        reference = torch.nn.functional.mse_loss(v_pred.float(), scheduler.get_velocity(x0, noise, t))
        x_t = x0 + sigma.view(-1, 1, 1, 1) * noise
        eps_loss = torch.nn.functional.mse_loss(
            (x_t - modules.base_model.apply_model(x_t, sigma, c_crossattn=context)) / sigma.view(-1, 1, 1, 1), noise)
    assert abs(float(ours) - float(reference)) <= 1e-4 * float(reference)
    assert abs(float(eps_loss) - float(reference)) > 0.1 * float(reference)  # the eps loss is another objective


def test_sd2_planted_concept_is_recovered(adapter, tiny_sd2):
    """As the SD1 planted test (test_trainer_planted.py), on OpenCLIP-H vectors (1024 wide) and a v-prediction UNet."""
    model, clip, _ = tiny_sd2
    with adapter.training_modules(model, clip) as modules:
        assert modules.embedding_key == "clip_h" and modules.width == 1024
        prompts = [adapter.tokenize_caption(modules.tokenizer, "a photo of a {}", 1)]
        table = modules.encoder.transformer.get_input_embeddings().weight.float()
        target = torch.randn(1, 1024, generator=torch.Generator().manual_seed(11)) * table.std()
        init = adapter.init_vectors_from_word(modules, "dog", 1)
        train = planted_batches(adapter, modules, prompts, target, 6, seed=1)
        held_out = planted_batches(adapter, modules, prompts, target, 6, seed=2)
        config = InversionConfig(steps=40, seed=0)
        sample = lambda step: train[int(torch.randint(0, len(train), (1,), generator=step_generator(0, step)))]
        result = invert_concept(adapter.make_loss_fn(modules, prompts, sample), init, config)
        loss_target = adapter.evaluate_loss(modules, prompts, target, held_out)
        loss_init = adapter.evaluate_loss(modules, prompts, init, held_out)
        loss_learned = adapter.evaluate_loss(modules, prompts, result.vectors, held_out)
    print(f"\nSD2 held-out loss: v* {loss_target:.3e}  init 'dog' {loss_init:.3e}  learned {loss_learned:.3e}")
    assert loss_target < 1e-8
    assert loss_learned < 0.2 * loss_init
