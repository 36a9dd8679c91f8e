"""Pure-torch SLD helpers: step indices, warm-up from a fraction, per-step momentum, the SLD switch."""

import pytest
import torch

from implicit_negatives.cfg import cfg_noise
from implicit_negatives.sld import (SLD_PRESETS, REFERENCE_STEPS, SLDParams, StepMomentum, sampler_step_index,
                                    sld_noise, sld_safety_term, warmup_steps_from_fraction)


def test_presets_are_diffusers_safety_config():
    from diffusers.pipelines.deprecated.stable_diffusion_safe import SafetyConfig
    for name in ("weak", "medium", "strong", "max"):
        ref = getattr(SafetyConfig, name.upper())
        ours = SLD_PRESETS[name]
        assert (ours.warmup_steps, ours.guidance_scale, ours.threshold, ours.momentum_scale, ours.momentum_beta) == (
            ref["sld_warmup_steps"], ref["sld_guidance_scale"], ref["sld_threshold"], ref["sld_momentum_scale"],
            ref["sld_mom_beta"])


def test_cfg_noise_is_the_cfg_formula():
    u, c = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.0])
    assert torch.equal(cfg_noise(u, c, 2.0), torch.tensor([5.0, 2.0]))


def test_safety_term_by_hand():
    params = SLDParams(guidance_scale=10.0, warmup_steps=0, threshold=0.05, momentum_scale=0.5, momentum_beta=0.25)
    u = torch.zeros(4)
    p = torch.tensor([0.0, 0.0, 0.0, 0.2])
    s = torch.tensor([0.5, 0.02, -0.1, 0.0])  # |p-s|·10 = 5 (clamped to 1), 0.2, 1 but p-s = 0.1 >= λ, cut
    momentum = torch.tensor([0.0, 0.0, 0.0, 2.0])
    gamma, new = sld_safety_term(u, p, s, momentum, params)
    assert torch.allclose(gamma, torch.tensor([0.5, 0.2 * 0.02, 0.0, 1.0]))
    assert torch.allclose(new, 0.25 * momentum + 0.75 * gamma)


def test_disabled_sld_is_plain_cfg_and_keeps_momentum():
    u, p, s = torch.randn(3, 2, 4, 4).unbind(0)
    params = SLDParams(1.0, 0, 0.01, 0.3, 0.4)
    momentum = torch.ones_like(u)
    out, new = sld_noise(u, p, s, 7.5, momentum, 5, params)
    assert torch.equal(out, cfg_noise(u, p, 7.5)) and new is momentum


def test_zero_guidance_scale_formula_adds_nothing():
    u, p, s = torch.randn(3, 1, 4, 8, 8).unbind(0)
    gamma, new = sld_safety_term(u, p, s, None, SLDParams(0.0, 0, 0.01, 0.3, 0.4))
    assert not gamma.any() and not new.any()


@pytest.mark.parametrize("preset", ["weak", "medium", "strong", "max"])
def test_preset_fraction_reproduces_its_step_count_at_50_steps(preset):
    delta = SLD_PRESETS[preset].warmup_steps
    assert warmup_steps_from_fraction(delta / REFERENCE_STEPS, REFERENCE_STEPS) == delta


def test_fraction_scales_to_shorter_runs_and_rejects_nonsense():
    assert warmup_steps_from_fraction(10 / 50, 20) == 4
    assert warmup_steps_from_fraction(15 / 50, 25) == 8  # 7.5 rounds half up
    assert warmup_steps_from_fraction(0.0, 20) == 0 and warmup_steps_from_fraction(1.0, 20) == 20
    with pytest.raises(ValueError, match="fraction"):
        warmup_steps_from_fraction(1.5, 20)


def test_step_index_for_heun_and_midpoints():
    sigmas = [14.6, 7.0, 3.0, 1.0, 0.0]
    calls = [14.6, 7.0, 7.0, 3.0, 3.0, 1.0]               # heun: correction lands on the next sigma
    assert [sampler_step_index(sigmas, s) for s in calls] == [0, 1, 1, 2, 2, 3]
    assert sampler_step_index(sigmas, 10.0) == 0          # a midpoint inside step 0
    assert sampler_step_index(sigmas, 20.0) == 0          # churn above sigma_max
    assert sampler_step_index(sigmas, 7.0 * (1 - 1e-7)) == 1  # float noise around a schedule point


def test_step_momentum_advances_once_per_step_with_the_last_proposal():
    tracker = StepMomentum()
    assert tracker.at_step(0) is None
    tracker.propose(torch.tensor(1.0))
    assert tracker.at_step(1) == 1.0          # heun correction of step 0 (index 1) starts step 1's momentum
    tracker.propose(torch.tensor(2.0))
    assert tracker.at_step(1) == 1.0          # step 1's own start uses the same momentum ...
    tracker.propose(torch.tensor(3.0))        # ... and its proposal replaces the correction's
    assert tracker.at_step(2) == 3.0
    assert tracker.updates == 2
    tracker.propose(torch.tensor(4.0))
    assert tracker.at_step(1) == 3.0          # a churned evaluation above the last σ stays in step 2
    assert (tracker.step, tracker.updates) == (2, 2)
