"""Training records: the loss CSV and the loss plot as a PNG (drawn by the glue's ``loss_plot``, shared with the node)."""

from __future__ import annotations

import csv
import os

from implicit_negatives.atomic_write import atomic_path
from implicit_negatives.comfyui.training_feedback import loss_plot, smoothed


def write_loss_csv(path: str, losses: list[float]) -> None:
    """step,loss,ema rows (step is 1-based; ema = exponential moving average, beta 0.98, bias-corrected)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_path(path) as temp, open(temp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", "loss", "ema"])
        for step, (loss, ema) in enumerate(zip(losses, smoothed(losses)), start=1):
            writer.writerow([step, f"{loss:.6g}", f"{ema:.6g}"])


def plot_losses(path: str, losses: list[float], size=(800, 400)) -> None:
    """The loss curve (``loss_plot``: raw loss grey, moving average blue) as a PNG, written atomically."""
    image = loss_plot(losses, size)
    with atomic_path(path) as temp:
        image.save(temp, format="PNG")
