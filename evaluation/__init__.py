"""Evaluation: NudeNet/Q16 scoring and the paper's protocol runner (``python -m evaluation``, run from the
pack's folder). It drives ComfyUI headless through ``implicit_negatives.comfyui.headless``; nothing heavy at
import."""
