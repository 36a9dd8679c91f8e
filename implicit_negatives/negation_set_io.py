"""Negation-set files: the latents a Safe Denoiser steers away from, with where they came from.

One safetensors file, written atomically: the tensor ``latents`` (N, C, H, W) float32 in the VAE's own
scale (as ComfyUI's LATENT["samples"]), and string metadata:

    format         "implicit-negatives/negation-set" (a file without it is refused)
    source         how it was made, e.g. "python -m trainer: folder /data/nudity (25 images)"
    images         JSON list of [file name, sha256 of the file's bytes] (an IMAGE batch: "pixels" + the
                   sha256 of its float32 pixels), in latent order
    vae_fingerprint 16 hex digits of the VAE's weights: a set is only valid for the VAE that encoded it
    resolution     the square pixel size the images were fitted to

The trainer exports one next to the embedding it trains (``NAME.negation_set.safetensors``), and the
LoadNegationSet node keeps its latent cache in the same format, so one reader serves both.
"""

from __future__ import annotations

import json
import os

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .atomic_write import atomic_path
from .safe_denoiser import NegationSet, NegationSetError, check_negation_latents

NEGATION_SET_FORMAT = "implicit-negatives/negation-set"
NEGATION_SET_SUFFIX = ".negation_set.safetensors"
PROVENANCE_KEYS = ("images", "vae_fingerprint", "resolution")


def negation_set_path(embedding_path: str) -> str:
    """Where the trainer exports the negation set of ``embedding_path``: ``NAME.negation_set.safetensors``."""
    stem = embedding_path[:-len(".safetensors")] if embedding_path.endswith(".safetensors") else embedding_path
    return stem + NEGATION_SET_SUFFIX


def provenance(images: list[tuple[str, str]], vae_fingerprint: str, resolution: int) -> dict[str, str]:
    """The metadata that says which images, which VAE and which size a set was made from."""
    return {"images": json.dumps([list(entry) for entry in images]), "vae_fingerprint": vae_fingerprint,
            "resolution": str(int(resolution))}


def save_negation_set(path: str, negation_set: NegationSet) -> None:
    """Write ``negation_set`` (latents, source, provenance) to ``path`` atomically."""
    latents = negation_set.latents.detach().float().cpu().contiguous()
    check_negation_latents(latents, latents.shape[1] if latents.ndim == 4 else -1)
    metadata = {**{str(k): str(v) for k, v in negation_set.provenance.items()},
                "format": NEGATION_SET_FORMAT, "source": negation_set.source}
    with atomic_path(path) as temp:
        save_file({"latents": latents}, temp, metadata=metadata)


def load_negation_set(path: str) -> NegationSet:
    """Read a negation-set file; NegationSetError says why a file is not one (no pickle is ever opened)."""
    name = os.path.basename(path)
    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            keys = list(handle.keys())
            latents = handle.get_tensor("latents") if "latents" in keys else None
    except (SafetensorError, OSError, ValueError) as error:
        raise NegationSetError(f"Cannot read {name} as safetensors ({error}): the file is truncated or not a "
                               "safetensors file; export the negation set again.") from None
    if metadata.get("format") != NEGATION_SET_FORMAT or latents is None:
        raise NegationSetError(f"{name} is not a negation-set file (no '{NEGATION_SET_FORMAT}' format tag and "
                               "'latents' tensor); give a folder of images, or the *.negation_set.safetensors "
                               "the trainer exports (--export-negation-set).")
    latents = latents.float()
    check_negation_latents(latents, latents.shape[1] if latents.ndim == 4 else -1)
    extra = {k: v for k, v in metadata.items() if k not in ("format", "source")}
    return NegationSet(latents=latents, source=metadata.get("source", name), provenance=extra)
