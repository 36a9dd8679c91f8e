"""SAFREE (ICLR 2025) inside ComfyUI: the CLIP side (concept subspace, leave-one-out pooled outputs, the
filtered positive conditioning) and the MODEL side (latent re-attention as an APPLY_MODEL wrapper plus an
output-block patch). The math lives in ``implicit_negatives.safree``; the node schemas in ``nodes/safree_nodes.py``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import comfy.model_base
import comfy.patcher_extension
import torch

from ..prompt_tokens import chunk_content
from ..safree import (SVF_PRESETS, PromptChunk, filter_end_percent, filtered_step_count, latent_reattention,
                      projection_matrix, safree_filter, skip_scales_by_channels)
from .clip import chunk_spec, encoder_tokenizers, implicit_negative_tokens

CONCEPT_NEGATIVE_MODES = ("concept", "empty")
# What a connected implicit negative does to the keywords. replace: C* is the whole concept (subspace and CFG
# negative), as the paper runs SAFREE + C*; add: C* is one more direction next to the keywords.
IMPLICIT_NEGATIVE_USES = ("replace", "add")
MARK = "safree"  # conditioning option: {"original": Tensor, "filtered": bool}, read by the re-attention wrapper
MASK_TOKEN = 0  # SAFREE replaces a token by id 0 to encode the prompt without it


class SafreeConfigError(ValueError):
    """SAFREE cannot run with these inputs; the message says which and how to fix it."""


def parse_keywords(text: str) -> list[str]:
    """Keywords separated by commas or new lines, blanks dropped."""
    return [word.strip() for line in text.splitlines() for word in line.split(",") if word.strip()]


@dataclass(frozen=True)
class FilteredEncoder:
    """The text encoder SAFREE filters: its token key, tokenizer, its columns in the conditioning, and whether its
    subspaces are spanned by the projected pooled output (SDXL's CLIP-G: the official SDXL pipeline reads
    ``text_encoder_2``'s ``text_embeds``) or the unprojected one (SD1/SD2: ``CLIPTextModel.pooler_output``)."""

    key: str
    tokenizer: object
    columns: slice
    projected: bool


def filtered_encoder(clip) -> FilteredEncoder:
    """SD1.x/SD2.x: the one text encoder. SDXL: CLIP-G, whose columns follow CLIP-L's in ComfyUI's concatenated
    conditioning [clip_l 768 | clip_g 1280]; the official SAFREE SDXL pipeline filters ``[..., 768:]`` only."""
    if clip is None:
        raise SafreeConfigError("ERROR: clip input is invalid: None. If the clip is from a checkpoint loader node "
                                "your checkpoint does not contain a valid clip or text encoder model.")
    keys = sorted(clip.tokenize("").keys())
    if len(keys) == 1:
        key, tokenizer = next(iter(encoder_tokenizers(clip).items()))
        return FilteredEncoder(key, tokenizer, slice(None), projected=False)
    if keys != ["g", "l"]:
        missing = " (no clip_g)" if "g" not in keys else ""
        raise SafreeConfigError(
            f"SAFREE Conditioning supports CLIPs with one text encoder (SD1.x, SD2.x) and SDXL's clip_l + clip_g; "
            f"this one has {len(keys)} ({', '.join(keys)}){missing}. Use an SD1.x/SD2.x/SDXL checkpoint's CLIP, or "
            "SLD / a negative prompt for this model.")
    tokenizers = encoder_tokenizers(clip)
    width_l = tokenizers["l"].embedding_size
    return FilteredEncoder("g", tokenizers["g"], slice(width_l, width_l + tokenizers["g"].embedding_size),
                           projected=True)


def pooled_outputs(clip, key: str, rows: list, projected: bool = False) -> torch.Tensor:
    """(len(rows), D) pooled outputs (the end token's final hidden state; ``projected``: times the text projection)
    of token rows of encoder ``key``, in one batch.

    SAFREE's subspaces are spanned by diffusers' ``CLIPTextModel.pooler_output``, which is
    unprojected (SD1/SD2), and on SDXL by ``CLIPTextModelWithProjection.text_embeds`` of CLIP-G,
    which is projected; ``encode_from_tokens(..., return_pooled=...)`` gives the same but
    encodes one prompt per call, and SAFREE needs one prompt per prompt token. So this mirrors
    that method's set-up (clip options, model loading, device) and calls the encoder once on
    the whole batch. Token weights do not reach ComfyUI's pooled output, so they are dropped.
    """
    model = clip.cond_stage_model
    model.reset_clip_options()
    if clip.layer_idx is not None:
        model.set_clip_options({"layer": clip.layer_idx})
    model.set_clip_options({"projected_pooled": projected, "execution_device": clip.patcher.load_device})
    clip.load_model()
    try:
        output = getattr(model, f"clip_{key}").encode([[token for token, *_ in row] for row in rows])
    finally:
        model.reset_clip_options()
    pooled = output[1]
    if pooled is None:
        raise SafreeConfigError("This CLIP returns no pooled output, which SAFREE's concept subspace is built from.")
    return pooled.float().cpu()


def concept_keywords_used(keywords: list[str], implicit_negative, use: str) -> list[str]:
    """The keywords that span the concept: none when a connected implicit negative replaces them."""
    if use not in IMPLICIT_NEGATIVE_USES:
        raise SafreeConfigError(f"implicit_negative_use must be one of {', '.join(IMPLICIT_NEGATIVE_USES)}, "
                                f"got {use!r}")
    return [] if implicit_negative is not None and use == "replace" else keywords


def concept_rows(clip, key: str, keywords: list[str], implicit_negative) -> list:
    """Token rows whose pooled outputs are the columns of C: each keyword alone, and the implicit negative alone."""
    rows = [clip.tokenize(word)[key][0] for word in keywords]
    if implicit_negative is not None:
        rows.append(implicit_negative_tokens(clip, implicit_negative, "", "embedding_only")[key][0])
    if not rows:
        raise SafreeConfigError("SAFREE needs a concept: write keywords in concept_keywords, or connect an "
                                "implicit negative (LoadImplicitNegative), or both.")
    return rows


def masked_rows(chunks: list, spec) -> tuple[list, list[PromptChunk]]:
    """For every prompt token, its chunk with that token replaced by id 0; and where each chunk sits.

    Returns (rows, layout) where layout[c].masked_pooled is still empty: the caller encodes
    all rows in one batch and fills it in.
    """
    rows, layout, offset = [], [], 0
    start = 1 if spec.start_token is not None else 0
    end = 1 if spec.end_token is not None else 0
    for chunk in chunks:
        n = len(chunk_content(chunk, spec))
        for i in range(n):
            row = list(chunk)
            row[start + i] = (MASK_TOKEN, row[start + i][1])
            rows.append(row)
        layout.append(PromptChunk(token_rows=torch.arange(offset + start, offset + start + n),
                                  active_rows=torch.arange(offset, offset + start + n + end),
                                  masked_pooled=torch.zeros(0)))
        offset += len(chunk)
    return rows, layout


def concept_and_prompt_pooled(clip, key: str, keywords: list[str], implicit_negative, chunks: list, spec,
                              projected: bool = False):
    """(concept vectors (K, D), prompt chunks with their leave-one-out pooled outputs), from one encoder batch."""
    concept = concept_rows(clip, key, keywords, implicit_negative)
    masked, layout = masked_rows(chunks, spec)
    pooled = pooled_outputs(clip, key, concept + masked, projected)
    vectors, rest = pooled[:len(concept)], pooled[len(concept):]
    filled, index = [], 0
    for chunk in layout:
        n = chunk.token_rows.numel()
        filled.append(PromptChunk(token_rows=chunk.token_rows, active_rows=chunk.active_rows,
                                  masked_pooled=rest[index:index + n]))
        index += n
    return vectors, filled


def token_labels(tokenizer, chunks: list, spec) -> list[str]:
    """Readable token per conditioning row (for the report)."""
    vocab = getattr(tokenizer, "inv_vocab", {})
    labels = []
    for chunk in chunks:
        for token, _weight in chunk:
            labels.append(vocab.get(token, str(token)).replace("</w>", "") if isinstance(token, int) else "<embedding>")
    return labels


def encode_concept_negative(clip, keywords: list[str], implicit_negative, mode: str):
    """SAFREE's CFG negative prompt, ``", ".join(concept)`` as generate_safree.py builds it: the keywords, then
    the implicit negative's vectors when given (``"k1, k2, embedding:NAME"``)."""
    if mode == "empty":
        return clip.encode_from_tokens_scheduled(clip.tokenize(""))
    text = ", ".join(keywords)
    if implicit_negative is None:
        return clip.encode_from_tokens_scheduled(clip.tokenize(text))
    if not text:
        return clip.encode_from_tokens_scheduled(implicit_negative_tokens(clip, implicit_negative, "", "embedding_only"))
    return clip.encode_from_tokens_scheduled(implicit_negative_tokens(clip, implicit_negative, text + ",",
                                                                      "in_text_chunk"))


def safree_conditioning(clip, prompt: str, concept_keywords: str, alpha: float, self_validating_filter: bool,
                         up_t: int, svf_preset: str, schedule_steps: int, concept_negative: str,
                         implicit_negative=None, implicit_negative_use: str = "replace") -> tuple[list, list, str]:
    """(positive, negative, report) of SafreeConditioning: the filtered prompt for the self-validating filter's
    steps and the original afterwards; the concept (or empty) negative; a readable report.

    implicit_negative_use ("replace" / "add", see IMPLICIT_NEGATIVE_USES) matters only with an implicit
    negative: replace drops the keywords from the concept and from the negative. On SDXL only CLIP-G's columns
    are filtered (``filtered_encoder``) and the pooled output (ADM input) stays the original prompt's, as in the
    official SDXL pipeline."""
    if concept_negative not in CONCEPT_NEGATIVE_MODES:
        raise SafreeConfigError(f"concept_negative must be one of {', '.join(CONCEPT_NEGATIVE_MODES)}, "
                                f"got {concept_negative!r}")
    if svf_preset not in SVF_PRESETS:
        raise SafreeConfigError(f"svf_preset must be one of {', '.join(SVF_PRESETS)}, got {svf_preset!r}")
    encoder = filtered_encoder(clip)
    key, tokenizer, columns = encoder.key, encoder.tokenizer, encoder.columns
    written = parse_keywords(concept_keywords)
    keywords = concept_keywords_used(written, implicit_negative, implicit_negative_use)
    tokens = clip.tokenize(prompt)
    spec = chunk_spec(tokenizer)
    vectors, chunks = concept_and_prompt_pooled(clip, key, keywords, implicit_negative, tokens[key], spec,
                                                encoder.projected)
    concept_projection = projection_matrix(vectors)
    original = clip.encode_from_tokens_scheduled(tokens)
    total_rows = sum(len(chunk) for chunk in tokens[key])

    positive, report = [], []
    labels = token_labels(tokenizer, tokens[key], spec)
    for cond, options in original:
        if cond.shape[0] != 1 or cond.shape[1] != total_rows:
            raise SafreeConfigError(f"Unexpected conditioning shape {tuple(cond.shape)} for {total_rows} prompt "
                                    "tokens; SAFREE Conditioning needs one prompt of plain CLIP chunks.")
        result = safree_filter(cond[0][:, columns], chunks, concept_projection, alpha)
        flagged_rows = result.flagged.nonzero().flatten().tolist()
        if not flagged_rows:
            positive.append([cond, {**options, MARK: {"original": cond, "filtered": False}}])
            report.append(f"no token of {sum(c.token_rows.numel() for c in chunks)} flagged: prompt unchanged "
                          f"(beta {result.beta:.4f})")
            continue
        last_step = filtered_step_count(result.beta, up_t, SVF_PRESETS[svf_preset])
        end = filter_end_percent(last_step, schedule_steps) if self_validating_filter else 1.0
        filtered = cond.clone()
        filtered[0, :, columns] = result.filtered
        positive.append([filtered, {**options, "start_percent": 0.0, "end_percent": end,
                                    MARK: {"original": cond, "filtered": True}}])
        if end < 1.0:
            positive.append([cond, {**options, "start_percent": end, "end_percent": 1.0,
                                    MARK: {"original": cond, "filtered": False}}])
        names = ", ".join(f"{labels[r]}@{r}" for r in flagged_rows)
        steps = (f"steps 0..{last_step} of {schedule_steps} (end_percent {end:.4f})" if self_validating_filter
                 else "all steps (self-validating filter off)")
        report.append(f"flagged {len(flagged_rows)} of {sum(c.token_rows.numel() for c in chunks)} "
                      f"{'clip_g ' if key == 'g' else ''}tokens: {names}; beta {result.beta:.4f}; "
                      f"filtered prompt for {steps}")
    if implicit_negative is None:
        concept = f"concept: {len(keywords)} keyword(s)"
    elif implicit_negative_use == "replace":
        concept = f"concept: implicit negative '{implicit_negative.name}' alone (replace" + (
            f"; the {len(written)} keyword(s) are not used)" if written else ")")
    else:
        concept = f"concept: {len(keywords)} keyword(s) + implicit negative '{implicit_negative.name}' (add)"
    negative = encode_concept_negative(clip, keywords, implicit_negative, concept_negative)
    return positive, negative, "SAFREE " + "; ".join(report) + f"; {concept}"


def reattention_output_block_patch(scales: dict[int, float]):
    """An output_block_patch re-attending skip features of the rows paired in transformer_options["safree_lra"].

    scales: {backbone channels: s} (FreeU keys its stages on h's channels; so do we).
    """
    on_cpu = set()

    def patch(h, hsp, transformer_options):
        pairs = transformer_options.get("safree_lra")
        scale = scales.get(int(h.shape[1]))
        if pairs is None or scale is None:
            return h, hsp
        filtered_rows, original_rows = pairs["filtered"].to(hsp.device), pairs["original"].to(hsp.device)
        hsp = hsp.clone()
        if hsp.device in on_cpu:
            new = latent_reattention(hsp[filtered_rows].cpu(), hsp[original_rows].cpu(), scale).to(hsp.device)
        else:
            try:
                new = latent_reattention(hsp[filtered_rows], hsp[original_rows], scale)
            except RuntimeError:  # some backends lack torch.fft (as in ComfyUI's FreeU)
                logging.warning("Device %s does not support torch.fft; SAFREE re-attention runs it on the CPU.",
                                hsp.device)
                on_cpu.add(hsp.device)
                new = latent_reattention(hsp[filtered_rows].cpu(), hsp[original_rows].cpu(), scale).to(hsp.device)
        hsp[filtered_rows] = new
        return h, hsp

    return patch


def _matches(rows: torch.Tensor, reference: torch.Tensor) -> bool:
    """Whether conditioning rows (B, L, D) are ``reference`` (1, T, D), repeated to L tokens as ComfyUI batches it.

    Why by value: an APPLY_MODEL wrapper sees only the batched tensors. ComfyUI gives each conditioning entry
    its uuid when sampling starts (after this patch was built), so no identity of the filtered entry is known
    here; its tensor is. A false match needs another positive conditioning equal to the filtered prompt within
    1e-3, i.e. the same filtered prompt, which is re-attended correctly anyway. The uncond branch is never
    matched (``cond_or_uncond`` says which chunk is which).
    """
    length = rows.shape[1]
    if length % reference.shape[1] != 0:
        return False
    tiled = reference.to(device=rows.device, dtype=torch.float32).repeat(1, length // reference.shape[1], 1)
    return torch.allclose(rows.float(), tiled.expand_as(rows), rtol=1e-3, atol=1e-3)


def _with_extra_rows(value, rows: torch.Tensor, total: int):
    """Append value[rows] along the batch for every tensor with ``total`` rows (also inside dicts/lists)."""
    if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == total:
        return torch.cat([value, value[rows.to(value.device)]])
    if isinstance(value, dict):
        return {k: _with_extra_rows(v, rows, total) for k, v in value.items()}
    if isinstance(value, list):
        return [_with_extra_rows(v, rows, total) for v in value]
    return value


def reattention_wrapper(pairs: list[tuple[torch.Tensor, torch.Tensor]]):
    """An APPLY_MODEL wrapper that adds the original-prompt branch for every filtered-prompt chunk in the batch.

    pairs: [(filtered (1, T, D), original (1, T, D))] from SafreeConditioning. This is SAFREE's
    3-way batch (uncond, filtered, original): the extra rows' outputs are dropped, their skip
    features feed reattention_output_block_patch.
    """

    def wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        kinds = transformer_options.get("cond_or_uncond") or []
        if c_crossattn is None or not kinds or x.shape[0] % len(kinds) != 0:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        per_chunk = x.shape[0] // len(kinds)
        filtered_rows, originals = [], []
        for j, kind in enumerate(kinds):
            if kind != 0:  # only the positive branch carries the filtered prompt
                continue
            rows = slice(j * per_chunk, (j + 1) * per_chunk)
            for filtered, original in pairs:
                if _matches(c_crossattn[rows], filtered):
                    filtered_rows.extend(range(rows.start, rows.stop))
                    length = c_crossattn.shape[1] // original.shape[1]
                    originals.append(original.to(c_crossattn).repeat(per_chunk, length, 1))
                    break
        if not filtered_rows:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        total, extra = x.shape[0], len(filtered_rows)
        rows = torch.tensor(filtered_rows, dtype=torch.long)
        options = dict(transformer_options)
        options["cond_or_uncond"] = list(kinds) + [0] * (extra // per_chunk)
        if "uuids" in options:
            options["uuids"] = list(options["uuids"]) + [None] * (extra // per_chunk)
        options["safree_lra"] = {"filtered": rows, "original": torch.arange(total, total + extra)}
        out = executor(_with_extra_rows(x, rows, total), _with_extra_rows(t, rows, total),
                       _with_extra_rows(c_concat, rows, total), torch.cat([c_crossattn, *originals]),
                       _with_extra_rows(control, rows, total), options,
                       **{k: _with_extra_rows(v, rows, total) for k, v in kwargs.items()})
        return out[:total]

    return wrapper


def reattention_pairs(conditioning) -> list[tuple[torch.Tensor, torch.Tensor]]:
    marks = [(cond, options[MARK]) for cond, options in conditioning if MARK in options]
    if not marks:
        raise SafreeConfigError("safree_positive must be the 'positive' output of SAFREE Conditioning (it carries the "
                                "original prompt that re-attention compares against); this conditioning has none.")
    return [(cond, mark["original"]) for cond, mark in marks if mark["filtered"]]


def patch_latent_reattention(model, safree_positive, s1: float, s2: float):
    """A clone of ``model`` that re-attends the filtered prompt's skip features (or ``model`` itself when no
    token was flagged). Refused on SDXL: the official SAFREE SDXL pipeline has no latent re-attention."""
    if isinstance(model.model, comfy.model_base.SDXL):
        raise SafreeConfigError(
            "SAFREE Latent Re-Attention does not support SDXL: the official SAFREE SDXL pipeline has no latent "
            "re-attention to follow (it never runs the original-prompt branch, and its -lra hooks are the same no-ops "
            "as on SD1.x). Set "
            "enabled = false or remove this node; SAFREE Conditioning itself supports SDXL.")
    pairs = reattention_pairs(safree_positive)
    if not pairs:
        logging.info("SAFREE re-attention: no token was flagged, so the prompt is unfiltered; nothing to re-attend.")
        return model
    channels = model.model.model_config.unet_config.get("model_channels")
    if channels is None:
        raise SafreeConfigError("SAFREE re-attention patches UNet skip features; this model has no UNet "
                                "(model_channels missing).")
    patched = model.clone()
    patched.set_model_output_block_patch(reattention_output_block_patch(skip_scales_by_channels(channels, s1, s2)))
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "safree_latent_reattention",
                                 reattention_wrapper(pairs))
    return patched
