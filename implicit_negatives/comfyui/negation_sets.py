"""Negation sets from a folder of images or an exported file, for LoadNegationSet and the trainer's export.

A folder is read by the trainer's own reader (``implicit_negatives.image_folder``: the same checks, the same
fitting) and encoded by the trainer's own encoder (``inversion.encode_images``), so the set LoadNegationSet
makes from a folder equals the one the trainer exports for the same folder, VAE and resolution. Encoded
sets are cached as negation-set files keyed by the fitted pixels, the VAE's fingerprint and the resolution,
as the trainer caches its latents: a second load of an unchanged folder reads one file and runs no VAE.
"""

from __future__ import annotations

import hashlib
import os
from typing import Optional, Sequence

import torch

from ..embedding_io import sha256_file
from ..image_folder import TrainingDataError, image_names, load_image_folder
from ..negation_set_io import NEGATION_SET_SUFFIX, load_negation_set, provenance, save_negation_set
from ..safe_denoiser import MAX_NEGATION_LATENTS, NegationSet, NegationSetError, check_negation_latents
from .inversion import encode_images
from .model_identity import vae_fingerprint

NEGATION_SET_FOLDER = "negation_sets"  # the ComfyUI model-folder type the pack registers (models/negation_sets)


def find_negation_source(value: str, roots: Sequence[str]) -> Optional[str]:
    """An absolute path as is; a relative one under the first of ``roots`` that holds it (folder or file)."""
    if os.path.isabs(value):
        return value if os.path.exists(value) else None
    for root in roots:
        candidate = os.path.normpath(os.path.join(root, value))
        if os.path.commonpath([os.path.abspath(root), os.path.abspath(candidate)]) != os.path.abspath(root):
            continue  # "../elsewhere" may not leave a root
        if os.path.exists(candidate):
            return candidate
    return None


def negation_roots() -> list[str]:
    """Where a relative LoadNegationSet path is looked up, in order: ComfyUI's input folder, the
    ``negation_sets`` model folders (models/negation_sets), the embeddings folders (where the trainer exports
    NAME.negation_set.safetensors)."""
    import folder_paths
    return [folder_paths.get_input_directory()] + [path for name in (NEGATION_SET_FOLDER, "embeddings")
                                                   if name in folder_paths.folder_names_and_paths
                                                   for path in folder_paths.get_folder_paths(name)]


def resolve_negation_path(path: str) -> str:
    """The folder or file a LoadNegationSet path names; NegationSetError lists where it was looked for."""
    found = find_negation_source(path.strip(), negation_roots()) if path.strip() else None
    if found is None:
        raise NegationSetError(
            f"Negation set {path!r} not found: give a folder of images or a *.negation_set.safetensors file, as an "
            f"absolute path or relative to one of: {', '.join(negation_roots())}.")
    return found


def source_stamp(path: str) -> str:
    """Changes whenever the folder's images (names, sizes, times) or the file change: ComfyUI re-runs the node."""
    if os.path.isfile(path):
        stat = os.stat(path)
        return f"{path}:{stat.st_size}:{stat.st_mtime_ns}"
    parts = [path]
    for name in image_names(path):
        stat = os.stat(os.path.join(path, name))
        parts.append(f"{name}:{stat.st_size}:{stat.st_mtime_ns}")
    return "\n".join(parts)


def pixel_hashes(images: torch.Tensor) -> list[tuple[str, str]]:
    """Provenance of an IMAGE batch without files: ("image i", sha256 of its float32 pixels)."""
    return [(f"image {i}", hashlib.sha256(image.float().contiguous().numpy().tobytes()).hexdigest())
            for i, image in enumerate(images.cpu())]


def negation_set_of(vae, latents: torch.Tensor, hashes: list[tuple[str, str]], resolution: int,
                    source: str) -> NegationSet:
    """A negation set of latents ``vae`` encoded from images of ``resolution`` px, with their provenance."""
    latents = latents.float().cpu()
    check_negation_latents(latents, vae.latent_channels)
    return NegationSet(latents=latents, source=source,
                       provenance=provenance(hashes, vae_fingerprint(vae), resolution))


def export_negation_set(path: str, vae, latents: torch.Tensor, hashes: list[tuple[str, str]], resolution: int,
                        source: str) -> NegationSet:
    """Write the latents a training run used as a negation set (the trainer's ``--export-negation-set``)."""
    negation_set = negation_set_of(vae, latents, hashes, resolution, source)
    save_negation_set(path, negation_set)
    return negation_set


def load_folder_negation_set(vae, folder: str, resolution: int, skip_bad: bool, cache_dir: str) -> tuple[NegationSet, str]:
    """(negation set, receipt) of a folder of images: checked, fitted, encoded once and cached in ``cache_dir``."""
    if resolution % 8:
        raise NegationSetError(f"resolution must be a multiple of 8, got {resolution}")
    count = len(image_names(folder))
    if count > MAX_NEGATION_LATENTS:
        raise NegationSetError(f"{folder} holds {count} images; a negation set holds at most "
                               f"{MAX_NEGATION_LATENTS} (memory and time per step grow with it): use a subset.")
    loaded = load_image_folder(folder, resolution, skip_bad, skip_hint="set skip_bad_images to true to use the others")
    fingerprint = vae_fingerprint(vae)
    digest = hashlib.sha256(loaded.images.numpy().tobytes())
    digest.update(f"{fingerprint}:{resolution}".encode())
    cache_path = os.path.join(cache_dir, f"negation-{digest.hexdigest()[:16]}{NEGATION_SET_SUFFIX}")
    if os.path.isfile(cache_path):
        return load_negation_set(cache_path), loaded.receipt() + " (latents from the cache)"
    hashes = [(name, sha256_file(os.path.join(folder, name))) for name in loaded.names]
    negation_set = negation_set_of(vae, encode_images(vae, loaded.images), hashes, resolution,
                                   f"folder {os.path.abspath(folder)} ({len(loaded.names)} images, {resolution} px)")
    save_negation_set(cache_path, negation_set)
    return negation_set, loaded.receipt()


def load_exported_negation_set(vae, path: str, resolution: int) -> tuple[NegationSet, str]:
    """(negation set, receipt) of a negation-set file, refused unless it was made with this VAE at this size."""
    negation_set = load_negation_set(path)
    made_with, this_vae = negation_set.provenance.get("vae_fingerprint"), vae_fingerprint(vae)
    if made_with != this_vae:
        raise NegationSetError(f"{os.path.basename(path)} was encoded by another VAE (fingerprint {made_with}, this "
                               f"VAE {this_vae}): connect the VAE of the checkpoint it was trained with, or load the "
                               "image folder to encode it with this VAE.")
    if negation_set.latents.shape[1] != vae.latent_channels:
        raise NegationSetError(f"{os.path.basename(path)} holds {negation_set.latents.shape[1]}-channel latents, but "
                               f"this VAE encodes {vae.latent_channels} channels: export it again with this VAE.")
    made_at = negation_set.provenance.get("resolution")
    if made_at != str(resolution):
        raise NegationSetError(f"{os.path.basename(path)} holds latents of {made_at} px images, not {resolution}: "
                               f"set resolution to {made_at} (and sample at that size), or load the image folder.")
    count = negation_set.latents.shape[0]
    return negation_set, f"{count} latent{'s' * (count != 1)} from {os.path.basename(path)} ({negation_set.source})"


def load_negation_source(vae, path: str, resolution: int, skip_bad: bool, cache_dir: str) -> tuple[NegationSet, str]:
    """A folder of images or an exported negation-set file (already resolved to an existing path)."""
    try:
        if os.path.isdir(path):
            return load_folder_negation_set(vae, path, resolution, skip_bad, cache_dir)
        return load_exported_negation_set(vae, path, resolution)
    except TrainingDataError as error:
        raise NegationSetError(str(error)) from None
