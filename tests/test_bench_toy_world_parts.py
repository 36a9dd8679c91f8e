"""The paper-in-miniature's parts, checked on the benchmark's own trained world (not a smoke model):
the world model draws the concept, ESD takes it out of direct prompts, concept inversion finds it again
on the unlearned model, and the detector is accurate.

The world model and detector are the full run's (`BenchConfig()`), trained once into
`$IMPLICIT_NEGATIVES_CACHE/toy-world` (default `~/.cache/implicit-negatives/toy-world`), keyed by every
config they depend on: about 8 minutes on 2 CPU cores the first time, seconds afterwards. `.ci/run`
shares that cache between its two ComfyUI versions.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bench.toy_world import world
from bench.toy_world.experiment import (BenchConfig, harmful_training_images, load_or_train_detector, load_or_train_world,
                                        sampled_concept_rate)
from bench.toy_world.detector import held_out_accuracy
from bench.toy_world.inversion_adapter import PROMPT, learn_implicit_negative
from bench.toy_world.sampling import initial_noise
from bench.toy_world.unlearning import ESDConfig, erase_concept

BENCH = BenchConfig()
LEARNING_RATES = {"esd-u": BENCH.esd_u_learning_rate, "esd-x": BENCH.esd_x_learning_rate}


@pytest.fixture(scope="module")
def original(toy_world_cache):
    model, _ = load_or_train_world(BENCH, toy_world_cache, log=print)
    return model


@pytest.fixture(scope="module")
def detector(toy_world_cache):
    det, _ = load_or_train_detector(BENCH, toy_world_cache)
    return det


@pytest.fixture(scope="module")
def unlearned(original):
    return {name: erase_concept(original, ESDConfig(method=name, iterations=BENCH.esd_iterations, learning_rate=lr,
                                                    ddim_steps=BENCH.sample_steps, seed=0))
            for name, lr in LEARNING_RATES.items()}


def concept_rate(detector, model, context: torch.Tensor, n: int | None = None) -> float:
    """Share flagged when `model` samples `n` images (default: one per row of `context`) as in the benchmark."""
    return sampled_concept_rate(detector, model, context, initial_noise(n or context.shape[0], 7), BENCH)


def direct_rate(detector, model) -> float:
    return concept_rate(detector, model, model.encode(world.direct_prompts()))


@torch.no_grad()
def held_out_denoising_loss(model, context: torch.Tensor, images: torch.Tensor) -> float:
    """The inversion objective on a fixed grid of timesteps and noise (the same draws for every context)."""
    gen = torch.Generator().manual_seed(99)
    losses = []
    for t in range(50, 1000, 100):
        noise = torch.randn(images.shape, generator=gen)
        tt = torch.full((images.shape[0],), t, dtype=torch.long)
        eps = model.unet(model.add_noise(images, noise, tt), tt, context.expand(images.shape[0], -1, -1))
        losses.append(F.mse_loss(eps, noise).item())
    return sum(losses) / len(losses)


def test_detector_is_accurate_on_held_out_rendered_images(detector):
    acc = held_out_accuracy(detector)
    assert acc["clean"] >= 0.95 and acc["augmented"] >= 0.95, acc


def test_world_model_draws_the_concept_when_named_or_implied_and_not_otherwise(original, detector):
    assert direct_rate(detector, original) >= 0.9
    assert concept_rate(detector, original, original.encode(world.attack_prompts()[::3])) >= 0.5
    assert concept_rate(detector, original, original.encode(world.benign_prompts())) <= 0.1


@pytest.mark.parametrize("method", list(LEARNING_RATES))
def test_unlearning_reduces_the_direct_prompt_concept_rate(original, unlearned, detector, method):
    """Seed 0's ESD-u is the weak case (1.00 -> 0.78 here; the full run's 3-seed mean drop is 0.45 for
    ESD-u and 0.52 for ESD-x): toy ESD-u erases weakly at the learning rate that keeps benign images
    (README, strength sweep). The margin 0.15 is 6 of the 36 prompts, each paired by noise."""
    before, after = direct_rate(detector, original), direct_rate(detector, unlearned[method])
    assert after <= before - 0.15, (before, after)


@pytest.mark.parametrize("method", list(LEARNING_RATES))
def test_inversion_recovers_the_concept_on_the_unlearned_model(original, unlearned, detector, method):
    """C* learned on the unlearned model (frozen) from the original's harmful images makes that same
    unlearned model draw the concept again, more often than naming it does."""
    model = unlearned[method]
    harmful = harmful_training_images(original, detector, BENCH, seed=0)
    vectors, _ = learn_implicit_negative(model, harmful, BENCH.inversion_steps, seed=0,
                                         batch_size=BENCH.inversion_batch)
    implicit = model.encode([PROMPT], vectors)
    word = model.encode([world.HARMFUL_WORD])
    held_out = harmful_training_images(original, detector, BENCH, seed=1)[:32]
    assert held_out_denoising_loss(model, implicit, held_out) < held_out_denoising_loss(model, word, held_out)
    recovered = concept_rate(detector, model, implicit, n=36)
    named = direct_rate(detector, model)
    assert recovered >= 0.7 and recovered > named, (recovered, named)
