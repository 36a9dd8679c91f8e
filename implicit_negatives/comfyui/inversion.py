"""ComfyUI adapter for the concept-inversion loop: a ``loss_fn(vectors, step)`` over a MODEL + CLIP.

The core loop (``implicit_negatives.inversion``) only sees vectors and a loss. This module turns
ComfyUI objects into that loss, avoiding the engine's training traps (comfyui.md §5):

* CLIP layers add residuals in place (``x += attn(x)``), which breaks backward: each CLIPLayer's
  ``forward`` is rebound to an out-of-place version for the duration of training (try/finally).
* The executor runs nodes under ``torch.inference_mode()``; weights loaded there are inference
  tensors that autograd cannot save. Training runs under ``inference_mode(False)``, and when the
  loaded weights are inference tensors we train on a private deep copy of the modules made outside
  inference mode, so the shared MODEL / CLIP are never touched.
* ComfyUI's ``apply_model`` returns x0 for every parameterisation, so the loss starts from
  eps = (x_t - x0) / sigma. On a v-prediction model (SD2.x 768-v) it is the loss on the network's own
  target, ||v_theta - v||^2 as diffusers' textual-inversion script trains it: ComfyUI's v-parameterisation
  makes the v error the eps error times sqrt(sigma^2 + sigma_data^2) / sigma_data (``target_scale``).
* VAEEncode latents are unscaled: ``process_latent_in`` applies the model's latent scaling.
* ``throw_exception_if_processing_interrupted`` runs every step, so ComfyUI's Cancel stops training.
* Precision: ComfyUI keeps an SD1.x UNet in fp16 on most GPUs and its text encoders in fp16 weights.
  The trainer computes UNet and text encoder in one chosen dtype (``training_precision``), casting the
  weights on private copies when they are stored in another one; an fp16 backward is loss-scaled.
"""

from __future__ import annotations

import contextlib
import copy
import types
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

import comfy.model_base
import comfy.model_management
import comfy.model_sampling
from comfy.k_diffusion.utils import tf32_mode

from ..cfg import eps_from_denoised
from ..inversion import InversionConfig, caption_parts, denoising_loss, sample_timesteps, step_generator
from ..loss_scale import LossScale


class TrainingSetupError(ValueError):
    """The model or data cannot be trained on as given; the message says what to change."""


# --------------------------------------------------------------------------- the frozen modules


@dataclass(frozen=True)
class EncoderPart:
    """One text encoder the learned vectors feed: token key ("l" / "h" / "g"), its SDClipModel and SDTokenizer."""

    token_key: str
    encoder: torch.nn.Module
    tokenizer: object

    @property
    def embedding_key(self) -> str:
        return self.tokenizer.embedding_key

    @property
    def width(self) -> int:
        return int(self.tokenizer.embedding_size)


@dataclass
class TrainingModules:
    """What the loss needs, ready for backward.

    base_model: ComfyUI BaseModel (``model.model`` or a private copy); parts: the text encoders the vectors
    feed (``text_encoders``: CLIP-L for SD1.x, OpenCLIP-H for SD2.x, CLIP-L then CLIP-G for SDXL; the
    trained vectors are their widths side by side, (N, 768 + 1280) on SDXL); precision: "fp32" / "bf16" /
    "fp16", the compute dtype of all; autocast_dtype: the autocast dtype of the forward passes (None for
    fp32); copied: whether private copies are used. ``encoder``, ``tokenizer`` and ``token_key`` are the
    first part's; ``embedding_key`` joins the parts' file keys ("clip_l", "clip_h", "clip_l+clip_g").
    """

    base_model: torch.nn.Module
    parts: tuple
    device: torch.device
    autocast_dtype: Optional[torch.dtype]
    copied: bool
    precision: str

    @property
    def model_sampling(self):
        return self.base_model.model_sampling

    @property
    def encoder(self) -> torch.nn.Module:
        return self.parts[0].encoder

    @property
    def tokenizer(self):
        return self.parts[0].tokenizer

    @property
    def token_key(self) -> str:
        return self.parts[0].token_key

    @property
    def embedding_key(self) -> str:
        return "+".join(part.embedding_key for part in self.parts)

    @property
    def width(self) -> int:
        return sum(part.width for part in self.parts)

    @property
    def loss_scale(self) -> Optional[LossScale]:
        """The initial loss scaling for ``invert_concept``: GradScaler's defaults in fp16, else None."""
        return LossScale() if self.precision == "fp16" else None


def text_encoders(clip) -> tuple:
    """The ``EncoderPart``s of a CLIP the trainer can learn vectors for: one (SD1.x CLIP-L, SD2.x OpenCLIP-H), or
    CLIP-L then CLIP-G (SDXL: the order ComfyUI's SDXLClipModel concatenates their outputs in)."""
    if clip is None:
        raise TrainingSetupError("No CLIP given: the checkpoint has no text encoder; load one with CLIPLoader.")
    keys = list(clip.tokenize("").keys())
    if sorted(keys) == ["g", "l"]:
        keys = ["l", "g"]
    elif len(keys) != 1:
        raise TrainingSetupError(
            f"This CLIP has {len(keys)} text encoders ({', '.join(keys)}); the trainer supports SD1.x (CLIP-L), "
            "SD2.x (OpenCLIP-H) and SDXL (CLIP-L + CLIP-G).")
    parts = []
    for key in keys:
        encoder = getattr(clip.cond_stage_model, f"clip_{key}", None)
        tokenizer = getattr(clip.tokenizer, f"clip_{key}", None)
        if encoder is None or tokenizer is None or not hasattr(tokenizer, "embedding_key"):
            raise TrainingSetupError(f"The '{key}' text encoder of this CLIP does not accept textual-inversion vectors.")
        parts.append(EncoderPart(token_key=key, encoder=encoder, tokenizer=tokenizer))
    return tuple(parts)


def single_text_encoder(clip):
    """(token key, SDClipModel, SDTokenizer) of a CLIP with exactly one text encoder (SD1.x, SD2.x)."""
    parts = text_encoders(clip)
    if len(parts) != 1:
        raise TrainingSetupError(
            f"This CLIP has {len(parts)} text encoders ({', '.join(p.token_key for p in parts)}); this step supports "
            "single-encoder models (SD1.x CLIP-L, SD2.x OpenCLIP-H).")
    return parts[0].token_key, parts[0].encoder, parts[0].tokenizer


def split_vectors(parts: Sequence[EncoderPart], vectors: torch.Tensor) -> dict:
    """{file key: (N, D_i)} of trained vectors (N, sum D_i): what the embedding file stores (SDXL: clip_l, clip_g)."""
    if vectors.shape[-1] != sum(part.width for part in parts):
        raise TrainingSetupError(f"vectors of width {vectors.shape[-1]} do not fit text encoders of widths "
                                 f"{', '.join(str(part.width) for part in parts)}")
    chunks = vectors.split([part.width for part in parts], dim=-1)
    return {part.embedding_key: chunk for part, chunk in zip(parts, chunks)}


OUTPUT_CHECK_PROMPT = "a photo of a person"


def check_text_encoder_output(clip, source: str = "this CLIP") -> None:
    """Refuse a text encoder whose conditioning for a fixed prompt is not finite, or is one vector at every
    token position (zeroed or uninitialised weights carry no prompt). Raises TrainingSetupError."""
    with torch.no_grad():
        cond = clip.encode_from_tokens(clip.tokenize(OUTPUT_CHECK_PROMPT)).float()  # (1, 77, D)
    broken = int((~torch.isfinite(cond)).sum())
    if broken:
        raise TrainingSetupError(
            f"{source}: its conditioning for {OUTPUT_CHECK_PROMPT!r} has {broken} NaN/Inf values of {cond.numel()}: "
            "the text encoder's weights are broken or were never loaded; load a complete text encoder")
    spread = (cond - cond.mean(dim=1, keepdim=True)).abs().max()
    if spread <= 1e-5 * cond.abs().max():
        raise TrainingSetupError(
            f"{source}: its conditioning for {OUTPUT_CHECK_PROMPT!r} is the same vector at every token position "
            "(zeroed or uninitialised weights): it cannot carry a prompt; load a complete text encoder")


def _has_inference_tensors(module: torch.nn.Module) -> bool:
    return any(t.is_inference() for t in list(module.parameters()) + list(module.buffers()))


def _holds_other_dtype(module: torch.nn.Module, dtype: torch.dtype) -> bool:
    """Whether any floating-point parameter or buffer of ``module`` is not ``dtype``."""
    return any(t.is_floating_point() and t.dtype != dtype for t in list(module.parameters()) + list(module.buffers()))


def trainable_copy(module: torch.nn.Module, memo: Optional[dict] = None,
                   dtype: Optional[torch.dtype] = None) -> torch.nn.Module:
    """A copy of ``module`` whose parameters and buffers are fresh (non-inference) clones.

    Call outside inference mode. Each submodule becomes a new object sharing the original's plain
    attributes (configs, settings) but none of its tensors or hook tables; submodules registered
    twice stay shared in the copy. ``copy.deepcopy`` is not used: some ComfyUI objects refuse it.
    dtype: cast the floating-point tensors to it while copying (None: keep theirs).
    """
    memo = {} if memo is None else memo
    if id(module) in memo:
        return memo[id(module)]
    new = object.__new__(type(module))
    # Hook and state dicts are copied too, so a hook added to the copy never reaches the original.
    new.__dict__ = {k: (copy.copy(v) if isinstance(v, dict) else v) for k, v in module.__dict__.items()}
    memo[id(module)] = new

    def fresh(tensor):
        cast = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
        return tensor.detach().to(dtype=cast, copy=True)
    new._parameters = {name: (None if p is None else torch.nn.Parameter(fresh(p), requires_grad=False))
                       for name, p in module._parameters.items()}
    new._buffers = {name: (None if b is None else fresh(b)) for name, b in module._buffers.items()}
    new._modules = {name: (None if m is None else trainable_copy(m, memo, dtype))
                    for name, m in module._modules.items()}
    return new


def unet_copy(base_model, dtype: torch.dtype):
    """A private copy of a ComfyUI BaseModel whose UNet weights and compute dtype are ``dtype``; the
    noise schedule (``model_sampling``'s float32 sigma tables) is copied as it is."""
    unet = trainable_copy(base_model.diffusion_model, dtype=dtype)
    new = trainable_copy(base_model, memo={id(base_model.diffusion_model): unet})
    unet.dtype = dtype            # UNetModel.dtype is what BaseModel.get_dtype() reports
    new.manual_cast_dtype = None  # the weights already are in the compute dtype: apply_model casts inputs to it
    return new


def unet_compute_dtype(base_model) -> torch.dtype:
    """The dtype ComfyUI's ``apply_model`` runs the UNet in: the manual-cast dtype, else the weights'."""
    return base_model.manual_cast_dtype or base_model.get_dtype()


PRECISIONS = ("auto", "fp32", "bf16", "fp16")
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def training_precision(precision: str, device: torch.device) -> str:
    """The compute precision to train in on ``device``: "fp32", "bf16" or "fp16".

    "auto": bf16 where ComfyUI runs bf16 natively (``should_use_bf16``: CUDA compute capability 8+,
    recent XPU and MPS): float32's range, so no loss scaling; else fp16 where ComfyUI runs fp16 (older
    CUDA GPUs), trained with dynamic loss scaling; else fp32: always on a CPU, where ComfyUI computes
    the UNet in float32 too and half-precision kernels are slower (README, "Precision").
    """
    if precision not in PRECISIONS:
        raise TrainingSetupError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision != "auto":
        return precision
    if comfy.model_management.should_use_bf16(device):
        return "bf16"
    return "fp16" if comfy.model_management.should_use_fp16(device) else "fp32"


def _out_of_place_clip_layer_forward(self, x, mask=None, optimized_attention=None):
    """ComfyUI's CLIPLayer.forward with ``x = x + ...`` instead of ``x += ...`` (autograd-safe)."""
    x = x + self.self_attn(self.layer_norm1(x), mask, optimized_attention)
    x = x + self.mlp(self.layer_norm2(x))
    return x


def _checkpointed(forward):
    def run(*args, **kwargs):
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return run


CONTAINERS = (torch.nn.ModuleList, torch.nn.Sequential, torch.nn.ModuleDict)


def checkpoint_units(diffusion_model) -> list[torch.nn.Module]:
    """The highest non-container modules inside the UNet's input, middle and output blocks (ResBlocks,
    SpatialTransformers, ...). ComfyUI's UNet iterates its TimestepEmbedSequential blocks itself
    instead of calling their ``forward``, so checkpointing must wrap these units (as TrainLoraNode does)."""
    def units(module):
        found = []
        for child in module.children():
            found.extend(units(child) if isinstance(child, CONTAINERS) else [child])
        return found
    parts = [getattr(diffusion_model, name, None) for name in ("input_blocks", "middle_block", "output_blocks")]
    return [unit for part in parts if part is not None
            for unit in (units(part) if isinstance(part, CONTAINERS) else [part])]


@contextlib.contextmanager
def training_modules(model, clip, copy_weights: str = "auto", gradient_checkpointing: bool = False,
                     precision: str = "auto"):
    """Load MODEL and CLIP for training and yield ``TrainingModules``; restore everything on exit.

    The CLIP must first encode a fixed prompt to finite, position-dependent conditioning
    (``check_text_encoder_output``): a text encoder from any loader is checked before any step.

    copy_weights: "auto" (copy when the loaded weights are inference tensors, i.e. inside ComfyUI's
    executor), "always" or "never"; whatever it says, a module whose weights are not in the training
    dtype is trained on a copy cast to it. Weight patches (LoRAs, partial UNet weights) are applied by
    ComfyUI's loader before the copy, so the copy trains against the patched model.
    precision: "auto", "fp32", "bf16" or "fp16" (``training_precision``), the compute dtype of UNet and
    text encoder: bf16 / fp16 run the forward passes under autocast in it (fp16 is meant to be
    trained with ``modules.loss_scale``); fp32 turns TF32 off, so it is float32 throughout.
    The caller's objects end unchanged: rebound forwards and requires_grad flags are restored.
    """
    if copy_weights not in ("auto", "always", "never"):
        raise ValueError(f"copy_weights must be auto, always or never, not {copy_weights!r}")
    parts = text_encoders(clip)
    check_text_encoder_output(clip)
    restore: list[Callable[[], None]] = []
    with torch.inference_mode(False), torch.enable_grad():
        comfy.model_management.load_models_gpu([model, clip.patcher], force_full_load=True)
        base_model = model.model
        device = next(base_model.parameters()).device
        precision = training_precision(precision, device)
        dtype = PRECISION_DTYPES[precision]
        inference_copy = copy_weights == "always" or (
            copy_weights == "auto" and (_has_inference_tensors(base_model)
                                        or any(_has_inference_tensors(part.encoder) for part in parts)))
        copy_unet = (inference_copy or unet_compute_dtype(base_model) != dtype
                     or _holds_other_dtype(base_model.diffusion_model, dtype))
        copy_encoders = [inference_copy or _holds_other_dtype(part.encoder, dtype) for part in parts]
        needs_copy = copy_unet or any(copy_encoders)
        if copy_unet:
            base_model = unet_copy(base_model, dtype)
        parts = tuple(EncoderPart(part.token_key, trainable_copy(part.encoder, dtype=dtype), part.tokenizer)
                      if copy else part for part, copy in zip(parts, copy_encoders))
        encoders = [part.encoder for part in parts]
        if needs_copy and any(_has_inference_tensors(module) for module in [base_model, *encoders]):
            raise TrainingSetupError("Could not make trainable copies of the model weights (still inference tensors).")
        try:
            for module in (base_model, *encoders):
                flags = [(p, p.requires_grad) for p in module.parameters()]
                restore.append(lambda flags=flags: [p.requires_grad_(f) for p, f in flags])
                module.requires_grad_(False)
            for layer in (layer for encoder in encoders for layer in encoder.modules()):
                if type(layer).__name__ == "CLIPLayer":
                    layer.forward = types.MethodType(_out_of_place_clip_layer_forward, layer)
                    restore.append(lambda layer=layer: layer.__dict__.pop("forward", None))
            if gradient_checkpointing:
                for unit in checkpoint_units(base_model.diffusion_model):
                    unit.forward = _checkpointed(unit.forward)
                    restore.append(lambda unit=unit: unit.__dict__.pop("forward", None))
            for encoder in encoders:
                encoder.reset_clip_options()
                restore.append(encoder.reset_clip_options)
                if clip.layer_idx is not None:  # CLIPSetLastLayer (clip skip), as CLIP.encode_from_tokens applies it
                    encoder.set_clip_options({"layer": clip.layer_idx})
            with tf32_mode(cudnn=False, matmul=False) if dtype == torch.float32 else contextlib.nullcontext():
                yield TrainingModules(base_model=base_model, parts=parts, device=device,
                                      autocast_dtype=None if dtype == torch.float32 else dtype, copied=needs_copy,
                                      precision=precision)
        finally:
            for undo in reversed(restore):
                undo()
            if needs_copy:
                del base_model, encoders, parts
                comfy.model_management.soft_empty_cache()


# --------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class PromptTokens:
    """A caption around the learned vectors, as token ids without start/end tokens."""

    prefix: tuple[int, ...]
    suffix: tuple[int, ...]
    text: str


def tokenize_caption(tokenizer, caption: str, num_vectors: int) -> PromptTokens:
    """Token ids around the placeholder of ``caption``; a long suffix is cut to fit one 77-token chunk."""
    before, after = caption_parts(caption)
    ids = lambda text: tuple(tokenizer.tokenizer(text)["input_ids"][1:-1]) if text.strip() else ()
    prefix, suffix = ids(before), ids(after)
    room = tokenizer.max_length - 2 - num_vectors
    if len(prefix) > room:
        raise TrainingSetupError(f"Caption {caption!r} leaves no room for {num_vectors} vectors in 77 tokens")
    return PromptTokens(prefix=prefix, suffix=suffix[: room - len(prefix)], text=caption)


def prompt_row(prompt: PromptTokens, vectors: torch.Tensor, tokenizer) -> list:
    """One 77-long token row for ComfyUI's SDClipModel: ints, with the (N, D) vectors as one item.

    Laid out as ComfyUI's tokenizer lays out ``"prefix embedding:NAME suffix"``: start, prefix,
    vectors, suffix, end, then padding up to ``max_length`` (vectors count N positions).
    """
    row = [tokenizer.start_token, *prompt.prefix, vectors, *prompt.suffix, tokenizer.end_token]
    used = len(row) - 1 + vectors.shape[0]
    return row + [tokenizer.pad_token] * (tokenizer.max_length - used)


def encode_vectors_pooled(modules: TrainingModules, prompts: Sequence[PromptTokens],
                          vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable text conditioning (B, 77, D) and pooled output for one prompt per batch item.

    Each text encoder reads its own slice of the vectors; SDXL's conditioning is CLIP-L's and CLIP-G's penultimate
    states side by side and its pooled output CLIP-G's projected one, as ComfyUI's SDXLClipModel encodes them."""
    contexts, pooled = [], None
    for part, chunk in zip(modules.parts, split_vectors(modules.parts, vectors).values()):
        context, pooled = part.encoder([prompt_row(p, chunk, part.tokenizer) for p in prompts])
        contexts.append(context)
    return torch.cat(contexts, dim=-1), pooled


def encode_vectors(modules: TrainingModules, prompts: Sequence[PromptTokens], vectors: torch.Tensor) -> torch.Tensor:
    """Differentiable text conditioning (B, 77, D) for one prompt per batch item, float32."""
    return encode_vectors_pooled(modules, prompts, vectors)[0]


def model_conds(modules: TrainingModules, prompts: Sequence[PromptTokens], vectors: torch.Tensor,
                x: torch.Tensor) -> dict:
    """The conditioning keyword arguments of ``apply_model`` for latents ``x``: ``c_crossattn``, and on SDXL the ADM
    vector ``y`` from the pooled output and the size conditioning ComfyUI gives a CLIPTextEncode prompt at sampling
    time (original and target size = the latent size x 8, crop 0)."""
    context, pooled = encode_vectors_pooled(modules, prompts, vectors)
    if not modules.base_model.adm_channels:
        return {"c_crossattn": context}
    if not isinstance(modules.base_model, comfy.model_base.SDXL):
        raise TrainingSetupError(
            f"This model ({type(modules.base_model).__name__}) needs extra conditioning (ADM) that the trainer does not "
            "build; it supports SD1.x, SD2.x and SDXL base models (not unCLIP or the SDXL refiner).")
    height, width = x.shape[-2] * 8, x.shape[-1] * 8
    y = modules.base_model.encode_adm(pooled_output=pooled, width=width, height=height)
    return {"c_crossattn": context, "y": y.to(context.device)}


def init_vectors_from_word(modules: TrainingModules, word: str, num_vectors: int) -> torch.Tensor:
    """(N, D) float32 start vectors: the word's token embeddings, cycled to N (averaged when N = 1); on SDXL
    each text encoder's own embeddings of the word, side by side."""
    ids = list(modules.tokenizer.tokenizer(word)["input_ids"][1:-1]) if word.strip() else []
    if not ids:
        raise TrainingSetupError(f"Initialiser word {word!r} has no tokens; give a word such as 'person'")
    starts = []
    for part in modules.parts:
        table = part.encoder.transformer.get_input_embeddings().weight
        rows = table[torch.tensor(ids, device=table.device)].detach().float().cpu()
        starts.append(rows.mean(dim=0, keepdim=True) if num_vectors == 1
                      else rows[torch.arange(num_vectors) % len(ids)].clone())
    return torch.cat(starts, dim=-1)


# --------------------------------------------------------------------------- data and loss


@dataclass
class TrainingBatch:
    """One step's data. x0: (B, C, h, w) model-space latents; noise: same shape; sigma: (B,);
    prompts: B indices into the prompt list."""

    x0: torch.Tensor
    noise: torch.Tensor
    sigma: torch.Tensor
    prompts: list[int]


def process_latents(modules: TrainingModules, latents: torch.Tensor) -> torch.Tensor:
    """VAE latents (M, C, h, w) as VAEEncode returns them -> model-space latents on the CPU, float32."""
    with torch.inference_mode(False), torch.no_grad():
        return modules.base_model.process_latent_in(latents.clone().float()).float().cpu()


def latent_batch_sampler(latents: torch.Tensor, model_sampling, prompt_choices: Sequence[Sequence[int]],
                         config: InversionConfig) -> Callable[[int], TrainingBatch]:
    """Draw step ``step``'s batch from cached model-space latents (M, C, h, w).

    prompt_choices[i]: the prompt indices image i may be captioned with (its own caption, or the
    templates). Everything random comes from ``step_generator(config.seed, step)`` on the CPU, so
    the CLI and the node, CPU and GPU, fresh and resumed runs see the same draws.
    """
    if latents.dim() != 4 or latents.shape[0] == 0:
        raise TrainingSetupError(f"Need a non-empty (M, C, h, w) latent batch, got {tuple(latents.shape)}")
    if len(prompt_choices) != latents.shape[0]:
        raise TrainingSetupError(f"{len(prompt_choices)} caption lists for {latents.shape[0]} images")

    def sample(step: int) -> TrainingBatch:
        generator = step_generator(config.seed, step)
        index = torch.randint(0, latents.shape[0], (config.batch_size,), generator=generator)
        prompts = [int(prompt_choices[i][int(torch.randint(0, len(prompt_choices[i]), (1,), generator=generator))])
                   for i in index.tolist()]
        t = sample_timesteps(config.batch_size, generator, config.timestep_min, config.timestep_max)
        x0 = latents[index]
        noise = torch.randn(x0.shape, generator=generator)
        sigma = model_sampling.sigma(t.float().to(model_sampling.sigmas.device)).float().cpu()
        return TrainingBatch(x0=x0, noise=noise, sigma=sigma, prompts=prompts)
    return sample


def target_scale(model_sampling, sigma: torch.Tensor) -> Optional[torch.Tensor]:
    """(B, 1, 1, 1) factor turning the eps error into the error of the network's own output, or None (eps models).

    V_PREDICTION (and EDM) give x0 = c_skip x - c_out v with c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2),
    so with x_t = x0 + sigma eps fixed, v_theta - v = (eps_theta - eps) sqrt(sigma^2 + sigma_data^2) / sigma_data."""
    if not isinstance(model_sampling, comfy.model_sampling.V_PREDICTION):
        return None
    sigma_data = float(model_sampling.sigma_data)
    return ((sigma.float() ** 2 + sigma_data ** 2).sqrt() / sigma_data).view(-1, 1, 1, 1)


def denoising_loss_on_batch(modules: TrainingModules, prompts: Sequence[PromptTokens], vectors: torch.Tensor,
                            batch: TrainingBatch) -> torch.Tensor:
    """|| eps - eps_theta(x_t, c(vectors), t) ||^2 for one batch, differentiable in ``vectors``; on a
    v-prediction model || v - v_theta ||^2 (``target_scale``)."""
    device = modules.device
    x0, noise, sigma = batch.x0.to(device), batch.noise.to(device), batch.sigma.to(device)
    x_t = modules.model_sampling.noise_scaling(sigma, noise, x0)
    with torch.autocast(device.type, dtype=modules.autocast_dtype, enabled=modules.autocast_dtype is not None):
        conds = model_conds(modules, [prompts[i] for i in batch.prompts], vectors.to(device), x_t)
        denoised = modules.base_model.apply_model(x_t, sigma, **conds, transformer_options={})
    eps_pred = eps_from_denoised(x_t, denoised.float(), sigma)
    scale = target_scale(modules.model_sampling, sigma)
    if scale is None:
        return denoising_loss(eps_pred, noise)
    return denoising_loss(eps_pred * scale, noise.float() * scale)


def make_loss_fn(modules: TrainingModules, prompts: Sequence[PromptTokens],
                 sample_batch: Callable[[int], TrainingBatch]) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """The ``loss_fn(vectors, step)`` for ``invert_concept``; checks ComfyUI's interrupt flag first."""

    def loss_fn(vectors: torch.Tensor, step: int) -> torch.Tensor:
        comfy.model_management.throw_exception_if_processing_interrupted()
        return denoising_loss_on_batch(modules, prompts, vectors, sample_batch(step))
    return loss_fn


def evaluate_loss(modules: TrainingModules, prompts: Sequence[PromptTokens], vectors: torch.Tensor,
                  batches: Sequence[TrainingBatch]) -> float:
    """Mean denoising loss of fixed vectors over fixed batches (held-out evaluation), no gradients."""
    with torch.no_grad():
        return float(sum(float(denoising_loss_on_batch(modules, prompts, vectors, b)) for b in batches) / len(batches))


def encode_images(vae, images: torch.Tensor, chunk: int = 4) -> torch.Tensor:
    """VAE latents (M, C, h, w) of IMAGE pixels (M, H, W, 3) in [0, 1], encoded in chunks, on the CPU."""
    if images.dim() != 4 or images.shape[-1] < 3:
        raise TrainingSetupError(f"Images must be (M, H, W, 3) in [0, 1], got {tuple(images.shape)}")
    with torch.inference_mode(False), torch.no_grad():
        parts = [vae.encode(images[i:i + chunk, :, :, :3]).float().cpu().clone() for i in range(0, images.shape[0], chunk)]
    return torch.cat(parts)


def fit_images(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """IMAGE (M, H, W, C) resized so the short side is ``resolution``, then center-cropped square."""
    if resolution % 8:
        raise TrainingSetupError(f"resolution must be a multiple of 8, got {resolution}")
    m, h, w, c = images.shape
    if (h, w) == (resolution, resolution):
        return images
    scale = resolution / min(h, w)
    nh, nw = max(resolution, round(h * scale)), max(resolution, round(w * scale))
    pixels = torch.nn.functional.interpolate(images.movedim(-1, 1).float(), size=(nh, nw), mode="bicubic",
                                             antialias=True, align_corners=False).clamp(0, 1)
    top, left = (nh - resolution) // 2, (nw - resolution) // 2
    return pixels[:, :, top:top + resolution, left:left + resolution].movedim(1, -1).contiguous()
