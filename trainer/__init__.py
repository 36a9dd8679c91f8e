"""Concept-inversion trainer: ``python -m trainer`` (CLI) and the ComfyUI adapter used by the node.

Modules: ``comfy_inversion`` (MODEL + CLIP -> loss for the core loop), ``weights`` (unlearned-weight
layouts), ``data`` (image folders, generated images), ``cli`` (the command line).
"""
