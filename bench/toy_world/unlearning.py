"""Concept erasure by the ESD recipe (Gandikota et al., ICCV 2023), at toy scale.

Faithful to the original CompVis `train-esd.py`: each iteration draws a random stop step, partially
samples x_t from noise with the *model being edited* conditioned on the concept (CFG at the "start
guidance"), then regresses the edited model's eps(x_t, c, t) onto the frozen model's negatively guided
score eps*(x_t, t) - eta [eps*(x_t, c, t) - eps*(x_t, t)]. ESD-u trains every UNet parameter outside the
cross-attention (and, as the old code, not the time embedding or the output layers); ESD-x trains only
the cross-attention (`attn2`). The text encoder is frozen. Toy-scale departures (stated in the report):
batch 4 instead of 1 and a larger learning rate, since the toy model has ~1/1000 of SD's parameters.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .model import ToyDiffusion
from .sampling import ddim_step, ddim_timesteps


@dataclass(frozen=True)
class ESDConfig:
    concept: str = "checkered"
    method: str = "esd-u"  # "esd-u" | "esd-x"
    iterations: int = 200
    learning_rate: float = 1e-4
    eta: float = 1.0  # negative guidance
    start_guidance: float = 3.0
    ddim_steps: int = 25
    batch_size: int = 4
    seed: int = 0


def esd_parameters(model: ToyDiffusion, method: str) -> list[torch.nn.Parameter]:
    """The UNet parameters ESD trains for `method`."""
    named = list(model.unet.named_parameters())
    if method == "esd-x":
        return [p for n, p in named if ".attn2." in n]
    if method == "esd-u":
        skip = (".attn2.", "time_mlp.", "conv_out.", "norm_out.")
        return [p for n, p in named if not any(s in n for s in skip)]
    raise ValueError(f"unknown ESD method {method!r}; use 'esd-u' or 'esd-x'")


def erase_concept(original: ToyDiffusion, cfg: ESDConfig = ESDConfig()) -> ToyDiffusion:
    """A copy of `original` with `cfg.concept` erased; `original` is left untouched."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    frozen = original
    model = copy.deepcopy(original).requires_grad_(False)
    params = esd_parameters(model, cfg.method)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=cfg.learning_rate)
    with torch.no_grad():
        c = frozen.encode([cfg.concept]).expand(cfg.batch_size, -1, -1)
        u = frozen.encode([""]).expand(cfg.batch_size, -1, -1)
    ts = ddim_timesteps(cfg.ddim_steps)
    ab = frozen.alphas_cumprod
    for _ in range(cfg.iterations):
        stop = int(torch.randint(0, cfg.ddim_steps, (1,), generator=gen))
        x = torch.randn(cfg.batch_size, 3, 16, 16, generator=gen)
        with torch.no_grad():
            for i in range(stop):  # partial sampling with the model being edited, concept-conditioned
                tt = torch.full((2 * cfg.batch_size,), int(ts[i]), dtype=torch.long)
                e_u, e_c = model.unet(x.repeat(2, 1, 1, 1), tt, torch.cat([u, c])).chunk(2)
                x = ddim_step(x, e_u + cfg.start_guidance * (e_c - e_u), int(ts[i]), int(ts[i + 1]), ab)
            t = torch.full((cfg.batch_size,), int(ts[stop]), dtype=torch.long)
            e0, ep = frozen.unet(x.repeat(2, 1, 1, 1), t.repeat(2), torch.cat([u, c])).chunk(2)
            target = e0 - cfg.eta * (ep - e0)
        loss = F.mse_loss(model.unet(x, t, c), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.requires_grad_(False).eval()
