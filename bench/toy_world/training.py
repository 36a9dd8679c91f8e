"""Training the toy world's text-to-image model: eps-prediction, uniform t, caption dropout (for CFG).

Text encoder and UNet are trained jointly from scratch (SD's CLIP is pretrained elsewhere; here the
world is small enough to learn both), AdamW with warm-up and cosine decay, EMA of the weights.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import world
from .model import ModelConfig, ToyDiffusion


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 4000
    batch_size: int = 64
    learning_rate: float = 2e-3
    warmup: int = 100
    ema_decay: float = 0.995
    seed: int = 0
    threads: int = 2  # CPU threads the training runs on: another count rounds differently and trains another model


@contextlib.contextmanager
def cpu_threads(n: int):
    """Run the block on ``n`` torch CPU threads. A trained model's bits depend on the thread count (reductions
    are split differently), so training that is cached under its config's key fixes it in the config."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_world(cfg: TrainConfig = TrainConfig(), model_cfg: ModelConfig = ModelConfig(),
                world_cfg: world.WorldConfig = world.WorldConfig(), log=print, device: str = "cpu") -> ToyDiffusion:
    """The trained (EMA) model on the CPU; captions follow `world_cfg`, including its caption dropout.
    Data and noise are always drawn on the CPU, so `device` changes only where the arithmetic runs; on the CPU it
    runs on `cfg.threads` threads, whatever the caller's setting."""
    with cpu_threads(cfg.threads):
        return _train_world(cfg, model_cfg, world_cfg, log, device)


def _train_world(cfg: TrainConfig, model_cfg: ModelConfig, world_cfg: world.WorldConfig, log, device: str) -> ToyDiffusion:
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = ToyDiffusion(model_cfg).to(device)
    if not model_cfg.train_text_encoder:
        model.text_encoder.requires_grad_(False)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup)
                                              * 0.5 * (1 + math.cos(math.pi * min(1.0, s / cfg.steps))))
    start, running = time.time(), None
    for step in range(cfg.steps):
        x0, captions, _ = world.training_batch(cfg.batch_size, gen, world_cfg)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, ToyDiffusion.T, (cfg.batch_size,), generator=gen)
        x0, noise, t = x0.to(device), noise.to(device), t.to(device)
        loss = F.mse_loss(model.unet(model.add_noise(x0, noise, t), t, model.encode(captions)), noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - cfg.ema_decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if (step + 1) % max(1, cfg.steps // 10) == 0:
            log(f"  world step {step + 1}/{cfg.steps}  loss {running:.4f}  ({time.time() - start:.0f} s)")
    return ema.cpu().eval()
