"""Training images: a folder of concept images (optional captions), or images generated on the spot.

A folder holds images (png, jpg, jpeg, webp, bmp) and optionally, next to each, a ``.txt`` caption
with the same stem. Images are resized so the short side equals the resolution (Lanczos) and
center-cropped square. Generated images come from a reference model (e.g. the original SD1.4)
sampled with ComfyUI's own sampler for each prompt, and are saved next to the run for inspection.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def fit_image(image: Image.Image, resolution: int) -> Image.Image:
    """Resize so the short side is ``resolution`` (Lanczos), then center-crop to a square."""
    image = ImageOps.exif_transpose(image).convert("RGB")
    scale = resolution / min(image.size)
    size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    image = image.resize(size, Image.LANCZOS)
    left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def to_image_tensor(images: list[Image.Image]) -> torch.Tensor:
    """ComfyUI IMAGE: (M, H, W, 3) float32 in [0, 1]."""
    return torch.from_numpy(np.stack([np.asarray(i, dtype=np.float32) / 255.0 for i in images]))


def load_image_folder(folder: str, resolution: int) -> tuple[torch.Tensor, list[str | None], list[str]]:
    """(IMAGE (M, R, R, 3), captions or None per image, file names), sorted by file name."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"Image folder not found: {folder}")
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS))
    if not names:
        raise ValueError(f"{folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    images, captions = [], []
    for name in names:
        with Image.open(os.path.join(folder, name)) as image:
            images.append(fit_image(image, resolution))
        caption_path = os.path.join(folder, os.path.splitext(name)[0] + ".txt")
        caption = None
        if os.path.isfile(caption_path):
            with open(caption_path, encoding="utf-8") as handle:
                caption = handle.read().strip() or None
        captions.append(caption)
    return to_image_tensor(images), captions, names


def generate_images(model, clip, vae, prompts: list[str], per_prompt: int, resolution: int, steps: int = 25,
                    cfg: float = 7.5, seed: int = 0, save_folder: str | None = None):
    """Sample ``per_prompt`` images per prompt from a reference model: (IMAGE, captions = the prompts)."""
    import comfy.sample
    images, captions = [], []
    negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    for p_index, prompt in enumerate(prompts):
        positive = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
        for k in range(per_prompt):
            latent = torch.zeros(1, 4, resolution // 8, resolution // 8)
            image_seed = seed + p_index * 1000 + k
            noise = comfy.sample.prepare_noise(latent, image_seed)
            samples = comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", positive, negative, latent,
                                          seed=image_seed, disable_pbar=True)
            pixels = vae.decode(samples).clamp(0, 1).float().cpu()
            images.append(pixels[0])
            captions.append(prompt)
            if save_folder:
                os.makedirs(save_folder, exist_ok=True)
                Image.fromarray((pixels[0].numpy() * 255).round().astype(np.uint8)).save(
                    os.path.join(save_folder, f"generated_{p_index:03d}_{k:03d}.png"))
    return torch.stack(images), captions


def read_prompts(value: str) -> list[str]:
    """Prompts from a text file (one per line) or a single prompt string."""
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as handle:
            return [line.strip() for line in handle if line.strip()]
    return [value]
