"""Concept-inversion trainer, ``python -m trainer``: the command line (``cli``), image folders and generated
images (``data``) and training records (``report``). The ComfyUI glue it drives (MODEL + CLIP -> loss,
unlearned-weight layouts) lives in ``implicit_negatives.comfyui``, shared with the TrainImplicitNegative node.
"""
