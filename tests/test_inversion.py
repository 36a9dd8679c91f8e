"""The engine-agnostic inversion loop: paper defaults, planted optimum, exact resume, pure helpers."""

import random

import pytest
import torch

from implicit_negatives.cfg import eps_from_denoised
from implicit_negatives.inversion import (
    CAPTION_TEMPLATES, InversionConfig, caption_parts, denoising_loss, invert_concept,
    load_state, norm_warning, sample_timesteps, save_state, step_generator, step_seed,
)


def test_defaults_are_the_papers():
    config = InversionConfig()
    assert (config.steps, config.learning_rate, config.batch_size, config.num_vectors) == (3000, 5e-3, 1, 1)


def quadratic_loss(target, noise_scale=0.05, seed=3):
    """A stochastic loss whose minimum is ``target``: each step draws its own noise like a real trainer."""
    def loss_fn(vectors, step):
        g = step_generator(seed, step)
        jitter = torch.randn(target.shape, generator=g) * noise_scale
        return ((vectors - target - jitter) ** 2).sum()
    return loss_fn


def test_adam_recovers_a_planted_minimum_and_the_loss_falls():
    target = torch.randn(2, 16, generator=torch.Generator().manual_seed(0))
    init = torch.zeros(2, 16)
    result = invert_concept(quadratic_loss(target), init, InversionConfig(steps=400, learning_rate=2e-2))
    assert len(result.losses) == 400 and result.steps_done == 400
    assert (result.vectors - target).norm() < 0.1 * (init - target).norm()
    assert sum(result.losses[-20:]) < 0.05 * sum(result.losses[:20])
    assert not result.vectors.requires_grad


def test_gradients_reach_only_the_vectors():
    """The loop differentiates w.r.t. the vectors alone: a frozen 'model' parameter never gets a .grad."""
    weight = torch.nn.Parameter(torch.randn(16, 16))
    result = invert_concept(lambda v, s: (v @ weight).pow(2).sum(), torch.ones(1, 16), InversionConfig(steps=3))
    assert weight.grad is None
    assert result.vectors.shape == (1, 16)


def test_resume_from_any_step_equals_the_uninterrupted_run(tmp_path):
    target = torch.randn(1, 8, generator=torch.Generator().manual_seed(1))
    config = InversionConfig(steps=30, learning_rate=1e-2, seed=5)
    full = invert_concept(quadratic_loss(target), torch.zeros(1, 8), config)

    saved = {}

    class Stop(Exception):
        pass

    def stop_at_12(progress):
        if progress.step == 12:
            save_state(str(tmp_path / "run.state"), progress.state)
            saved["vectors"] = progress.vectors
            raise Stop
    with pytest.raises(Stop):
        invert_concept(quadratic_loss(target), torch.zeros(1, 8), config, on_step=stop_at_12)
    torch.manual_seed(999)  # disturb the global RNG: the state restores it
    random.seed(999)
    state = load_state(str(tmp_path / "run.state"))
    assert state["step"] == 12 and torch.equal(state["vectors"], saved["vectors"])
    resumed = invert_concept(quadratic_loss(target), torch.zeros(1, 8), config, state=state)
    assert torch.equal(resumed.vectors, full.vectors)
    assert resumed.losses == full.losses
    assert torch.equal(resumed.state["torch_rng"], full.state["torch_rng"])


def test_resume_refuses_a_different_run():
    state = invert_concept(lambda v, s: v.pow(2).sum(), torch.ones(1, 4), InversionConfig(steps=2)).state
    with pytest.raises(ValueError, match="learning_rate"):
        invert_concept(lambda v, s: v.pow(2).sum(), torch.ones(1, 4), InversionConfig(steps=4, learning_rate=1e-3),
                       state=state)
    with pytest.raises(ValueError, match="shape"):
        invert_concept(lambda v, s: v.pow(2).sum(), torch.ones(2, 4), InversionConfig(steps=4), state=state)


def test_non_finite_loss_is_an_error_naming_the_step():
    with pytest.raises(FloatingPointError, match="step 0"):
        invert_concept(lambda v, s: v.sum() * float("nan"), torch.ones(1, 4), InversionConfig(steps=2))


def test_bad_config_is_rejected():
    with pytest.raises(ValueError):
        InversionConfig(learning_rate=0)
    with pytest.raises(ValueError):
        InversionConfig(timestep_min=500, timestep_max=100)


def test_eps_from_denoised_inverts_the_forward_process():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    sigma = torch.tensor([0.1, 1.0, 14.6])
    x_t = x0 + sigma.view(-1, 1, 1, 1) * eps
    assert torch.allclose(eps_from_denoised(x_t, x0, sigma), eps, atol=1e-5)
    assert denoising_loss(eps, eps) == 0
    assert torch.isclose(denoising_loss(eps + 1, eps), torch.tensor(1.0))


def test_step_streams_are_reproducible_and_distinct():
    assert step_seed(0, 7) == step_seed(0, 7)
    assert len({step_seed(s, k) for s in range(3) for k in range(100)}) == 300
    a = torch.randn(4, generator=step_generator(1, 2))
    assert torch.equal(a, torch.randn(4, generator=step_generator(1, 2)))
    t = sample_timesteps(1000, step_generator(0, 0), 100, 200)
    assert t.min() >= 100 and t.max() <= 200 and t.dtype == torch.int64


def test_caption_parts():
    assert caption_parts("a photo of a {}") == ("a photo of a ", "")
    assert caption_parts("{} in a field") == ("", " in a field")
    assert caption_parts("a woman on a beach") == ("", " a woman on a beach")
    assert caption_parts("") == ("", "")
    with pytest.raises(ValueError):
        caption_parts("{} and {}")
    assert all("{}" in t for family in CAPTION_TEMPLATES.values() for t in family)


def test_norm_warning_flags_vectors_far_outside_the_token_tables_range():
    rows = torch.nn.functional.normalize(torch.randn(50, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    table = rows * torch.linspace(0.2, 0.6, 50)[:, None]  # row norms 0.2 .. 0.6 (CLIP-L's are of this order)
    table[3] = float("nan")  # uninitialised rows are ignored
    table[4] = 0.0  # so is an all-zero padding row
    direction = rows[:1]
    assert norm_warning(direction * 0.4, table) == ""
    assert norm_warning(direction * 5.9, table) == "" and norm_warning(direction * 0.021, table) == ""
    assert "norms 6.1 lie far outside the token embeddings' 0.2..0.6" in norm_warning(direction * 6.1, table)
    assert "norms 0.4, 0.019 lie far outside" in norm_warning(torch.cat([direction * 0.4, direction * 0.019]), table)

