"""Training images and prompts: every file checked before a model loads, converted right, reported by name.

Planted answers: each odd file is made from a plain 8-bit RGB image whose correct reading is known (the
16-bit grey PNG of an 8-bit grey image, a cut-out whose visible pixels are known, a GIF whose first frame is
known), and must read back as that image.
"""

import numpy as np
import pytest
from PIL import Image

from implicit_negatives.image_folder import TrainingDataError, fit_image, load_image_folder
from trainer.data import read_prompts


def gradient(size=64):
    y, x = np.mgrid[0:size, 0:size]
    return np.stack([x * 4 % 256, y * 4 % 256, (x + y) * 2 % 256], axis=-1).astype(np.uint8)


def expected(pixels: np.ndarray, resolution: int):
    """What a plain 8-bit RGB file of these pixels reads as: the oracle for the odd files."""
    return np.asarray(fit_image(Image.fromarray(pixels), resolution), dtype=np.float32) / 255.0


def test_16_bit_grey_png_reads_as_its_8_bit_image(tmp_path):
    grey = gradient()[..., 0]
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "deep.png")  # 8-bit g -> 16-bit g * 257
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    loaded = load_image_folder(str(tmp_path), 64).images[0].numpy()
    assert np.array_equal(loaded, expected(np.stack([grey] * 3, axis=-1), 64))


def test_transparency_is_composited_on_white_for_rgba_palette_and_grey(tmp_path):
    rgb = gradient()
    alpha = np.zeros((64, 64), np.uint8)
    alpha[16:48, 16:48] = 255  # an opaque square in a fully transparent field that stores black
    cutout = np.concatenate([rgb * (alpha[..., None] > 0), alpha[..., None]], axis=-1)
    Image.fromarray(cutout, "RGBA").save(tmp_path / "a_rgba.png")
    on_white = np.where(alpha[..., None] > 0, rgb, 255).astype(np.uint8)
    palette = Image.fromarray(cutout, "RGBA").convert("P", palette=Image.ADAPTIVE, colors=255)
    Image.fromarray(np.where(alpha > 0, 7, 0).astype(np.uint8), "L").save(tmp_path / "b_grey.png", transparency=0)
    loaded = load_image_folder(str(tmp_path), 64)
    assert loaded.names == ["a_rgba.png", "b_grey.png"]
    assert np.array_equal(loaded.images[0].numpy(), expected(on_white, 64))
    grey_on_white = np.where(alpha > 0, 7, 255).astype(np.uint8)
    assert np.array_equal(loaded.images[1].numpy(), expected(np.stack([grey_on_white] * 3, axis=-1), 64))
    transparent_index = palette.getpixel((0, 0))
    palette.save(tmp_path / "c_palette.gif", transparency=transparent_index)
    gif = load_image_folder(str(tmp_path), 64).images[2].numpy()
    assert (gif[:12, :12] == 1.0).all() and (gif[24:40, 24:40] < 1.0).any()  # white field, the square kept


def test_gif_gives_its_first_frame(tmp_path):
    first, second = gradient(), 255 - gradient()
    frames = [Image.fromarray(first).quantize(colors=256), Image.fromarray(second).quantize(colors=256)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    assert Image.open(tmp_path / "anim.gif").n_frames == 2
    loaded = load_image_folder(str(tmp_path), 64)
    assert loaded.names == ["anim.gif"]
    assert np.array_equal(loaded.images[0].numpy(), expected(np.asarray(frames[0].convert("RGB")), 64))


def test_bad_files_are_all_named_before_training_and_skipped_only_on_request(tmp_path):
    Image.fromarray(gradient()).save(tmp_path / "good.png")
    Image.fromarray(gradient()[:20, :20]).save(tmp_path / "tiny.png")  # 20 px < 32 px for resolution 64
    (tmp_path / "garbage.jpg").write_bytes(b"not an image at all")
    full = (tmp_path / "good.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(full[: len(full) // 2])
    Image.fromarray(gradient()).save(tmp_path / "captioned.png")
    (tmp_path / "captioned.txt").write_bytes("une photo d'un {} \u00e9t\u00e9".encode("latin-1"))
    Image.fromarray(gradient()).save(tmp_path / ".hidden.png")
    (tmp_path / "._good.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble resource fork")
    with pytest.raises(TrainingDataError) as refused:
        load_image_folder(str(tmp_path), 64)
    message = str(refused.value)
    for name in ("tiny.png", "garbage.jpg", "truncated.png", "captioned.png"):
        assert name in message
    assert "4 of 5 files" in message and "--skip-bad-images" in message and "not UTF-8" in message
    assert "good.png: " not in message and "hidden" not in message  # hidden and ._ files are not images

    kept = load_image_folder(str(tmp_path), 64, skip_bad=True)
    assert kept.names == ["good.png"] and kept.images.shape == (1, 64, 64, 3)
    assert sorted(name for name, _ in kept.skipped) == ["captioned.png", "garbage.jpg", "tiny.png", "truncated.png"]
    assert kept.receipt().startswith("1 image used (0 with captions); skipped 4: ")


def test_captions_are_utf8_with_or_without_byte_order_mark(tmp_path):
    for name in ("a", "b"):
        Image.fromarray(gradient()).save(tmp_path / f"{name}.png")
    (tmp_path / "a.txt").write_text("a photo of {} at the caf\u00e9\n", encoding="utf-8-sig")
    (tmp_path / "b.txt").write_text("   \n", encoding="utf-8")
    assert load_image_folder(str(tmp_path), 64).captions == ["a photo of {} at the caf\u00e9", None]


def test_prompt_files_must_exist_and_may_carry_a_byte_order_mark(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\n\n  a photo of a dog  \n", encoding="utf-8-sig")
    assert read_prompts(str(prompts)) == ["a photo of a cat", "a photo of a dog"]
    with pytest.raises(TrainingDataError, match="prompt file not found.*--generate-prompt TEXT"):
        read_prompts(str(tmp_path / "promts.txt"))  # a typo is an error, never the literal prompt "…/promts.txt"


def test_generation_prompts_are_read_from_comfyui_and_a1111_png_text(tmp_path):
    import json
    from PIL import PngImagePlugin
    graph = {"3": {"class_type": "KSampler", "inputs": {"positive": ["6", 0], "negative": ["7", 0]}},
             "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a nude figure, oil painting"}},
             "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry"}}}
    texts = {"a.png": ("prompt", json.dumps(graph)), "b.png": ("parameters", "a bather\nNegative prompt: x\nSteps: 20"),
             "c.png": None}
    for name, text in texts.items():
        info = PngImagePlugin.PngInfo()
        if text:
            info.add_text(*text)
        Image.new("RGB", (64, 64), "gray").save(tmp_path / name, pnginfo=info)
    folder = load_image_folder(str(tmp_path), 64)
    assert folder.generation_prompts == [["a nude figure, oil painting"], ["a bather"], []]
