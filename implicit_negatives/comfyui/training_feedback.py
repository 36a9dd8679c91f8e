"""What a person sees of a training run, shared by the TrainImplicitNegative node and ``python -m trainer``:
a preview image sampled with the embedding as the POSITIVE prompt ("does the concept come back?") and a plot
of the loss curve.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from . import inversion as ci

PREVIEW_PROMPT = "a photo of {}"  # "{}" = the embedding
PREVIEW_STEPS = 20  # euler, CFG 7.5: enough for a recognisable SD1.x image, a few seconds on a GPU


def preview_image(model, clip, vae, vectors: torch.Tensor, prompt: str, steps: int, seed: int,
                  resolution: int) -> torch.Tensor:
    """(1, resolution, resolution, 3) pixels in [0, 1], as VAEDecode returns them: ``model`` sampled with
    ``prompt`` ("{}" = ``vectors``, (N, D)) as the positive prompt and an empty negative."""
    import comfy.sample
    parts = ci.text_encoders(clip)  # one encoder (SD1.x, SD2.x) or CLIP-L + CLIP-G (SDXL), each with its share
    caption = ci.tokenize_caption(parts[0].tokenizer, prompt, vectors.shape[0])
    tokens = {part.token_key: [[(t, 1.0) for t in ci.prompt_row(caption, chunk, part.tokenizer)]]
              for part, chunk in zip(parts, ci.split_vectors(parts, vectors.detach().float()).values())}
    with torch.no_grad():
        positive = clip.encode_from_tokens_scheduled(tokens)
        negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
        latent = torch.zeros(1, 4, resolution // 8, resolution // 8)
        samples = comfy.sample.sample(model, comfy.sample.prepare_noise(latent, seed), steps, 7.5, "euler", "normal",
                                      positive, negative, latent, seed=seed, disable_pbar=True)
        return vae.decode(samples).clamp(0, 1)[:1].float().cpu()


def to_pil(pixels: torch.Tensor) -> Image.Image:
    """The first image of a (B, H, W, 3) [0, 1] batch as an 8-bit PIL image."""
    return Image.fromarray((pixels[0].numpy() * 255).round().astype(np.uint8))


def to_pixels(image: Image.Image) -> torch.Tensor:
    """A PIL image as a (1, H, W, 3) [0, 1] batch, ComfyUI's IMAGE layout."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)[None]


def smoothed(values: Sequence[float], beta: float = 0.98) -> list[float]:
    """Exponential moving average, bias-corrected (as Adam's moments)."""
    out, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = beta * average + (1 - beta) * value
        out.append(average / (1 - beta ** i))
    return out


def loss_plot(losses: Sequence[float], size=(800, 400)) -> Image.Image:
    """A line plot of the raw loss (grey) and its moving average (blue), y from 0 to the max."""
    width, height = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 60, width - 20, 20, height - 40
    draw.rectangle([left, top, right, bottom], outline="black")
    if losses:
        peak = max(max(losses), 1e-12)

        def point(i, value):
            x = left + (right - left) * (i / max(len(losses) - 1, 1))
            return x, bottom - (bottom - top) * min(value / peak, 1.0)
        for series, colour in ((losses, (170, 170, 170)), (smoothed(losses), (30, 90, 200))):
            draw.line([point(i, v) for i, v in enumerate(series)], fill=colour, width=2)
        draw.text((5, top), f"{peak:.3g}", fill="black")
        draw.text((5, bottom - 10), "0", fill="black")
        draw.text((left, bottom + 10), f"step 1 .. {len(losses)}   (grey: loss, blue: moving average)", fill="black")
    return image
