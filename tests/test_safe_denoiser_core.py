"""Pure-torch Safe Denoiser: the released formula, and sampling a Gaussian mixture whose denoiser is known exactly."""

import math

import pytest
import torch

from implicit_negatives.safe_denoiser import (MAX_NEGATION_LATENTS, SAFE_DENOISER_RELEASE, NegationSetError,
                                              SafeDenoiserParams, check_negation_latents, negation_kernel_mean,
                                              project_negation_latents, safe_denoised)

# Three well separated modes around the origin (the release subtracts s·g·m in absolute coordinates, which
# assumes zero-centred latents, as Stable Diffusion's roughly are).
MEANS = torch.tensor([[4.0, 0.0], [-2.0, 2.0 * math.sqrt(3.0)], [-2.0, -2.0 * math.sqrt(3.0)]])
MODE_STD = 0.5
NEGATED = 0


def mixture_denoiser(x, sigma):
    """E[x0 | x0 + σ·ε = x] for the equal-weight mixture of N(μ_k, MODE_STD²·I): the exact "model"."""
    flat = x.flatten(1)
    variance = MODE_STD ** 2 + sigma ** 2
    responsibilities = torch.softmax(-((flat[:, None] - MEANS[None]) ** 2).sum(-1) / (2 * variance), dim=1)
    posterior_means = MEANS[None] + (MODE_STD ** 2 / variance) * (flat[:, None] - MEANS[None])
    return (responsibilities[..., None] * posterior_means).sum(1).reshape(x.shape)


def karras_sigmas(steps, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    ramp = torch.linspace(0, 1, steps)
    sigmas = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([sigmas, torch.zeros(1)]).tolist()


def sample_euler(denoiser, count=2000, steps=30, seed=0):
    """k-diffusion's Euler sampler over Karras sigmas; ``denoiser(x, sigma)`` returns x0 predictions."""
    sigmas = karras_sigmas(steps)
    x = torch.randn(count, 2, 1, 1, generator=torch.Generator().manual_seed(seed)) * sigmas[0]
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        x = x + (x - denoiser(x, sigma)) / sigma * (sigma_next - sigma)
    return x.flatten(1)


def mode_masses(samples):
    """(share of samples within 4 std of each mode, share within 4 std of any mode)."""
    distances = torch.cdist(samples, MEANS)
    near = distances.min(1).values < 4 * MODE_STD
    return torch.bincount(distances.argmin(1)[near], minlength=len(MEANS)) / len(samples), near.float().mean()


def negation_set(count=64):
    """Samples of the negated mode, as (N, C, H, W) latents."""
    points = MEANS[NEGATED] + MODE_STD * torch.randn(count, 2, generator=torch.Generator().manual_seed(1))
    return points.reshape(count, 2, 1, 1)


def windowed(params, sigma_end):
    """The safe denoiser while σ ≥ sigma_end (SGF's early window), the plain one after."""
    negation = negation_set()
    return lambda x, sigma: (safe_denoised(mixture_denoiser(x, sigma), negation, params) if sigma >= sigma_end
                             else mixture_denoiser(x, sigma))


def test_safe_denoiser_moves_mass_off_the_negated_mode_and_keeps_the_others():
    plain, plain_near = mode_masses(sample_euler(mixture_denoiser))
    safe, safe_near = mode_masses(sample_euler(windowed(SAFE_DENOISER_RELEASE, sigma_end=2.0)))
    assert abs(plain[NEGATED] - 1 / 3) < 0.03                  # the sampler and the exact denoiser agree
    assert safe[NEGATED] < 0.6 * plain[NEGATED]                 # measured: 0.317 → 0.168
    kept = [k for k in range(len(MEANS)) if k != NEGATED]
    assert (safe[kept] >= plain[kept]).all()                    # the mass goes to the other modes ...
    assert safe_near > 0.98 and plain_near > 0.98               # ... which stay sharp (samples sit on a mode)


def test_a_stronger_correction_removes_more_of_the_negated_mode():
    release, _ = mode_masses(sample_euler(windowed(SAFE_DENOISER_RELEASE, sigma_end=2.0)))
    strong, near = mode_masses(sample_euler(windowed(SafeDenoiserParams(strength=1.0, bandwidth=3.15), 2.0)))
    assert strong[NEGATED] < 0.5 * release[NEGATED] and near > 0.95


def test_strength_zero_is_the_unpatched_sampler_exactly():
    off = SafeDenoiserParams(strength=0.0, bandwidth=3.15)
    assert torch.equal(sample_euler(windowed(off, sigma_end=0.0)), sample_euler(mixture_denoiser))


def test_kernel_mean_is_the_released_formula():
    """The release's ``kernel_fast`` transcribed: cdist, exp(−d/(2σ²)), Σw·x / (Σw + ε)."""
    generator = torch.Generator().manual_seed(0)
    query, negation = torch.randn(3, 4, 2, 2, generator=generator), torch.randn(5, 4, 2, 2, generator=generator)
    h, eps = 1.3, 1e-8
    weights = torch.exp(-torch.cdist(query.flatten(1), negation.flatten(1)) / (2 * h ** 2))
    released = (weights @ negation.flatten(1)) / (weights.sum(1, keepdim=True) + eps)
    mean, gate = negation_kernel_mean(query, negation, h, eps)
    assert torch.allclose((gate[:, None] * mean.flatten(1)), released, atol=1e-6)
    params = SafeDenoiserParams(strength=0.33, bandwidth=h, epsilon=eps)
    assert torch.allclose(safe_denoised(query, negation, params).flatten(1), query.flatten(1) - 0.33 * released,
                          atol=1e-6)


def test_far_from_the_set_the_gate_closes_without_nan():
    """Where the release's ratio underflows to 0/ε (distances ≫ h²), the correction vanishes and stays finite."""
    negation = torch.zeros(4, 4, 8, 8)
    query = torch.full((2, 4, 8, 8), 50.0)
    mean, gate = negation_kernel_mean(query, negation, bandwidth=1.0, epsilon=1e-8)
    assert torch.isfinite(mean).all() and (gate < 1e-30).all()
    assert torch.equal(safe_denoised(query, negation, SAFE_DENOISER_RELEASE), query)


def test_projection_is_unit_norm_over_channels_at_every_pixel():
    latents = torch.randn(3, 4, 5, 6) * 7
    projected = project_negation_latents(latents)
    assert torch.allclose(projected.norm(dim=1), torch.ones(3, 5, 6))
    assert torch.allclose(projected * latents.norm(dim=1, keepdim=True), latents, atol=1e-5)


@pytest.mark.parametrize("latents,needle", [
    (torch.zeros(0, 4, 8, 8), "empty"),
    (torch.zeros(2, 4, 8), "(N, C, H, W)"),
    (torch.zeros(2, 16, 8, 8), "16-channel"),
    (torch.full((2, 4, 8, 8), float("nan")), "NaN"),
    (torch.zeros(MAX_NEGATION_LATENTS + 1, 4, 1, 1), "at most"),
])
def test_unusable_negation_sets_are_refused(latents, needle):
    with pytest.raises(NegationSetError) as error:
        check_negation_latents(latents, channels=4)
    assert needle in str(error.value)
