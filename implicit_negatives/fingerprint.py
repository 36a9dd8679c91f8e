"""Short, cheap fingerprints that tell whether two text encoders are the same weights.

An implicit negative is learned through one text encoder; it transfers between unlearned
checkpoints that share that encoder (the paper's transfer result), but is meaningless through a
different one (e.g. AdvUnlearn replaces the encoder). The trainer stores the fingerprint of the
token-embedding table in the file; the nodes compare it with the CLIP they are given.
"""

from __future__ import annotations

import hashlib

import torch

ROW_STRIDE = 97  # ~510 of CLIP-L's 49,408 rows: enough to tell checkpoints apart, cheap on any device


def tensors_fingerprint(named_tensors: list[tuple[str, torch.Tensor]]) -> str:
    """sha256 (16 hex digits) of names, shapes and every 97th flattened value (as float16) of some tensors.

    Used for the denoising model: a few sampled weights identify the checkpoint and any patches on it.
    """
    digest = hashlib.sha256()
    for name, tensor in named_tensors:
        flat = tensor.detach().reshape(-1)[::ROW_STRIDE].to(device="cpu", dtype=torch.float16).contiguous()
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(flat.numpy().tobytes())
    return digest.hexdigest()[:16]


def text_encoder_fingerprint(token_embedding: torch.Tensor) -> str:
    """sha256 (16 hex digits) of every 97th row of a (vocab, width) token-embedding table, as float16.

    float16 makes the fingerprint the same whether the model was loaded in fp16, bf16->fp32 or fp32.
    """
    rows = token_embedding.detach()[::ROW_STRIDE].to(device="cpu", dtype=torch.float16).contiguous()
    digest = hashlib.sha256(rows.numpy().tobytes())
    digest.update(str(tuple(token_embedding.shape)).encode())
    return digest.hexdigest()[:16]
