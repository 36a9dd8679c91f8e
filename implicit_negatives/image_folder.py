"""A folder of concept images (optional captions), read and checked: the trainer's data and Safe Denoiser's
negation set come from this one reader.

A folder holds images (png, jpg, jpeg, webp, bmp, gif) and optionally, next to each, a ``.txt`` caption
with the same stem, in UTF-8. Hidden files (``.name``, macOS ``._name``) are ignored. Every image is read
and checked before any model loads, and every problem is reported at once, by file name:

* unreadable or truncated files, images whose short side is under half the resolution (they would be
  upscaled more than 2x), captions that are not UTF-8; ``skip_bad`` drops those images instead;
* 16-bit grey (PNG ``I;16``) is scaled to 8 bits (Pillow's own RGB conversion clips it to white);
* transparency (RGBA, LA, palette or grey with a transparent colour) is composited on WHITE: the colour
  every viewer and browser shows behind a cut-out, where dropping alpha would expose whatever colour the
  transparent pixels store (usually black) and teach the embedding a background nobody saw;
* animated files (GIF, WebP) contribute their first frame.

Images are then resized so the short side equals the resolution (Lanczos) and center-cropped square.
Pure Pillow/numpy/torch: no ComfyUI.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageOps

from .leakage import png_generation_prompts

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
ALPHA_BACKGROUND = (255, 255, 255)
MAX_UPSCALE = 2  # an image whose short side is under resolution / 2 is refused, not blown up


class TrainingDataError(ValueError):
    """The images (or the trainer's prompts) cannot be used as given; the message lists every file and the fix."""


@dataclass
class ImageFolder:
    """What a folder gave: IMAGE (M, R, R, 3) in [0, 1], a caption or None per image, the file names used,
    (name, reason) for each image left out with ``skip_bad``, and per image the generation prompts its PNG
    text names (ComfyUI's ``prompt`` graph or A1111's ``parameters``; empty when none)."""

    images: torch.Tensor
    captions: list[str | None]
    names: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    generation_prompts: list[list[str]] = field(default_factory=list)

    def receipt(self) -> str:
        captioned = sum(c is not None for c in self.captions)
        text = f"{len(self.names)} image{'s' * (len(self.names) != 1)} used ({captioned} with captions)"
        if self.skipped:
            text += f"; skipped {len(self.skipped)}: " + "; ".join(f"{n} ({why})" for n, why in self.skipped)
        return text


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB image: 16-bit grey scaled down, transparency composited on ``ALPHA_BACKGROUND``."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit grey; older Pillow opens it as mode I
        grey = np.asarray(image).astype(np.float64) * (255.0 / 65535.0)
        image = Image.fromarray(np.clip(grey.round(), 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode in ("P", "L", "RGB") and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def fit_image(image: Image.Image, resolution: int) -> Image.Image:
    """Resize so the short side is ``resolution`` (Lanczos), then center-crop to a square."""
    image = to_rgb(ImageOps.exif_transpose(image))
    scale = resolution / min(image.size)
    size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    image = image.resize(size, Image.LANCZOS)
    left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def to_image_tensor(images: list[Image.Image]) -> torch.Tensor:
    """ComfyUI IMAGE: (M, H, W, 3) float32 in [0, 1]."""
    return torch.from_numpy(np.stack([np.asarray(i, dtype=np.float32) / 255.0 for i in images]))


def image_names(folder: str) -> list[str]:
    """The image files of a folder, sorted; hidden files (``.x``, macOS ``._x``) are not images."""
    if not os.path.isdir(folder):
        raise TrainingDataError(f"Image folder not found: {folder}")
    return sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith("."))


def read_text(path: str, what: str) -> str:
    """A text file's content as UTF-8 (a byte-order mark allowed); ``what`` names it in the error."""
    with open(path, "rb") as handle:
        data = handle.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise TrainingDataError(f"{what} {os.path.basename(path)} is not UTF-8 (byte {error.start}); "
                                "save it as UTF-8") from None


def load_image(path: str, resolution: int) -> tuple[Image.Image, list[str]]:
    """One training image, fitted to ``resolution``, and the generation prompts its text chunks name;
    TrainingDataError says why a file cannot be used."""
    try:
        with Image.open(path) as image:
            image.load()  # decode now: a truncated file fails here, not halfway through training
            minimum = math.ceil(resolution / MAX_UPSCALE)
            if min(image.size) < minimum:
                raise TrainingDataError(f"{image.width}x{image.height} is too small: the short side must be at "
                                        f"least {minimum} px for resolution {resolution} (upscaled at most "
                                        f"{MAX_UPSCALE}x)")
            return fit_image(image, resolution), png_generation_prompts(image.info)
    except TrainingDataError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise TrainingDataError(f"cannot read it: {error}") from None


def load_image_folder(folder: str, resolution: int, skip_bad: bool = False,
                      skip_hint: str = "pass --skip-bad-images to train without them") -> ImageFolder:
    """Read and check every image (and caption) of ``folder``; all problems are listed together.

    Raises TrainingDataError naming each bad file and ending with ``skip_hint`` (how this caller skips
    them), unless ``skip_bad``: then they are left out and listed in ``ImageFolder.skipped``. No usable
    image at all is always an error.
    """
    names = image_names(folder)
    if not names:
        raise TrainingDataError(f"{folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    images, captions, used, bad, prompts = [], [], [], [], []
    for name in names:
        caption_path = os.path.join(folder, os.path.splitext(name)[0] + ".txt")
        try:
            image, generation = load_image(os.path.join(folder, name), resolution)
            has_caption = os.path.isfile(caption_path)
            caption = (read_text(caption_path, "caption").strip() or None) if has_caption else None
        except TrainingDataError as error:
            bad.append((name, str(error)))
            continue
        images.append(image)
        captions.append(caption)
        used.append(name)
        prompts.append(generation)
    if bad and not skip_bad:
        listing = "\n".join(f"  {name}: {why}" for name, why in bad)
        raise TrainingDataError(f"{len(bad)} of {len(names)} files in {folder} cannot be used:\n{listing}\n"
                                f"Fix or remove them, or {skip_hint}.")
    if not used:
        raise TrainingDataError(f"none of the {len(names)} images in {folder} can be used")
    return ImageFolder(to_image_tensor(images), captions, used, bad, prompts)
