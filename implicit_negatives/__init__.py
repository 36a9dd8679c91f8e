"""Engine-agnostic core of the Implicit Negatives pack.

Pure torch + safetensors: embedding file I/O, prompt-token packing, guidance math and
the concept-inversion loop. Nothing in this package imports ComfyUI, so it can be used
from the trainer CLI, the benchmarks, diffusers scripts and the tests alike.
"""

__version__ = "0.1.0"
