"""Read, validate and write textual-inversion embeddings in every common layout.

An embedding is a set of token vectors per text encoder, keyed the way ComfyUI keys them:

    clip_l  [N, 768]   SD1.x, and the first encoder of SDXL
    clip_h  [N, 1024]  SD2.x (OpenCLIP ViT-H)
    clip_g  [N, 1280]  the second encoder of SDXL

Layouts read (all to the same tensors):
    .safetensors  {"clip_l": T, "clip_g": T}   ours, kohya SDXL, ComfyUI
    .safetensors  {"emb_params": T} / {"emp_params": T}   kohya SD1/SD2
    .safetensors  {"<token>": T}                diffusers ``save_textual_inversion``
    .pt           {"string_to_param": {"*": T}, ...}   A1111
    .bin / .pt    {"<token>": T}                diffusers ``learned_embeds.bin``

Pickled files are opened with ``torch.load(weights_only=True)``, which refuses any
payload that would run code. Writes are atomic: a temporary file in the same folder is
renamed over the target, so a crash never leaves a half-written embedding behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import struct
from dataclasses import dataclass, field
from typing import Mapping

import torch
from safetensors import SafetensorError
from safetensors import safe_open
from safetensors.torch import load_file

from .atomic_write import atomic_write_bytes
from .inversion import CAPTION_TEMPLATES

FORMAT_TAG = "implicit-negative/1"

# Encoder key -> width, and the model family it implies (used in error messages).
ENCODER_WIDTHS = {"clip_l": 768, "clip_h": 1024, "clip_g": 1280}
WIDTH_TO_ENCODER = {width: key for key, width in ENCODER_WIDTHS.items()}
FAMILY_BY_ENCODERS = {
    ("clip_l",): "SD1.x",
    ("clip_h",): "SD2.x",
    ("clip_g", "clip_l"): "SDXL",
}
MAX_VECTORS = 75  # one CLIP chunk minus its start and end tokens
EMBEDDING_EXTENSIONS = (".safetensors", ".pt", ".bin")

# Metadata keys written into the safetensors header (all values are strings there).
METADATA_FIELDS = (
    "concept", "base_model", "base_model_hash", "unlearned_model", "unlearned_model_hash",
    "vectors", "steps", "loss", "trainer_version", "intended_use", "init_word", "created",
    "caption_templates",  # JSON list of the caption templates ("a photo of a {}") the vectors were trained in
)


class EmbeddingFormatError(ValueError):
    """The file is not a usable embedding; the message says why and what to do."""


@dataclass
class Embedding:
    """Token vectors per text encoder plus free-form string metadata.

    vectors: {"clip_l": (N, 768), "clip_g": (N, 1280), ...}, float32 on the CPU.
    """

    vectors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    source: str = ""

    @property
    def num_vectors(self) -> int:
        return next(iter(self.vectors.values())).shape[0]

    @property
    def family(self) -> str:
        return describe_family(self.vectors)

    def widths(self) -> dict[str, int]:
        return {key: int(t.shape[-1]) for key, t in self.vectors.items()}


def describe_family(vectors: Mapping[str, torch.Tensor]) -> str:
    keys = tuple(sorted(vectors))
    return FAMILY_BY_ENCODERS.get(keys, "+".join(f"{k}[{vectors[k].shape[-1]}]" for k in keys))


def caption_templates(metadata: Mapping[str, str]) -> tuple[str, ...]:
    """The caption templates an embedding was trained in ("{}" marks the vectors), as its metadata records them.

    ``caption_templates`` (a JSON list) is written by this pack's trainer; files it wrote before that key existed
    name their template set in ``training`` ("templates": "object"), read through ``CAPTION_TEMPLATES`` (unchanged
    since the first trainer). Returns () when the file records neither (e.g. a plain textual-inversion file)."""
    raw = metadata.get("caption_templates")
    if raw:
        try:
            templates = json.loads(raw)
        except ValueError as error:
            raise EmbeddingFormatError(f"caption_templates metadata is not JSON: {raw[:80]!r}") from error
        if not (isinstance(templates, list) and all(isinstance(t, str) for t in templates)):
            raise EmbeddingFormatError(f"caption_templates metadata must be a JSON list of strings, got {raw[:80]!r}")
        return tuple(templates)
    try:
        name = json.loads(metadata.get("training") or "{}").get("templates")
    except (ValueError, AttributeError):
        return ()
    return CAPTION_TEMPLATES.get(name, ()) if isinstance(name, str) else ()


def sha256_file(path: str, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk_bytes), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- reading

def load_embedding(path: str) -> Embedding:
    """Read any supported layout from ``path`` and validate it.

    Raises EmbeddingFormatError with the file name and the reason on anything unusable:
    missing/empty/truncated files, pickles that would execute code, NaN/Inf values,
    wrong ranks, unknown widths or mismatched SDXL halves.
    """
    if not os.path.isfile(path):
        raise EmbeddingFormatError(f"Embedding file not found: {path}")
    if os.path.getsize(path) == 0:
        raise EmbeddingFormatError(f"Embedding file is empty (0 bytes): {path}")

    if path.lower().endswith(".safetensors"):
        raw, metadata = _read_safetensors(path)
    else:
        raw, metadata = _read_pickle(path), {}

    vectors = _vectors_from_state_dict(raw, path)
    validate_vectors(vectors, path)
    return Embedding(vectors={k: v.detach().to(torch.float32).cpu().contiguous() for k, v in vectors.items()},
                     metadata=metadata, source=path)


def _read_safetensors(path: str) -> tuple[dict, dict[str, str]]:
    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
        tensors = load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise EmbeddingFormatError(
            f"Cannot read {os.path.basename(path)} as safetensors ({error}); "
            "the file is truncated or not a safetensors file") from error
    return tensors, metadata


def _read_pickle(path: str) -> dict:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise EmbeddingFormatError(
            f"Refusing to load {os.path.basename(path)}: it is a pickle that contains more than "
            "tensors (possibly code). Only weights are loaded; convert it to .safetensors "
            f"from a source you trust. Details: {str(error).splitlines()[0]}") from error
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise EmbeddingFormatError(
            f"Cannot read {os.path.basename(path)} ({error}); the file is truncated or is not "
            "a torch-saved embedding") from error
    if isinstance(data, torch.Tensor):
        return {"<tensor>": data}
    if not isinstance(data, dict):
        raise EmbeddingFormatError(
            f"{os.path.basename(path)} holds a {type(data).__name__}, not a dict of tensors")
    return data


def _vectors_from_state_dict(raw: Mapping, path: str) -> dict[str, torch.Tensor]:
    name = os.path.basename(path)
    if "string_to_param" in raw:  # A1111: {"string_to_param": {"*": T}, "name": ..., "step": ...}
        params = raw["string_to_param"]
        if not isinstance(params, Mapping) or not params:
            raise EmbeddingFormatError(f"{name}: 'string_to_param' is empty")
        return {_encoder_for(next(iter(params.values())), name): next(iter(params.values()))}

    tensors = {k: v for k, v in raw.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise EmbeddingFormatError(f"{name} contains no tensors")
    named = {k: tensors[k] for k in ENCODER_WIDTHS if k in tensors}
    if named:
        return named
    if len(tensors) == 1:  # emb_params, emp_params, {"<token>": T}
        tensor = next(iter(tensors.values()))
        return {_encoder_for(tensor, name): tensor}
    raise EmbeddingFormatError(
        f"{name}: cannot tell which of its {len(tensors)} tensors ({', '.join(sorted(tensors)[:6])}) "
        "is the embedding; expected clip_l/clip_g keys or a single tensor")


def _encoder_for(tensor: torch.Tensor, name: str) -> str:
    if not isinstance(tensor, torch.Tensor):
        raise EmbeddingFormatError(f"{name}: the embedding entry is not a tensor")
    width = int(tensor.shape[-1]) if tensor.dim() > 0 else 0
    if width not in WIDTH_TO_ENCODER:
        raise EmbeddingFormatError(
            f"{name}: vectors are {width} wide; known widths are 768 (SD1.x CLIP-L), "
            "1024 (SD2.x OpenCLIP-H) and 768+1280 (SDXL, as clip_l + clip_g)")
    return WIDTH_TO_ENCODER[width]


def validate_vectors(vectors: Mapping[str, torch.Tensor], source: str = "embedding") -> None:
    """Raise EmbeddingFormatError unless every tensor is a finite (N, width) block of a known width."""
    name = os.path.basename(source)
    counts = set()
    for key, tensor in vectors.items():
        if key not in ENCODER_WIDTHS:
            raise EmbeddingFormatError(f"{name}: unknown encoder key {key!r}")
        if tensor.dim() == 1:
            tensor = tensor.unsqueeze(0)
            vectors[key] = tensor  # type: ignore[index]
        if tensor.dim() != 2:
            raise EmbeddingFormatError(
                f"{name}: {key} has shape {tuple(tensor.shape)}; expected (vectors, width) or (width,)")
        if tensor.shape[0] == 0:
            raise EmbeddingFormatError(f"{name}: {key} holds zero vectors")
        if tensor.shape[0] > MAX_VECTORS:
            raise EmbeddingFormatError(
                f"{name}: {key} holds {tensor.shape[0]} vectors; at most {MAX_VECTORS} fit in one prompt chunk")
        if tensor.shape[1] != ENCODER_WIDTHS[key]:
            raise EmbeddingFormatError(
                f"{name}: {key} is {tensor.shape[1]} wide but {key} vectors must be {ENCODER_WIDTHS[key]} wide")
        if not tensor.is_floating_point():
            raise EmbeddingFormatError(f"{name}: {key} has dtype {tensor.dtype}, expected a float tensor")
        if not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise EmbeddingFormatError(f"{name}: {key} contains {bad} NaN/Inf values; the training diverged")
        counts.add(int(tensor.shape[0]))
    if len(counts) > 1:
        raise EmbeddingFormatError(f"{name}: encoders disagree on the number of vectors {sorted(counts)}")


# --------------------------------------------------------------------------- writing

def save_embedding(path: str, vectors: Mapping[str, torch.Tensor], metadata: Mapping[str, object] | None = None) -> str:
    """Atomically write our format: ``clip_l`` (+ ``clip_g``) tensors and string metadata.

    The same file works with ComfyUI's ``embedding:NAME`` syntax, in A1111 and in diffusers
    (``load_textual_inversion(path, token=...)`` for SD1; ``state_dict["clip_g"]`` for SDXL).
    Returns the sha256 of the written file.
    """
    tensors = {k: v.detach().to(torch.float32).cpu().contiguous() for k, v in vectors.items()}
    tensors = {k: (v.unsqueeze(0) if v.dim() == 1 else v) for k, v in tensors.items()}
    validate_vectors(tensors, path)
    header = {"format": FORMAT_TAG, "intended_use": "negative",
              "vectors": str(next(iter(tensors.values())).shape[0]),
              "model_family": describe_family(tensors)}
    for key, value in (metadata or {}).items():
        header[str(key)] = value if isinstance(value, str) else json.dumps(value)

    atomic_write_bytes(path, _safetensors_bytes(tensors, header))
    return sha256_file(path)


def _safetensors_bytes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    """Serialise float32 tensors as safetensors with a sorted JSON header.

    safetensors' own writer orders the header through a hash map, so two saves of the same
    embedding can differ byte for byte; sorting makes the file (and its sha256) reproducible.
    """
    entries, blobs, offset = {"__metadata__": dict(metadata)}, [], 0
    for key in sorted(tensors):
        blob = tensors[key].numpy().astype("<f4").tobytes()
        entries[key] = {"dtype": "F32", "shape": list(tensors[key].shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    header = json.dumps(entries, sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the format pads the header to 8-byte alignment
    return struct.pack("<Q", len(header)) + header + b"".join(blobs)


@dataclass
class ImplicitNegative:
    """What flows along an IMPLICIT_NEGATIVE socket: the vectors, where they came from, and a strength.

    ``strength`` is a prompt weight, with the meaning of ``(embedding:NAME:strength)`` in ComfyUI.
    """

    name: str
    embedding: Embedding
    strength: float = 1.0
