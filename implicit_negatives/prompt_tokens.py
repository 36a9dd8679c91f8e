"""Place embedding vectors into CLIP token chunks, exactly as ComfyUI's tokenizer would.

ComfyUI represents a tokenized prompt per encoder as a list of 77-long chunks of
``(token, weight)`` pairs, where ``token`` is an int id or a precomputed vector tensor.
Writing ``"text embedding:NAME"`` in a stock CLIPTextEncode appends the file's vectors as
one "word" after the text. ``append_vectors`` reproduces that packing rule for vectors we
already hold in memory, so our conditioning equals the stock one bit for bit:

* the vectors fit in the last chunk -> inserted before its end token (A1111 semantics);
* they do not fit and are fewer than ``max_word_length`` -> the chunk is closed and
  padded, and the vectors open a new chunk;
* they do not fit and are ``max_word_length`` or more -> they are split across chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Token = tuple  # (int | torch.Tensor, weight)


@dataclass(frozen=True)
class ChunkSpec:
    """The packing parameters of one ComfyUI ``SDTokenizer`` (read off the live tokenizer)."""

    start_token: int | None
    end_token: int | None
    pad_token: int
    max_length: int = 77
    max_word_length: int = 8
    pad_to_max_length: bool = True
    min_length: int | None = None


def _is_special(token, spec: ChunkSpec) -> bool:
    return isinstance(token, int) and token in (spec.start_token, spec.end_token)


def chunk_content(chunk: list[Token], spec: ChunkSpec) -> list[Token]:
    """The prompt tokens of a chunk: without its start token, end token and padding."""
    body = chunk[1:] if spec.start_token is not None else list(chunk)
    for index, item in enumerate(body):  # (token, weight) or, with word ids, (token, weight, word id)
        if isinstance(item[0], int) and item[0] == spec.end_token:
            return body[:index]
    return body


def truncate_to_one_chunk(chunks: list[list[Token]], spec: ChunkSpec) -> list[list[Token]]:
    """One chunk holding the first ``max_length - 2`` prompt tokens of ``chunks``, as diffusers' pipelines
    tokenize (``truncation=True, max_length=77``): start token, the tokens (a word cut at the limit keeps its
    first tokens), end token, padding. ComfyUI instead encodes every chunk; its first chunk holds the same
    tokens for plain text, but a weighted group (``(word:1.2)``) or an embedding shorter than ``max_word_length``
    that would straddle the boundary moves whole into the next chunk."""
    room = spec.max_length - (spec.start_token is not None) - (spec.end_token is not None)
    content = [item for chunk in chunks for item in chunk_content(chunk, spec)][:room]
    width = len(chunks[0][0]) if chunks and chunks[0] else 2

    def special(token):  # ComfyUI's own special tokens: weight 1.0 (and word id 0)
        return (token, 1.0, 0)[:width]
    row = ([special(spec.start_token)] if spec.start_token is not None else []) + content
    if spec.end_token is not None:
        row.append(special(spec.end_token))
    length = max(spec.max_length if spec.pad_to_max_length else 0, spec.min_length or 0)
    return [row + [special(spec.pad_token)] * (length - len(row))]


def _close(chunk: list[Token], spec: ChunkSpec) -> list[Token]:
    chunk = list(chunk)
    if spec.end_token is not None:
        chunk.append((spec.end_token, 1.0))
    if spec.pad_to_max_length and len(chunk) < spec.max_length:
        chunk += [(spec.pad_token, 1.0)] * (spec.max_length - len(chunk))
    if spec.min_length is not None and len(chunk) < spec.min_length:
        chunk += [(spec.pad_token, 1.0)] * (spec.min_length - len(chunk))
    return chunk


def _open(spec: ChunkSpec) -> list[Token]:
    return [(spec.start_token, 1.0)] if spec.start_token is not None else []


def append_vectors(chunks: list[list[Token]], vectors: torch.Tensor, weight: float, spec: ChunkSpec,
                   new_chunk: bool = False) -> list[list[Token]]:
    """Return ``chunks`` with the rows of ``vectors`` (N, D) appended as one word of weight ``weight``.

    ``new_chunk=True`` puts the vectors in a chunk of their own after the text (the
    ``ConditioningConcat`` layout) instead of continuing the text's last chunk.
    """
    group = [(vectors[i], float(weight)) for i in range(vectors.shape[0])]
    if new_chunk:
        done, batch = [list(c) for c in chunks], _open(spec)
    else:
        done = [list(c) for c in chunks[:-1]]
        batch = _open(spec) + chunk_content(chunks[-1], spec) if chunks else _open(spec)
    room_limit = spec.max_length - (1 if spec.end_token is not None else 0)
    is_large = len(group) >= spec.max_word_length
    while group:
        if len(group) + len(batch) > room_limit:
            if is_large:
                remaining = room_limit - len(batch)
                batch += group[:remaining]
                group = group[remaining:]
            done.append(_close(batch, spec))
            batch = _open(spec)
        else:
            batch += group
            group = []
    done.append(_close(batch, spec))
    return done


def extend_last_chunk(chunks: list[list[Token]], tokens: list[Token], spec: ChunkSpec) -> list[list[Token]]:
    """Return ``chunks`` with ``tokens`` (prompt tokens: no start, end or padding) continuing the last chunk, as
    ComfyUI packs the text after an ``embedding:NAME`` that fits in the same chunk. Raises ValueError when they
    do not fit (the caller's text is too long for one chunk)."""
    body = chunk_content(chunks[-1], spec) + list(tokens)
    room = spec.max_length - (spec.start_token is not None) - (spec.end_token is not None)
    if len(body) > room:
        raise ValueError(f"{len(body)} tokens do not fit in one {spec.max_length}-token chunk ({room} for the prompt)")
    return [list(c) for c in chunks[:-1]] + [_close(_open(spec) + body, spec)]
