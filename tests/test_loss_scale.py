"""Dynamic loss scaling in the inversion loop, against torch.amp.GradScaler + Adam as the oracle."""

import pytest
import torch

from implicit_negatives.inversion import InversionConfig, invert_concept
from implicit_negatives.loss_scale import LossScale, unscale_gradient, update_loss_scale

# d(loss * scale)/d(vectors.half()) = scale * C in float16: inf while scale * 2 > 65504 (scale >= 32768).
C = torch.tensor([[2.0, 1.0, 0.5]], dtype=torch.float16)


def float16_loss(vectors, step):
    """A finite loss whose scaled float16 gradient overflows at GradScaler's initial scale (2**16)."""
    return (vectors.half() * C).float().sum() + (vectors - 0.1 * step).pow(2).sum()


def gradscaler_run(init, steps, lr, growth_interval):
    """The reference: torch.amp.GradScaler's scale / step / update around Adam, as diffusers trains."""
    vectors = init.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([vectors], lr=lr)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16, growth_interval=growth_interval)
    trajectory = []
    for step in range(steps):
        optimizer.zero_grad()
        scaler.scale(float16_loss(vectors, step)).backward()
        scaler.step(optimizer)
        scaler.update()
        trajectory.append((vectors.detach().clone(), scaler.get_scale()))
    return trajectory


def test_planted_float16_overflow_is_skipped_and_the_scale_follows_gradscaler():
    init = torch.tensor([[0.3, -0.2, 0.1]])
    ours = []
    result = invert_concept(float16_loss, init, InversionConfig(steps=10, learning_rate=0.05),
                            on_step=lambda p: ours.append((p.vectors, p.loss_scale.scale)),
                            loss_scale=LossScale(growth_interval=3))
    reference = gradscaler_run(init, 10, 0.05, growth_interval=3)
    assert [scale for _, scale in ours] == [scale for _, scale in reference]
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(ours, reference))
    # 65536 and 32768 overflow: two skipped steps leave the vectors as they were, then 16384 works,
    # grows back to 32768 after 3 good steps, overflows again.
    assert [scale for _, scale in ours][:6] == [32768.0, 16384.0, 16384.0, 16384.0, 32768.0, 16384.0]
    assert torch.equal(ours[1][0], init) and not torch.equal(ours[2][0], init)
    assert result.loss_scale.skipped_steps == 4 and result.loss_scale.scale == 16384.0
    assert len(result.losses) == 10


def test_without_overflow_the_scaled_run_equals_the_unscaled_one():
    target = torch.randn(2, 8, generator=torch.Generator().manual_seed(0))
    loss_fn = lambda v, step: ((v - target) ** 2).mean() * 1e-3
    config = InversionConfig(steps=12, learning_rate=1e-2)
    plain = invert_concept(loss_fn, torch.zeros(2, 8), config)
    scaled = invert_concept(loss_fn, torch.zeros(2, 8), config,
                            loss_scale=LossScale(scale=2.0 ** 20, growth_interval=4))
    assert torch.equal(plain.vectors, scaled.vectors) and plain.losses == scaled.losses
    assert plain.loss_scale is None
    assert (scaled.loss_scale.scale, scaled.loss_scale.skipped_steps) == (2.0 ** 23, 0)  # grown 3 times in 12 steps


def test_the_update_rule():
    state = LossScale(scale=1024.0, growth_interval=2)
    backed_off = update_loss_scale(update_loss_scale(state, True), False)
    assert (backed_off.scale, backed_off.good_steps, backed_off.skipped_steps) == (512.0, 0, 1)
    grown = update_loss_scale(update_loss_scale(backed_off, True), True)
    assert (grown.scale, grown.good_steps, grown.skipped_steps) == (1024.0, 0, 1)
    grad, finite = unscale_gradient(torch.tensor([3.0, 1024.0], dtype=torch.float16), 1024.0)
    assert finite and grad.dtype == torch.float32 and grad.tolist() == [3.0 / 1024, 1.0]
    assert unscale_gradient(torch.tensor([1.0, float("inf")]), 2.0)[1] is False
    with pytest.raises(ValueError):
        LossScale(scale=0.0)
    with pytest.raises(ValueError):
        LossScale(backoff_factor=1.0)


def test_resume_continues_the_loss_scale():
    config = InversionConfig(steps=10, learning_rate=0.05)
    init = torch.tensor([[0.3, -0.2, 0.1]])
    full = invert_concept(float16_loss, init, config, loss_scale=LossScale(growth_interval=3))
    states = {}
    invert_concept(float16_loss, init, InversionConfig(steps=4, learning_rate=0.05),
                   on_step=lambda p: states.setdefault(p.step, p.state), loss_scale=LossScale(growth_interval=3))
    saved = states[4]["loss_scale"]  # one good step short of growing: the resumed run must grow it next
    assert (saved["scale"], saved["good_steps"], saved["skipped_steps"]) == (16384.0, 2, 2)
    resumed = invert_concept(float16_loss, init, config, state=states[4], loss_scale=LossScale(growth_interval=3))
    assert torch.equal(resumed.vectors, full.vectors) and resumed.loss_scale == full.loss_scale


def test_an_inf_gradient_without_loss_scaling_is_an_error():
    # sqrt at 0: a finite loss whose gradient is inf; the vectors must not silently turn into NaN.
    loss_fn = lambda v, step: (v - v.detach()).abs().sqrt().sum() + v.sum()
    with pytest.raises(FloatingPointError, match="gradient became inf/NaN at step 0"):
        invert_concept(loss_fn, torch.ones(1, 4), InversionConfig(steps=2))
