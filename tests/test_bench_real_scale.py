"""``python -m bench.real_scale --smoke`` runs the whole loop (training in fp32 and bf16, plain CFG, SLD both
ways, SAFREE, the evaluation runner) as CI would from a fresh clone, and labels every line with what it reduced."""

import os
import re
import subprocess
import sys

import torch

from implicit_negatives.comfyui import headless


def test_real_scale_smoke_runs_every_phase_and_labels_every_line(comfy):
    done = subprocess.run([sys.executable, "-m", "bench.real_scale", "--smoke"], cwd=headless.PACK_ROOT,
                          capture_output=True, text=True, timeout=1200, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    cuda = torch.cuda.is_available()
    label = f"[smoke, reduced: tiny rig UNet, not the 859M one, 64 px, 2 steps{'' if cuda else '; ratios only'}]"
    assert lines and all(line.startswith(label) for line in lines), lines
    text = "\n".join(lines)
    for phase in ("training fp32: ", "training bf16 (the mixed-precision path", "sampling plain CFG",
                  "sampling SLD default (fast_batched True)", "sampling SLD separate pass (fast_batched off)",
                  "sampling SAFREE", "sampling check: SLD moves the latent", "evaluation runner: 4 prompts",
                  "process peak RSS"):
        assert phase in text, phase
    ratios = [float(r) for r in re.findall(r"(\d+\.\d+)x", text)]
    assert len(ratios) >= 11 and all(r > 0 for r in ratios), ratios
    if not cuda:  # no GPU: no absolute time anywhere (seconds only as '-')
        assert not re.search(r"\d s\b", text), text
