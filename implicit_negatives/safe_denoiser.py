"""Safe Denoiser (Kim, Kim, Yusuf, Ermon, Park, NeurIPS 2025, arXiv 2502.08011) as pure functions of x0 predictions.

Why it works (the paper's derivation, restated). Split the data distribution into the part to keep and the
part to negate, p = (1 − β)·p_safe + β·p_neg. Tweedie's denoiser of the mixture is the mixture of the two
denoisers, weighted by the posterior probability β(x_t) that x_t came from the negated part:

    E[x0 | x_t] = (1 − β(x_t))·E_safe[x0 | x_t] + β(x_t)·E_neg[x0 | x_t]
    ⇒ E_safe[x0 | x_t] = (E[x0 | x_t] − β(x_t)·E_neg[x0 | x_t]) / (1 − β(x_t))

The model supplies E[x0 | x_t] (ComfyUI's "denoised"). A negation set {x_i} (latents of images to avoid)
stands in for p_neg, and E_neg becomes a kernel-weighted mean of the set.

What is computed here is the practical form of the authors' released code (github.com/MingyuKim87/Safe_Denoiser,
``repellency/repellency_methods_threshold.py``, method ``kernel_fast``; re-released unchanged as the
``safe_denoiser`` baseline of github.com/MingyuKim87/SGF, ``nudity_sdv1/repellency/repellency_methods_safe_denoiser.py``):

    w_i   = exp(−‖x̂ − x_i‖ / (2h²))                 kernel at the model's x0 prediction x̂ (the release's
                                                     ``torch.cdist``: Euclidean distance, not squared)
    m     = Σ_i w_i·x_i / Σ_i w_i                   the negation set's kernel mean, E_neg
    g     = Σ_i w_i / (Σ_i w_i + ε)                 the release's ``+ epsilon`` in the denominator; read as β(x_t)
                                                     when the density of the rest of the data is taken as flat
    x̂_safe = x̂ − s·g·m                              the release's ``x_0_hat -= scale * negative_x_0_hat``

i.e. the numerator of the derived identity with β = s·g; the release drops the 1/(1 − β) renormalisation and
so do we (it reproduces their numbers). Our sources are the paper's abstract and the two released code bases:
the paper's full text (Algorithm 1, appendix) could not be read with the tools available here, so the link
between β and (s, g) above is our reading of the code, not a quotation.

Defaults (``SAFE_DENOISER_RELEASE``) are the release's nudity settings: h = 3.15, s = 0.33, ε = 1e-8
(``configs/nudity/safe_denoiser.yaml`` of Safe_Denoiser, ``configs/safe_denoiser/safe_denoiser_original.yaml``
of SGF). The release also projects every negation latent to unit norm over channels at each pixel
(``RepellencyMethod.project``: ``results / torch.norm(results, dim=1)``) before use; h = 3.15 refers to
distances between a raw x̂ and such projected latents (``project_negation_latents``).

When it acts (Safety-Guided Flow, Kim, Kim, Park, arXiv 2603.13300, ICLR 2026): SGF recasts Safe Denoiser
as negative guidance along an MMD potential and argues from control-barrier functions that such guidance is
needed only in an early critical window of the reverse process and should decay to zero after it. Its released
configs (github.com/MingyuKim87/SGF, ``nudity_sdv1/configs/safe_denoiser/*.yaml``) use a hard window in DDPM
timesteps, t ∈ [800, 1000] (``neg_start: 1000, neg_end: 800``; 780 in ``safe_denoiser_original.yaml``), the
first 20% of the schedule; the Safe Denoiser release used steps 0–11 of 50. The window is applied by the caller
(the ComfyUI patch uses start/end percent of the schedule; ``SGF_WINDOW``).

Cost per model evaluation with a batch of B and N negation latents of D = C·H·W values: one (B, N) distance
matrix and one (B, N)·(N, D) product, O(B·N·D) time; memory N·D floats for the set (SD1 at 512²: D = 16384,
N = 250 → 16 MB in float32) plus O(B·N). ``MAX_NEGATION_LATENTS`` caps N (4096: 268 MB for SD1 at 512², 1 GB
for SDXL at 1024²); the release used 515 images for nudity and 3000 for I2P.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import Tensor

# Memory grows as N·C·H·W floats and every step costs O(N·C·H·W): 4096 holds the release's largest set (3000).
MAX_NEGATION_LATENTS = 4096


class NegationSetError(ValueError):
    """The negation set cannot serve this model or latent; the message says how to fix it."""


@dataclass(frozen=True, eq=False)
class NegationSet:
    """Latents of the images to steer away from, in the VAE's own scale (as ComfyUI's LATENT["samples"]).

    latents:    (N, C, H, W), float32, finite; N ≤ MAX_NEGATION_LATENTS.
    source:     provenance, e.g. "EncodeNegationSet: 25 images 512×512".
    provenance: where the latents came from, as strings (``negation_set_io``): image names and sha256,
                VAE fingerprint, resolution; empty for an IMAGE batch encoded in the graph.
    """

    latents: Tensor
    source: str
    provenance: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SafeDenoiserParams:
    """strength: s, the release's ``scale``; 0 leaves the denoiser unchanged.
    bandwidth:   h, the release's ``sigma``: kernel w = exp(−distance / (2h²)).
    epsilon:     ε, the release's ``epsilon``: the gate g = Σw / (Σw + ε) closes far from the set.
    """

    strength: float
    bandwidth: float
    epsilon: float = 1e-8


SAFE_DENOISER_RELEASE = SafeDenoiserParams(strength=0.33, bandwidth=3.15, epsilon=1e-8)
# SGF's early window as fractions of the reverse process: t from 1000 down to 800 of 1000.
SGF_WINDOW = (0.0, 0.2)


def check_negation_latents(latents: Tensor, channels: int) -> None:
    """Refuse a negation set the safe denoiser cannot use: empty, not (N, C, H, W), wrong channels, too large, NaN."""
    if latents is None or latents.numel() == 0:
        raise NegationSetError(
            "The negation set is empty: encode at least one image of the concept to avoid with EncodeNegationSet.")
    if latents.ndim != 4:
        raise NegationSetError(
            f"Negation latents must be (N, C, H, W) image latents; got shape {tuple(latents.shape)}. Video or audio "
            "latents are not supported: encode still images with the model's own VAE.")
    if latents.shape[1] != channels:
        raise NegationSetError(
            f"The negation set has {latents.shape[1]}-channel latents, but this model samples {channels}-channel "
            "latents: encode the negation images with the VAE of the same checkpoint.")
    if latents.shape[0] > MAX_NEGATION_LATENTS:
        raise NegationSetError(
            f"The negation set holds {latents.shape[0]} latents; at most {MAX_NEGATION_LATENTS} are supported "
            "(memory and time per step grow with N): pass a subset of the images.")
    if not torch.isfinite(latents).all():
        raise NegationSetError(
            "The negation set contains NaN/Inf values (a VAE overflow, e.g. fp16): re-encode the images with the VAE "
            "in float32 or bf16.")


def project_negation_latents(latents: Tensor) -> Tensor:
    """The release's projection of the negation set: unit norm over channels at every pixel.

    latents: (N, C, H, W) in the sampler's (model) scale. Returns (N, C, H, W) float32.
    """
    return torch.nn.functional.normalize(latents.float(), dim=1, eps=1e-12)


def negation_kernel_mean(query: Tensor, negation: Tensor, bandwidth: float, epsilon: float) -> tuple[Tensor, Tensor]:
    """Kernel mean m of the negation set around each query, and the gate g = Σw / (Σw + ε).

    query:    (B, C, H, W), the model's x0 predictions x̂.
    negation: (N, C, H, W), the (projected) negation latents, same C, H, W.
    Returns m: (B, C, H, W) = Σ_i w_i·x_i / Σ_i w_i and g: (B,) in [0, 1], with w_i = exp(−‖x̂ − x_i‖ / (2h²)).
    Computed in log space: far from the set the release's ratio underflows to 0/ε, here m stays finite and g → 0.
    """
    flat_negation = negation.flatten(1)
    log_weights = -torch.cdist(query.flatten(1), flat_negation) / (2.0 * bandwidth ** 2)  # (B, N)
    mean = torch.softmax(log_weights, dim=1) @ flat_negation
    gate = torch.sigmoid(torch.logsumexp(log_weights, dim=1) - math.log(epsilon))
    return mean.reshape(query.shape), gate


def safe_denoised(denoised: Tensor, negation: Tensor, params: SafeDenoiserParams) -> Tensor:
    """The safe denoiser's x0 prediction: x̂ − s·g·m (see the module docstring for the derivation).

    denoised: (B, C, H, W) x0 prediction of the model (after CFG); negation: (N, C, H, W), same C, H, W.
    Returns (B, C, H, W) in ``denoised``'s dtype; at strength 0 it is ``denoised`` itself.
    """
    if params.strength == 0.0:
        return denoised
    mean, gate = negation_kernel_mean(denoised.float(), negation.float(), params.bandwidth, params.epsilon)
    correction = params.strength * gate.reshape(-1, *([1] * (denoised.ndim - 1))) * mean
    return denoised - correction.to(denoised.dtype)
