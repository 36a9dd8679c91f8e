"""Training images generated on the spot, and prompt files; a folder of images is read by
``implicit_negatives.image_folder`` (shared with the negation-set loader).

Generated images come from a reference model (e.g. the original SD1.4) sampled with ComfyUI's own
sampler for each prompt, and are saved next to the run for inspection.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from implicit_negatives.atomic_write import atomic_path
from implicit_negatives.image_folder import TrainingDataError, read_text


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
                path = os.path.join(save_folder, f"generated_{p_index:03d}_{k:03d}.png")
                with atomic_path(path) as temp:
                    Image.fromarray((pixels[0].numpy() * 255).round().astype(np.uint8)).save(temp, format="PNG")
    return torch.stack(images), captions


def read_prompts(path: str) -> list[str]:
    """Prompts from a text file, one per line (UTF-8, a byte-order mark allowed; blank lines skipped)."""
    if not os.path.isfile(path):
        raise TrainingDataError(f"prompt file not found: {path} (--generate-prompts takes a file; give a "
                                "literal prompt with --generate-prompt TEXT)")
    prompts = [line.strip() for line in read_text(path, "prompt file").splitlines() if line.strip()]
    if not prompts:
        raise TrainingDataError(f"prompt file {path} holds no prompts")
    return prompts
