"""Concept inversion on the toy model through the project's own loop, `implicit_negatives.inversion`.

The adapter supplies what `invert_concept` asks for: `loss_fn(vectors, step)` draws a batch of harmful
images, noise and timesteps, builds the conditioning of the prompt "<concept>" with the vectors in the
placeholder slot, and returns the frozen model's denoising loss ||eps - eps_theta(x_t, c, t)||^2 (the
paper's objective, method.md §1.3). Only the vectors are optimised; the model never changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from implicit_negatives.inversion import InversionConfig, invert_concept, sample_timesteps, step_generator

from . import world
from .model import ToyDiffusion

PROMPT = world.PLACEHOLDER  # the bare learned token, like SLD's safety-concept slot


def inversion_loss(model: ToyDiffusion, images: torch.Tensor, config: InversionConfig,
                   captions: list[str] | None = None):
    """loss_fn(vectors (1, D), step) -> scalar for `invert_concept`; `images` (N, 3, 16, 16) harmful, each
    captioned by `captions` (N prompts holding the placeholder once; default: the bare placeholder).
    Each step's images, noise and t come from the core's per-step generator (resumable, deterministic)."""
    ids = world.tokenize(captions or [PROMPT] * images.shape[0])

    def loss_fn(vectors: torch.Tensor, step: int) -> torch.Tensor:
        gen = step_generator(config.seed, step)
        pick = torch.randint(0, images.shape[0], (config.batch_size,), generator=gen)
        x0 = images[pick]
        noise = torch.randn(x0.shape, generator=gen)
        t = sample_timesteps(config.batch_size, gen, config.timestep_min, config.timestep_max)
        context = model.text_encoder(ids[pick], vectors)
        return F.mse_loss(model.unet(model.add_noise(x0, noise, t), t, context), noise)

    return loss_fn


def learn_implicit_negative(model: ToyDiffusion, images: torch.Tensor, steps: int, seed: int,
                            batch_size: int = 8, learning_rate: float = 5e-3,
                            initializer: str = world.HARMFUL_WORD,
                            captions: list[str] | None = None) -> tuple[torch.Tensor, list[float]]:
    """(C* (1, D), losses): one token learned on `model` (frozen) from `images` (captioned by `captions`,
    default the bare placeholder), initialised from the embedding of `initializer` as textual inversion does."""
    model = model.requires_grad_(False)
    init = model.text_encoder.token_embedding.weight[world.TOKEN_ID[initializer]].detach().clone()[None]
    config = InversionConfig(steps=steps, learning_rate=learning_rate, seed=seed, batch_size=batch_size)
    result = invert_concept(inversion_loss(model, images, config, captions), init, config)
    return result.vectors, result.losses
