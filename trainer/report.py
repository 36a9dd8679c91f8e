"""Training records: the loss CSV and a PNG plot drawn with Pillow (no plotting library needed)."""

from __future__ import annotations

import csv
import os

from PIL import Image, ImageDraw

from implicit_negatives.atomic_write import atomic_path


def write_loss_csv(path: str, losses: list[float]) -> None:
    """step,loss,ema rows (step is 1-based; ema = exponential moving average, beta 0.98, bias-corrected)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_path(path) as temp, open(temp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", "loss", "ema"])
        for step, (loss, ema) in enumerate(zip(losses, smoothed(losses)), start=1):
            writer.writerow([step, f"{loss:.6g}", f"{ema:.6g}"])


def smoothed(values: list[float], beta: float = 0.98) -> list[float]:
    out, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = beta * average + (1 - beta) * value
        out.append(average / (1 - beta ** i))
    return out


def plot_losses(path: str, losses: list[float], size=(800, 400)) -> None:
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
    with atomic_path(path) as temp:
        image.save(temp, format="PNG")
