"""Bridge between a ComfyUI CLIP object and the core token-packing functions.

ComfyUI's CLIP tokenizes per encoder into ``{"l": chunks, "g": chunks, ...}``; the tokenizer
for key ``k`` lives at ``clip.tokenizer.clip_<k>`` and knows its width (``embedding_size``)
and which file key feeds it (``embedding_key``). We read both off the live object, so SD1,
SD2 and SDXL are served by the same code, and we refuse — loudly — any embedding whose
widths do not match, where ComfyUI itself only logs "embedding will be ignored".
"""

from __future__ import annotations

import logging

from ..embedding_io import ENCODER_WIDTHS, ImplicitNegative, caption_templates, describe_family
from ..fingerprint import text_encoder_fingerprint
from ..inversion import caption_parts
from ..prompt_tokens import ChunkSpec, append_vectors, chunk_content, extend_last_chunk, truncate_to_one_chunk

MODES = ("in_text_chunk", "appended_chunk", "embedding_only")
# The words around the vectors: none (the paper's use), or the first caption template the vectors were trained in.
CONTEXTS = ("bare", "training_template")
TEMPLATE_SLOT = "{}"  # where the vectors go in a caption template

_FAMILY_BY_WIDTHS = {(768,): "SD1.x", (1024,): "SD2.x", (768, 1280): "SDXL"}


class EmbeddingMismatchError(ValueError):
    """The implicit negative was trained for a different text encoder than this CLIP."""


class CaptionTemplateError(ValueError):
    """A caption template around the vectors cannot be used; the message says how to fix it."""


def encoder_tokenizers(clip) -> dict:
    """{token-dict key: SDTokenizer} for every encoder this CLIP tokenizes for."""
    keys = clip.tokenize("").keys()
    out = {}
    for key in keys:
        tokenizer = getattr(clip.tokenizer, f"clip_{key}", None)
        if tokenizer is None or not hasattr(tokenizer, "embedding_key"):
            raise EmbeddingMismatchError(
                f"This CLIP has a '{key}' text encoder that textual-inversion embeddings cannot feed; "
                "implicit negatives support SD1.x, SD2.x and SDXL CLIP models.")
        out[key] = tokenizer
    return out


def chunk_spec(tokenizer) -> ChunkSpec:
    return ChunkSpec(start_token=tokenizer.start_token, end_token=tokenizer.end_token,
                     pad_token=tokenizer.pad_token, max_length=tokenizer.max_length,
                     max_word_length=tokenizer.max_word_length,
                     pad_to_max_length=tokenizer.pad_to_max_length, min_length=tokenizer.min_length)


def check_fits(clip, negative: ImplicitNegative, tokenizers: dict | None = None) -> dict:
    """Return {token key: (N, D) vectors} for this CLIP, or raise a message naming both widths.

    ``tokenizers``: ``encoder_tokenizers(clip)`` when the caller already has it.
    """
    tokenizers = tokenizers if tokenizers is not None else encoder_tokenizers(clip)
    have = negative.embedding.widths()
    need = {tok.embedding_key: tok.embedding_size for tok in tokenizers.values()}
    clip_family = _FAMILY_BY_WIDTHS.get(tuple(sorted(need.values())), "this model")
    file_family = describe_family(negative.embedding.vectors)
    missing = [key for key, width in need.items() if have.get(key) != width]
    if missing:
        have_text = ", ".join(f"{k} {w}" for k, w in sorted(have.items()))
        need_text = ", ".join(f"{k} {w}" for k, w in sorted(need.items()))
        hint = (f"it looks like an {file_family} embedding used with an {clip_family} model"
                if file_family != clip_family else "its vectors do not match this text encoder")
        if clip_family == "SDXL" and "clip_l" in have and "clip_g" not in have:
            hint = ("the file has no clip_g vectors, which SDXL's second text encoder (1280 wide) needs; "
                    "train or convert an SDXL embedding")
        raise EmbeddingMismatchError(
            f"Implicit negative '{negative.name}' has widths [{have_text}] but this CLIP needs "
            f"[{need_text}]: {hint}. ComfyUI would silently ignore it (e.g. '768 != 1280'); "
            "this node refuses instead, so your negative never quietly does nothing.")
    return {key: negative.embedding.vectors[tok.embedding_key] for key, tok in tokenizers.items()}


def clip_fingerprint(clip) -> str | None:
    """Fingerprint of the first text encoder's token-embedding table (None if it cannot be reached)."""
    for key in clip.tokenize("").keys():
        encoder = getattr(clip.cond_stage_model, f"clip_{key}", None)
        transformer = getattr(encoder, "transformer", None)
        if transformer is not None and hasattr(transformer, "get_input_embeddings"):
            return text_encoder_fingerprint(transformer.get_input_embeddings().weight)
    return None


def transfer_warning(clip, negative: ImplicitNegative) -> str | None:
    """A sentence for the user when the embedding was learned through a different text encoder."""
    trained_with = negative.embedding.metadata.get("text_encoder_fingerprint")
    if not trained_with:
        return None
    current = clip_fingerprint(clip)
    if current is None or current == trained_with:
        return None
    model = negative.embedding.metadata.get("unlearned_model") or negative.embedding.metadata.get("base_model", "?")
    return (f"Implicit negative '{negative.name}' was learned through a different text encoder "
            f"(trained on {model}; fingerprint {trained_with}, this CLIP {current}). Implicit negatives "
            "transfer between unlearned checkpoints of one base model that share its text encoder; "
            "through another encoder (e.g. AdvUnlearn's) it may not carry the concept. Retrain for this model.")


def describe(negative: ImplicitNegative) -> str:
    """Human-readable summary of an implicit negative's metadata (for the node's info output)."""
    meta = negative.embedding.metadata
    lines = [f"{negative.name}: {negative.embedding.num_vectors} vector(s), {negative.embedding.family}, "
             f"strength {negative.strength:g}"]
    for key in ("concept", "unlearned_model", "base_model", "intended_use", "init_word", "steps", "loss",
                "trainer_version", "created"):
        if meta.get(key):
            lines.append(f"{key}: {meta[key]}")
    if not meta.get("format"):
        lines.append("(no implicit-negative metadata: a plain textual-inversion file)")
    return "\n".join(lines)


def context_template(negative: ImplicitNegative, context: str = "bare") -> str:
    """The caption template the vectors sit in: "{}" (bare), or the first template they were trained in
    ("a photo of a {}"). Raises ValueError, saying how to fix it, when the file records no template."""
    if context not in CONTEXTS:
        raise ValueError(f"Unknown context {context!r}; choose one of {', '.join(CONTEXTS)}")
    if context == "bare":
        return TEMPLATE_SLOT
    templates = caption_templates(negative.embedding.metadata)
    if not templates:
        raise ValueError(f"Implicit negative '{negative.name}' records no caption templates (a file from another "
                         "trainer, or trained on per-image captions only): use context = bare, or retrain it with "
                         "this pack's trainer, which records them.")
    return templates[0]


def template_tokens(clip, negative: ImplicitNegative, template: str = TEMPLATE_SLOT, text: str = "",
                    mode: str = "in_text_chunk") -> dict:
    """The token dict that ``clip.encode_from_tokens_scheduled`` turns into CONDITIONING: ``text``, then
    ``template`` with the vectors at its ``{}``, packed exactly as a stock CLIPTextEncode packs
    ``"text prefix embedding:NAME suffix"`` (a template without ``{}`` gets the vectors in front).

    in_text_chunk   the (templated) vectors follow the text inside its chunk;
    appended_chunk  the templated vectors get a 77-token chunk of their own after the text (ConditioningConcat);
    embedding_only  just the templated vectors (text must be empty).
    Widths are checked (EmbeddingMismatchError); the words after ``{}`` must fit in the vectors' last chunk
    (CaptionTemplateError otherwise).
    """
    if mode not in MODES:
        raise ValueError(f"Unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "embedding_only" and text.strip():
        raise ValueError("Mode 'embedding_only' uses no text, but text was given: clear it, or pick "
                         "'in_text_chunk' / 'appended_chunk' to combine text and embedding.")
    try:
        before, after = caption_parts(template)
    except ValueError as error:
        raise CaptionTemplateError(f"{error} (where the vectors go)") from None
    prefix = before.strip()
    tokenizers = encoder_tokenizers(clip)
    vectors = check_fits(clip, negative, tokenizers)
    warning = transfer_warning(clip, negative)
    if warning:
        logging.warning(warning)
    own_chunk = mode == "appended_chunk" and text.strip() != ""
    if own_chunk:  # the text's chunks, then the (templated) vectors in chunks of their own
        head, phrase = clip.tokenize(text), clip.tokenize(prefix)
    else:
        head, phrase = None, clip.tokenize(f"{text} {prefix}" if prefix and text.strip() else text + prefix)
    out = {}
    for key, chunks in phrase.items():
        spec = chunk_spec(tokenizers[key])
        packed = append_vectors(chunks, vectors[key], negative.strength, spec)
        if after.strip():  # the template's words after the vectors continue their chunk
            tail = [t for chunk in clip.tokenize(after)[key] for t in chunk_content(chunk, spec)]
            try:
                packed = extend_last_chunk(packed, tail, spec)
            except ValueError as error:
                raise CaptionTemplateError(f"template {template!r}: the vectors and the text after them must share "
                                           f"one chunk: {error}; shorten the text after {{}}") from None
        out[key] = (head[key] + packed) if head is not None else packed
    return out


def implicit_negative_tokens(clip, negative: ImplicitNegative, text: str = "", mode: str = "in_text_chunk",
                             context: str = "bare") -> dict:
    """``template_tokens`` in the template ``context`` names (see ``context_template``): ``"text embedding:NAME"``
    for bare, ``"text a photo of a embedding:NAME"`` for training_template."""
    return template_tokens(clip, negative, context_template(negative, context), text, mode)


def encode_implicit_negative(clip, negative: ImplicitNegative, text: str = "", mode: str = "in_text_chunk",
                             context: str = "bare"):
    """CONDITIONING for the negative input of a KSampler (or the safety concept of SLD)."""
    return clip.encode_from_tokens_scheduled(implicit_negative_tokens(clip, negative, text, mode, context))


__all__ = ["MODES", "CONTEXTS", "ENCODER_WIDTHS", "EmbeddingMismatchError", "CaptionTemplateError", "check_fits",
           "template_tokens", "implicit_negative_tokens", "encode_implicit_negative"]


class OneChunkTokenizer:
    """A CLIP tokenizer whose prompts are cut to one 77-token chunk per encoder (``truncate_to_one_chunk``),
    as diffusers pipelines tokenize; everything else is the wrapped tokenizer's."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def tokenize_with_weights(self, text, return_word_ids=False, **kwargs):
        tokens = self.tokenizer.tokenize_with_weights(text, return_word_ids, **kwargs)
        return {key: truncate_to_one_chunk(chunks, chunk_spec(getattr(self.tokenizer, f"clip_{key}")))
                for key, chunks in tokens.items()}

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def truncating_clip(clip):
    """A clone of ``clip`` that truncates every prompt to one chunk (the input CLIP is unchanged)."""
    encoder_tokenizers(clip)  # only CLIP-family encoders have 77-token chunks: fail with the reason otherwise
    clone = clip.clone()
    if not isinstance(clone.tokenizer, OneChunkTokenizer):
        clone.tokenizer = OneChunkTokenizer(clone.tokenizer)
    return clone
