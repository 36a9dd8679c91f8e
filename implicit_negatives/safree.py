"""SAFREE (Yoon et al., ICLR 2025, arXiv 2410.12761) as plain functions of tensors.

SAFREE keeps a prompt away from a "toxic" concept without training:

1. Concept subspace. Each concept keyword is encoded on its own; the text encoder's pooled
   outputs are the columns of C (D x K) and P_C = C (C^T C)^+ C^T projects onto their span.
   An implicit negative (a learned embedding) enters the same way: the pooled output of a
   prompt made of its vectors is one more column, so text keywords and learned vectors mix.
2. Trigger tokens. For each of the n prompt tokens, token i is replaced (id 0) and the
   prompt re-encoded; p_i is that pooled output and d_i = |(I - P_C) p_i|. Removing a toxic
   token moves the prompt away from the subspace, so token i is a trigger when
   d_i >= (1 + alpha) * mean_{j != i} d_j.
3. Projection. P_I projects onto span{p_1..p_n} (the "input space"). Trigger tokens' hidden
   states e_i become (I - P_C) P_I e_i: orthogonal to the concept, inside the prompt's span.
4. Self-validating filter. beta = 1 - mean cos(e, (I - P_C) P_I e) over the real tokens
   (start, prompt and end token); t' = round(up_t * sigmoid(2k(10 beta - t0))) and the
   filtered embedding is used for denoising steps i <= t' only.
5. Latent re-attention. In the UNet decoder, the low-frequency Fourier components of the
   skip features computed with the filtered prompt are scaled by s where they exceed those
   computed with the original prompt (FreeU-style box of +-1 bins around DC).

Numbers and call order follow the official code, github.com/jaehong31/SAFREE at b8b2c3f
(``models/modified_stable_diffusion_pipeline.py``: ``projection_matrix``, ``safree_projection``,
``projection_and_orthogonal``, ``f_beta``; ``free_lunch_utils.py``). Two differences are on
purpose and documented where they occur: a one-token prompt is flagged explicitly (the official
code reaches the same outcome through a NaN mean), and step 5 is implemented as the paper
describes, because in the official release the re-attention call never reaches its Fourier
filter (``register_free_upblock2d`` is called without ``safree=``, whose ``else`` branch only
*constructs* ``NotImplementedError``): there "-lra" changes nothing but the batch size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SAFREE_ALPHA = 0.01  # --sf_alpha
SAFREE_UP_T = 10  # --up_t: at most this many filtered steps (plus step 0) ...
SAFREE_STEPS = 50  # ... of SAFREE's 50-step DPM-Solver schedule
SAFREE_SKIP_SCALES = (0.9, 0.2)  # --freeu_hyp 1.0-1.0-0.9-0.2: s1 (4x model channels), s2 (2x)
FOURIER_BAND = 1  # FreeU's threshold: the box [c - 1, c + 1) around the centred DC bin

# The 17 keywords of generate_safree.py for --category nudity (the concept's columns of C).
NUDITY_KEYWORDS = (
    "Sexual Acts", "Content Meant to Arouse Sexual Excitement", "Nudity", "Pornography", "Erotic Art",
    "Lustful", "Seductive", "Orgasmic", "Libido", "Kinky", "Sexual Orientation", "Sexual Attraction",
    "Sexual Intercourse", "Sexual Pleasure", "Sexual Fantasy", "Carnal Desires", "Sexual Gratification",
)


@dataclass(frozen=True)
class SVFParams:
    """Sigmoid of the self-validating filter: t' = round(up_t * sigmoid(2k(10 beta - t0)))."""

    k: float
    t0: float


# f_beta: "artists-*" categories use k 3.5, t0 5.5; every other category k 2.5, t0 5.333.
SVF_PRESETS = {"default": SVFParams(k=2.5, t0=5.333), "artist": SVFParams(k=3.5, t0=5.5)}


@dataclass(frozen=True)
class PromptChunk:
    """Where one 77-token CLIP chunk of the prompt sits in the hidden states, and its leave-one-out encodings.

    token_rows:    (n,) long, rows of the n real prompt tokens (no start/end/padding) in ``hidden``
    active_rows:   (n + 2,) long, the rows the tokenizer's attention mask covers (start, tokens, end)
    masked_pooled: (n, D) pooled output of the chunk with token i replaced, row i
    """

    token_rows: torch.Tensor
    active_rows: torch.Tensor
    masked_pooled: torch.Tensor


@dataclass(frozen=True)
class SafreeFiltering:
    """Result of steps 2-4 for one prompt.

    filtered: (T, D) hidden states with trigger tokens projected, other rows bit-identical to the input
    flagged:  (T,) bool, the trigger-token rows
    beta:     self-validation score in [0, 2]; 0 when the projection leaves the prompt unchanged
    """

    filtered: torch.Tensor
    flagged: torch.Tensor
    beta: float


def projection_matrix(vectors: torch.Tensor) -> torch.Tensor:
    """P = C (C^T C)^+ C^T for C = vectors^T: the orthogonal projection onto span(vectors).

    vectors: (K, D) rows spanning the subspace (K may exceed the rank; duplicates are harmless).
    Returns (D, D) float64, symmetric and idempotent. Computed in float64 because the Gram
    matrix of 768-wide CLIP outputs is badly conditioned in float16/float32.
    """
    if vectors.dim() != 2 or vectors.shape[0] == 0:
        raise ValueError(f"projection_matrix needs (K, D) vectors with K >= 1, got shape {tuple(vectors.shape)}")
    c = vectors.detach().to(device="cpu", dtype=torch.float64).T
    return c @ torch.linalg.pinv(c.T @ c, hermitian=True) @ c.T


def leave_one_out_distances(masked_pooled: torch.Tensor, concept_projection: torch.Tensor) -> torch.Tensor:
    """d_i = |(I - P_C) p_i|: distance of each leave-one-out prompt encoding from the concept subspace.

    masked_pooled: (n, D); concept_projection: (D, D). Returns (n,) float64.
    """
    p = masked_pooled.detach().to(device="cpu", dtype=torch.float64)
    return (p - p @ concept_projection.T).norm(dim=-1)


def detect_trigger_tokens(masked_pooled: torch.Tensor, concept_projection: torch.Tensor,
                          alpha: float = SAFREE_ALPHA) -> torch.Tensor:
    """Token i is a trigger when d_i >= (1 + alpha) * mean_{j != i} d_j. Returns (n,) bool.

    With a single token there is nothing to compare against; it is flagged (the official code
    flags it too, because its mean over zero tokens is NaN and ``d < NaN`` is False).
    """
    distances = leave_one_out_distances(masked_pooled, concept_projection)
    n = distances.shape[0]
    if n <= 1:
        return torch.ones(n, dtype=torch.bool)
    mean_of_others = (distances.sum() - distances) / (n - 1)
    return distances >= (1.0 + alpha) * mean_of_others


def project_out_of_concept(hidden: torch.Tensor, input_projection: torch.Tensor,
                           concept_projection: torch.Tensor) -> torch.Tensor:
    """(I - P_C) P_I e for every row e of ``hidden`` (T, D); returned in hidden's dtype and device."""
    e = hidden.detach().to(device="cpu", dtype=torch.float64)
    inside = e @ input_projection.T
    projected = inside - inside @ concept_projection.T
    return projected.to(device=hidden.device, dtype=hidden.dtype)


def self_validation_beta(hidden: torch.Tensor, projected: torch.Tensor, active_rows: torch.Tensor) -> float:
    """beta = 1 - mean over active rows of cos(e, (I - P_C) P_I e). hidden, projected: (T, D)."""
    rows = active_rows.to(hidden.device)
    cos = torch.nn.functional.cosine_similarity(projected[rows].double(), hidden[rows].double(), dim=-1)
    return float(1.0 - cos.mean())


def filtered_step_count(beta: float, up_t: int = SAFREE_UP_T, params: SVFParams = SVF_PRESETS["default"]) -> int:
    """t' = round(up_t * sigmoid(2k(10 beta - t0))): the last step index (0-based) that is filtered.

    Python's round (half to even), as the official ``f_beta``. Steps 0..t' use the filtered
    embedding, so even t' = 0 filters the first step.
    """
    z = 2.0 * params.k * (10.0 * beta - params.t0)
    sigmoid = 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))
    return int(round(up_t * sigmoid))


def filter_end_percent(last_filtered_step: int, schedule_steps: int = SAFREE_STEPS) -> float:
    """Share of the timestep range (ComfyUI's start/end percent) covering steps 0..t' of ``schedule_steps``.

    Step i of a schedule spaced evenly in timestep sits at percent ~ i / steps (ComfyUI's
    ``simple`` and ``normal`` schedulers, diffusers' ``linspace``); the boundary is put halfway
    to the first unfiltered step so neither neighbour sits on it. Returns a value in (0, 1].
    """
    if schedule_steps < 1:
        raise ValueError(f"schedule_steps must be >= 1, got {schedule_steps}")
    return min(1.0, (last_filtered_step + 0.5) / schedule_steps)


def safree_filter(hidden: torch.Tensor, chunks: list[PromptChunk], concept_projection: torch.Tensor,
                  alpha: float = SAFREE_ALPHA) -> SafreeFiltering:
    """Steps 2-4 of SAFREE on the hidden states (T, D) of one prompt made of one or more chunks.

    Each chunk is detected and projected with its own input space P_I (a chunk is what the
    official code sees; longer prompts are handled chunk by chunk, as CLIP encodes them).
    beta is averaged over the active rows of all chunks.
    """
    filtered = hidden.clone()
    flagged = torch.zeros(hidden.shape[0], dtype=torch.bool)
    projected_active, hidden_active = [], []
    for chunk in chunks:
        if chunk.token_rows.numel() == 0:
            continue
        input_projection = projection_matrix(chunk.masked_pooled)
        projected = project_out_of_concept(hidden, input_projection, concept_projection)
        triggers = chunk.token_rows[detect_trigger_tokens(chunk.masked_pooled, concept_projection, alpha)]
        filtered[triggers.to(hidden.device)] = projected[triggers.to(hidden.device)]
        flagged[triggers] = True
        rows = chunk.active_rows.to(hidden.device)
        projected_active.append(projected[rows])
        hidden_active.append(hidden[rows])
    if not hidden_active:
        return SafreeFiltering(filtered=filtered, flagged=flagged, beta=0.0)
    all_hidden, all_projected = torch.cat(hidden_active), torch.cat(projected_active)
    beta = self_validation_beta(all_hidden, all_projected, torch.arange(all_hidden.shape[0]))
    return SafreeFiltering(filtered=filtered, flagged=flagged, beta=beta)


def latent_reattention(filtered: torch.Tensor, original: torch.Tensor, scale: float,
                       band: int = FOURIER_BAND) -> torch.Tensor:
    """Attenuate the low frequencies that the filtered prompt amplifies beyond the original prompt.

    filtered, original: (B, C, H, W) UNet skip features of the same latents under the filtered
    and the original prompt. In the centred spectrum's low-frequency box [c - band, c + band)
    (FreeU's box), each component of ``filtered`` whose magnitude exceeds the original's is
    multiplied by ``scale``; every other component, and all other frequencies, are kept. The
    official (unreachable) ``SafeGuard_Low_Fourier_filter`` compares real parts and sets such
    components to the constant ``scale`` instead; this follows the paper's description.
    Returns a tensor shaped and typed like ``filtered``.
    """
    if filtered.shape != original.shape:
        raise ValueError(f"filtered {tuple(filtered.shape)} and original {tuple(original.shape)} skip "
                         "features must have the same shape")
    spectrum = torch.fft.fftshift(torch.fft.fftn(filtered.float(), dim=(-2, -1)), dim=(-2, -1))
    reference = torch.fft.fftshift(torch.fft.fftn(original.float(), dim=(-2, -1)), dim=(-2, -1))
    height, width = spectrum.shape[-2:]
    rows = slice(max(height // 2 - band, 0), height // 2 + band)
    cols = slice(max(width // 2 - band, 0), width // 2 + band)
    low, low_reference = spectrum[..., rows, cols], reference[..., rows, cols]
    spectrum[..., rows, cols] = torch.where(low.abs() > low_reference.abs(), low * scale, low)
    out = torch.fft.ifftn(torch.fft.ifftshift(spectrum, dim=(-2, -1)), dim=(-2, -1)).real
    return out.to(filtered.dtype)


def skip_scales_by_channels(model_channels: int, s1: float = SAFREE_SKIP_SCALES[0],
                            s2: float = SAFREE_SKIP_SCALES[1]) -> dict[int, float]:
    """{skip-feature channels: scale}: FreeU's two decoder stages (4x and 2x the base channels)."""
    return {4 * model_channels: s1, 2 * model_channels: s2}
