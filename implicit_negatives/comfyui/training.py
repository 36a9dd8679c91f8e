"""The one training entry of the TrainImplicitNegative node and ``python -m trainer``.

Both callers bring ComfyUI objects (MODEL, CLIP), VAE latents with a caption (or None) per image, and an
``InversionConfig``; this module sets up the frozen modules, the captions, the loss and the start vectors,
runs the core loop (``implicit_negatives.inversion.invert_concept``) and writes the embedding's metadata.
"The node equals the CLI" therefore holds by construction: they differ only in where the data comes from
and what they do between steps (a progress bar; checkpoints and previews).
"""

from __future__ import annotations

import datetime
import json
import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from .. import __version__
from ..leakage import training_data_metadata
from ..inversion import CAPTION_TEMPLATES, InversionConfig, InversionProgress, invert_concept, norm_warning
from ..loss_scale import LossScale
from . import inversion as ci
from .clip import clip_fingerprint
from .model_identity import model_fingerprint

LEARNING_RATE_RANGE = (1e-5, 1.0)  # Adam on token vectors (paper: 5e-3); the node's widget has the same bounds


def check_settings(steps: int, learning_rate: float) -> None:
    """Refuse settings that can only save a useless embedding: no step, or a non-finite or absurd learning rate."""
    if steps < 1:
        raise ci.TrainingSetupError(f"steps must be at least 1, got {steps}: with no step the saved 'implicit "
                                    "negative' would be the init word itself (the paper trains 3000 steps)")
    low, high = LEARNING_RATE_RANGE
    if not (math.isfinite(learning_rate) and low <= learning_rate <= high):
        raise ci.TrainingSetupError(f"learning rate {learning_rate} is outside {low:g}..{high:g}; "
                                    "the paper uses 0.005 (Adam)")


@dataclass
class TrainedEmbedding:
    """vectors: (N, D) float32 on the CPU (SDXL: CLIP-L's and CLIP-G's side by side, D = 768 + 1280); losses: one
    per step; embedding_key: "clip_l" / "clip_h" / "clip_l+clip_g"; file_vectors: what the file stores, {key: (N, D_i)};
    state: the resume state at the end; precision: "fp32" / "bf16" / "fp16", what it was trained in;
    loss_scale: the final loss scaling state (fp16), else None; warning: "" or why the vectors look broken
    (``norm_warning``)."""

    vectors: torch.Tensor
    losses: list[float]
    embedding_key: str
    state: dict = field(repr=False)
    precision: str
    loss_scale: Optional[LossScale]
    warning: str = ""
    file_vectors: dict = field(default_factory=dict)


def train_embedding(model, clip, latents: torch.Tensor, captions: Sequence[Optional[str]], config: InversionConfig,
                    init_word: str, templates: str, *, copy_weights: str = "auto", gradient_checkpointing: bool = False,
                    precision: str = "auto", on_step: Optional[Callable[[InversionProgress], None]] = None,
                    state: Optional[dict] = None) -> TrainedEmbedding:
    """Learn an implicit negative on ``latents`` (M, 4, h, w), as VAEEncode returns them.

    captions[i]: image i's own caption ("{}" marks the vectors), or None to caption it each step with one
    of the ``templates`` (a ``CAPTION_TEMPLATES`` name). copy_weights, gradient_checkpointing and
    precision go to ``training_modules``; on_step and state to ``invert_concept``, which trains an fp16
    run with dynamic loss scaling. Refuses the settings ``check_settings`` refuses; warns when the learned
    vectors' norms are far outside the token table's.
    """
    check_settings(config.steps, config.learning_rate)
    if len(captions) != latents.shape[0]:
        raise ci.TrainingSetupError(f"{len(captions)} captions for {latents.shape[0]} images")
    with ci.training_modules(model, clip, copy_weights=copy_weights, gradient_checkpointing=gradient_checkpointing,
                             precision=precision) as modules:
        template_texts = CAPTION_TEMPLATES[templates]
        texts = list(template_texts) + sorted({c for c in captions if c})
        prompts = [ci.tokenize_caption(modules.tokenizer, t, config.num_vectors) for t in texts]
        choices = [[texts.index(c)] if c else list(range(len(template_texts))) for c in captions]
        sampler = ci.latent_batch_sampler(ci.process_latents(modules, latents), modules.model_sampling, choices, config)
        init = ci.init_vectors_from_word(modules, init_word, config.num_vectors)
        result = invert_concept(ci.make_loss_fn(modules, prompts, sampler), init, config, on_step=on_step, state=state,
                                loss_scale=modules.loss_scale)
        file_vectors = ci.split_vectors(modules.parts, result.vectors.cpu())
        warning = " ".join(filter(None, (norm_warning(file_vectors[part.embedding_key],
                                                      part.encoder.transformer.get_input_embeddings().weight)
                                         for part in modules.parts)))
        return TrainedEmbedding(vectors=result.vectors.cpu(), losses=result.losses,
                                embedding_key=modules.embedding_key, state=result.state,
                                precision=modules.precision, loss_scale=result.loss_scale, warning=warning,
                                file_vectors=file_vectors)


def embedding_key(clip) -> str:
    """The key(s) this CLIP's vectors are saved under: "clip_l" (SD1.x), "clip_h" (SD2.x), "clip_l+clip_g" (SDXL)."""
    return "+".join(part.embedding_key for part in ci.text_encoders(clip))


@dataclass
class RunSources:
    """Where a run's model and data came from, as its caller knows them: file names and sha256 (the CLI),
    or "ComfyUI graph MODEL" (the node); ``trained_in`` names the caller."""

    base_model: str
    unlearned_model: str
    data: str
    trained_in: str
    base_model_hash: str = ""
    unlearned_model_hash: str = ""
    generation_prompts: Optional[list] = None  # the prompts that made the training images; None: unknown
    prompt_source: str = ""                    # where they are known from ("generated", "prompts file", ...)
    image_sha256s: tuple = ()                  # sha256 of each training image (file bytes or pixels)


def run_metadata(model, clip, sources: RunSources, config: InversionConfig, *, init_word: str, templates: str,
                 resolution: int, num_images: int, concept: str, precision: str) -> dict:
    """The metadata fixed for a run (models, data, hyper-parameters, the precision it trains in: "fp32",
    "bf16" or "fp16", as ``training_precision`` resolves it); ``embedding_metadata`` adds the progress."""
    return {
        "concept": concept,
        "base_model": sources.base_model, "base_model_hash": sources.base_model_hash,
        "unlearned_model": sources.unlearned_model, "unlearned_model_hash": sources.unlearned_model_hash,
        "trainer_version": __version__,
        "init_word": init_word,
        "text_encoder_fingerprint": clip_fingerprint(clip) or "",
        "model_fingerprint": model_fingerprint(model) or "",
        "precision": precision,
        **training_data_metadata(sources.generation_prompts, sources.prompt_source, sources.image_sha256s),
        "caption_templates": json.dumps(list(CAPTION_TEMPLATES[templates])),  # the contexts C* was learned in
        "training": json.dumps({
            "learning_rate": config.learning_rate, "batch_size": config.batch_size, "seed": config.seed,
            "resolution": resolution, "templates": templates, "data": sources.data, "images": num_images,
            "text_encoder": embedding_key(clip), "optimizer": "Adam", "trained_in": sources.trained_in,
        }, sort_keys=True),
    }


def embedding_metadata(run: dict, losses: Sequence[float], steps_done: int,
                       loss_scale: Optional[LossScale] = None, warning: str = "") -> dict:
    """``run_metadata`` plus the progress: steps done, mean loss of the last 100 steps, creation time (UTC),
    with loss scaling (fp16) the current loss scale and the steps skipped for an inf/NaN gradient, and
    ``warning`` (a ``TrainedEmbedding.warning``) when there is one."""
    tail = list(losses)[-100:]
    scaling = {} if loss_scale is None else {"loss_scale": f"{loss_scale.scale:g}",
                                             "skipped_steps": str(loss_scale.skipped_steps)}
    warned = {"warning": warning} if warning else {}
    return {**run, **scaling, **warned, "steps": str(steps_done),
            "loss": f"{sum(tail) / len(tail):.6g}" if tail else "",
            "created": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()}
