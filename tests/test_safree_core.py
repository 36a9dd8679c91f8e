"""SAFREE's linear algebra and Fourier filter on planted tensors (no ComfyUI)."""

import math

import pytest
import torch

from implicit_negatives.safree import (
    SVF_PRESETS, PromptChunk, detect_trigger_tokens, filter_end_percent, filtered_step_count,
    latent_reattention, leave_one_out_distances, project_out_of_concept, projection_matrix, safree_filter,
    self_validation_beta)

D = 32


def basis(*indices, dim=D):
    return torch.eye(dim, dtype=torch.float64)[list(indices)]


def test_projection_is_symmetric_idempotent_and_spans_exactly_the_vectors():
    generator = torch.Generator().manual_seed(0)
    concept = torch.randn(3, D, generator=generator, dtype=torch.float64)
    with_duplicate = torch.cat([concept, concept[:1] * 2.0])  # rank stays 3
    p = projection_matrix(with_duplicate)
    assert torch.allclose(p, p.T, atol=1e-12)
    assert torch.allclose(p @ p, p, atol=1e-10)
    assert abs(torch.trace(p).item() - 3.0) < 1e-9
    assert torch.allclose(concept @ p.T, concept, atol=1e-10)  # vectors in the span are fixed
    outside = torch.randn(5, D, generator=generator, dtype=torch.float64)
    residual = outside - outside @ p.T
    assert torch.allclose(residual @ concept.T, torch.zeros(5, 3, dtype=torch.float64), atol=1e-10)


def test_projection_equals_the_official_formula_in_float32():
    generator = torch.Generator().manual_seed(1)
    vectors = torch.randn(4, D, generator=generator)
    c = vectors.T
    official = c @ torch.pinverse(c.T @ c) @ c.T  # modified_stable_diffusion_pipeline.projection_matrix
    assert torch.allclose(projection_matrix(vectors).float(), official, atol=1e-4)


def test_projected_tokens_are_orthogonal_to_the_concept_and_inside_the_input_space():
    generator = torch.Generator().manual_seed(2)
    concept = torch.randn(2, D, generator=generator, dtype=torch.float64)
    inputs = torch.randn(6, D, generator=generator, dtype=torch.float64)
    p_c, p_i = projection_matrix(concept), projection_matrix(inputs)
    hidden = torch.randn(10, D, generator=generator, dtype=torch.float64)
    projected = project_out_of_concept(hidden, p_i, p_c)
    assert torch.allclose(projected @ p_c.T, torch.zeros_like(projected), atol=1e-10)
    expected = hidden @ p_i.T - hidden @ p_i.T @ p_c.T
    assert torch.allclose(projected, expected, atol=1e-10)


def test_detection_flags_the_token_whose_removal_leaves_the_subspace():
    """Planted: the concept is e0. Removing token 2 (the trigger) yields a prompt far from e0."""
    p_c = projection_matrix(basis(0))
    masked = torch.stack([
        basis(0)[0] * 5 + basis(1)[0],  # token 0 removed: still mostly concept
        basis(0)[0] * 5 + basis(2)[0],
        basis(3)[0] * 4 + basis(1)[0],  # token 2 removed: concept gone
        basis(0)[0] * 5 + basis(4)[0],
    ])
    distances = leave_one_out_distances(masked, p_c)
    assert torch.allclose(distances, torch.tensor([1.0, 1.0, math.sqrt(17.0), 1.0], dtype=torch.float64))
    assert detect_trigger_tokens(masked, p_c, alpha=0.01).tolist() == [False, False, True, False]


def test_detection_threshold_uses_alpha_on_the_mean_of_the_other_tokens():
    p_c = projection_matrix(basis(0))
    masked = torch.stack([basis(1)[0] * 1.0, basis(1)[0] * 1.0, basis(1)[0] * 1.05])
    assert detect_trigger_tokens(masked, p_c, alpha=0.01).tolist() == [False, False, True]
    assert detect_trigger_tokens(masked, p_c, alpha=0.10).tolist() == [False, False, False]
    assert detect_trigger_tokens(masked[:1], p_c).tolist() == [True]  # nothing to compare against


def test_safree_filter_changes_only_flagged_rows_and_keeps_far_tokens_untouched():
    generator = torch.Generator().manual_seed(3)
    p_c = projection_matrix(basis(0))
    hidden = torch.randn(8, D, generator=generator)
    masked = torch.stack([basis(1)[0], basis(3)[0] * 4, basis(2)[0]])  # token 1 (row 2) is the trigger
    chunk = PromptChunk(token_rows=torch.tensor([1, 2, 3]), active_rows=torch.arange(0, 5), masked_pooled=masked)
    result = safree_filter(hidden, [chunk], p_c)
    assert result.flagged.tolist() == [False, False, True, False, False, False, False, False]
    assert torch.equal(result.filtered[~result.flagged], hidden[~result.flagged])  # bit-identical
    expected = project_out_of_concept(hidden, projection_matrix(masked), p_c)[2]
    assert torch.allclose(result.filtered[2], expected)
    assert abs(float(result.filtered[2].double() @ basis(0)[0])) < 1e-5
    assert 0.0 < result.beta <= 2.0


def test_tokens_already_in_the_input_space_and_far_from_the_concept_are_fixed_points():
    p_c = projection_matrix(basis(0))
    p_i = projection_matrix(basis(1, 2, 3))
    hidden = basis(1, 2) * 3.0
    assert torch.allclose(project_out_of_concept(hidden, p_i, p_c), hidden)
    assert self_validation_beta(hidden, hidden.clone(), torch.arange(2)) == pytest.approx(0.0, abs=1e-12)


def test_svf_step_count_matches_the_official_f_beta():
    def official(z, up_t=10, k=2.5, t=5.333):  # models/modified_stable_diffusion_pipeline.f_beta
        return round(up_t * (1 / (1 + math.exp(-(2.0 * k * (10 * z - t))))))

    for beta in [0.0, 0.3, 0.5, 0.52, 0.5333, 0.55, 0.7, 1.0, 1.9]:
        assert filtered_step_count(beta) == official(beta)
        assert filtered_step_count(beta, 10, SVF_PRESETS["artist"]) == official(beta, k=3.5, t=5.5)
    assert filtered_step_count(0.0) == 0 and filtered_step_count(1.0) == 10
    assert filtered_step_count(1.0, up_t=4) == 4


def test_end_percent_puts_the_boundary_between_the_last_filtered_and_the_first_unfiltered_step():
    steps = 50
    for last in range(0, 12):
        end = filter_end_percent(last, steps)
        assert last / steps < end < (last + 1) / steps
    assert filter_end_percent(60, steps) == 1.0
    with pytest.raises(ValueError):
        filter_end_percent(0, 0)


def spectrum(x):
    return torch.fft.fftshift(torch.fft.fftn(x.double(), dim=(-2, -1)), dim=(-2, -1))


def test_reattention_scales_only_low_frequencies_that_the_filtered_prompt_amplifies():
    generator = torch.Generator().manual_seed(4)
    filtered = torch.randn(2, 3, 8, 8, generator=generator, dtype=torch.float64)
    original = torch.randn(2, 3, 8, 8, generator=generator, dtype=torch.float64)
    out = latent_reattention(filtered, original, scale=0.2)
    f, o, r = spectrum(filtered), spectrum(original), spectrum(out)
    box = torch.zeros(8, 8, dtype=torch.bool)
    box[3:5, 3:5] = True  # FreeU's [c-1, c+1) box around the centred DC bin (c = 4)
    amplified = (f.abs() > o.abs()) & box
    assert amplified.any() and (box & ~amplified).any()  # both cases are exercised
    # The real part of the inverse FFT averages each bin with the conjugate of its mirror bin
    # (-k); in the centred 8-bin spectrum that is index (8 - m) % 8.
    mirror = (-torch.arange(8)) % 8
    expected = torch.where(amplified, f * 0.2, f)
    assert torch.allclose(r, (expected + expected[..., mirror, :][..., :, mirror].conj()) / 2, atol=1e-9)
    touched = box | box[mirror][:, mirror]
    assert torch.allclose(r[..., ~touched], f[..., ~touched], atol=1e-9)  # all other frequencies kept


def test_reattention_with_equal_branches_or_scale_one_is_the_identity():
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(1, 4, 6, 6, generator=generator)
    assert torch.allclose(latent_reattention(x, x.clone(), scale=0.2), x, atol=1e-5)
    y = torch.randn(1, 4, 6, 6, generator=generator)
    assert torch.allclose(latent_reattention(x, y, scale=1.0), x, atol=1e-5)
    assert latent_reattention(x.half(), y.half(), 0.5).dtype == torch.float16


def test_long_prompts_are_detected_and_projected_chunk_by_chunk():
    """Two chunks, each with its own input space: chunk 2's trigger is found against chunk 2's tokens only."""
    p_c = projection_matrix(basis(0))
    hidden = torch.randn(12, D, generator=torch.Generator().manual_seed(6))
    first = PromptChunk(token_rows=torch.tensor([1, 2, 3]), active_rows=torch.arange(0, 5),
                        masked_pooled=torch.stack([basis(1)[0], basis(2)[0], basis(3)[0]]))  # no trigger
    second = PromptChunk(token_rows=torch.tensor([7, 8, 9]), active_rows=torch.arange(6, 11),
                         masked_pooled=torch.stack([basis(4)[0], basis(5)[0] * 3, basis(6)[0]]))  # row 8
    result = safree_filter(hidden, [first, second], p_c)
    assert result.flagged.nonzero().flatten().tolist() == [8]
    expected = project_out_of_concept(hidden, projection_matrix(second.masked_pooled), p_c)[8]
    assert torch.allclose(result.filtered[8], expected)
    assert torch.equal(result.filtered[torch.arange(12) != 8], hidden[torch.arange(12) != 8])
