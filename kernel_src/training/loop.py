"""The one training loop shared by every model family of both stages.

`fit(model, train_loader, valid_fn, config, loss_fn, out_dir)`:
- AdamW, per-step schedule: linear warmup then cosine decay to `min_lr_ratio * lr`;
- mixed precision (autocast + GradScaler) on CUDA only, full precision elsewhere;
- an EMA copy of the weights, decay `min(ema_decay, (1 + step) / (10 + step))` (the warm-up
  keeps short runs from averaging in the random initialisation); validation uses the EMA;
- after every epoch `valid_fn(ema_model) -> dict` with a `"score"` (lower is better); the best
  EMA weights go to `out_dir/<checkpoint_name>` through `models.registry.save_checkpoint`,
  and `out_dir/<last_name>` holds everything needed to resume (model, EMA, optimizer,
  scheduler, scaler, epoch, history, and the settings it was written with: a resume state
  of another model config or schedule is not resumed, the run starts afresh and says why);
- under `torchrun` (an initialised process group): DistributedDataParallel, the loader's
  DistributedSampler gets `set_epoch`, only rank 0 validates and writes, and the validation
  result is broadcast so every rank returns the same dict.

A family supplies `loss_fn(model, batch) -> scalar tensor` (batch already on the device)
and `valid_fn(model) -> {"score": float, ...}`; nothing family-specific lives here.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..models import registry


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of one run (saved in `last.pt` and the metrics)."""

    epochs: int = 10
    lr: float = 6e-4
    weight_decay: float = 1e-2
    warmup_frac: float = 0.1        # share of all steps spent in linear warmup
    min_lr_ratio: float = 0.01      # cosine floor, as a fraction of lr
    ema_decay: float = 0.99
    amp: bool = True                # used on CUDA only
    grad_clip: float = 1.0          # max grad norm; 0 disables
    device: str = "cpu"
    resume: bool = True             # continue from out_dir/last.pt when present
    checkpoint_name: str = "best.pt"  # best EMA weights (registry checkpoint)
    last_name: str = "last.pt"        # resume state
    log_every: int = 0              # print the loss every N steps (0: once per epoch)
    precise_bn_batches: int = 0     # >0: recompute the EMA model's BatchNorm statistics
                                    # on this many training batches before validating


# ---------------------------------------------------------------- distributed helpers
def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def setup_distributed(device: str = "auto") -> str:
    """Initialise the process group when launched by torchrun; returns the device to use.

    `device="auto"` picks cuda:<LOCAL_RANK> when CUDA is available, else cpu; the backend
    is nccl on CUDA and gloo on CPU. Without torchrun's env (WORLD_SIZE) nothing is done.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not is_distributed():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
    if device.startswith("cuda") and is_distributed():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    return device


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool = True, num_workers: int = 0,
                seed: int = 0, drop_last: bool = False, collate_fn=None) -> DataLoader:
    """A DataLoader over a DistributedSampler (one replica when not distributed), so the
    shuffle order is a function of (seed, epoch) and a resumed run sees the same batches."""
    sampler = DistributedSampler(dataset, num_replicas=world_size(), rank=rank(),
                                 shuffle=shuffle, seed=seed, drop_last=drop_last)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                      num_workers=num_workers, drop_last=drop_last,
                      collate_fn=collate_fn, persistent_workers=num_workers > 0)


# ---------------------------------------------------------------- pieces of the loop
def to_device(batch: Any, device: torch.device | str) -> Any:
    """Move tensors in nested dicts / lists / tuples to `device` (other values untouched)."""
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


class EMA:
    """Exponential moving average of a model's parameters (buffers are copied)."""

    def __init__(self, model: nn.Module, decay: float):
        self.module = copy.deepcopy(_unwrap(model)).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = float(decay)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))
        src = _unwrap(model).state_dict()
        for name, ema_v in self.module.state_dict().items():
            v = src[name].detach()
            if ema_v.dtype.is_floating_point:
                ema_v.mul_(d).add_(v.to(ema_v.dtype), alpha=1.0 - d)
            else:
                ema_v.copy_(v)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def cosine_with_warmup(optimizer, total_steps: int, warmup_frac: float, min_lr_ratio: float):
    """LambdaLR: linear warmup over `warmup_frac` of the steps, then cosine to the floor."""
    warmup = max(1, int(round(warmup_frac * total_steps)))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _save_best(path: Path, model: nn.Module, family: str, model_config, metrics: dict) -> None:
    if model_config is not None:
        registry.save_checkpoint(path, family, model_config, model, metrics)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"family": family, "config": {}, "state_dict": model.state_dict(),
               "metrics": metrics}
    torch.save(payload, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)


def _save_last(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def _train_one_epoch(model, loader, loss_fn, optimizer, scheduler, scaler, ema, config,
                     device, epoch) -> float:
    model.train()
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    use_amp = config.amp and torch.device(device).type == "cuda"
    total, count = 0.0, 0
    for step, batch in enumerate(loader):
        batch = to_device(batch, device)
        with torch.autocast(device_type="cuda", enabled=use_amp):
            loss = loss_fn(model, batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"epoch {epoch} step {step}: loss is {loss.item()}")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if config.grad_clip > 0:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        ema.update(model)
        total, count = total + float(loss.detach()), count + 1
        if config.log_every and rank() == 0 and step % config.log_every == 0:
            print(f"epoch {epoch} step {step} loss {float(loss):.4f}", flush=True)
    if count == 0:
        raise ValueError("the training loader yielded no batch")
    return total / count


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, loader: DataLoader, loss_fn, device,
                          n_batches: int, use_amp: bool = False) -> None:
    """Precise BN: reset the BatchNorm running statistics of `model` and re-estimate them
    (cumulative average) on up to `n_batches` training batches, fed through `loss_fn`
    (its value is ignored). EMA-averaged weights and EMA-averaged running statistics do
    not match after few steps; this makes eval-mode outputs those of the EMA weights."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or n_batches <= 0:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for i, batch in enumerate(loader):
        if i >= n_batches:
            break
        with torch.autocast(device_type="cuda", enabled=use_amp):
            loss_fn(model, to_device(batch, device))
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    model.eval()


def _validate(ema: EMA, valid_fn: Callable[[nn.Module], dict]) -> dict:
    """Rank 0 validates; the result is broadcast to every rank."""
    result = [None]
    if rank() == 0:
        with torch.no_grad():
            metrics = dict(valid_fn(ema.module))
        if "score" not in metrics:
            raise KeyError("valid_fn must return a dict with a 'score' (lower is better)")
        result = [{k: _plain(v) for k, v in metrics.items()}]
    if is_distributed():
        dist.broadcast_object_list(result, src=0)
    return result[0]


def _plain(v):
    return float(v) if isinstance(v, (int, float)) or torch.is_tensor(v) else v


def fit(model: nn.Module, train_loader: DataLoader, valid_fn: Callable[[nn.Module], dict],
        config: TrainConfig, loss_fn: Callable[[nn.Module, Any], torch.Tensor],
        out_dir: str | Path, *, family: str = "", model_config=None) -> dict:
    """Train `model`; returns {best_score, best_epoch, best_metrics, history, checkpoint,
    epochs_run, seconds}. `family` and `model_config` go into the best checkpoint."""
    out_dir = Path(out_dir)
    device = torch.device(config.device)
    model = model.to(device)
    if is_distributed():
        ids = [device.index] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr,
                                  weight_decay=config.weight_decay)
    total_steps = max(1, config.epochs * len(train_loader))
    scheduler = cosine_with_warmup(optimizer, total_steps, config.warmup_frac,
                                   config.min_lr_ratio)
    scaler = torch.amp.GradScaler("cuda", enabled=config.amp and device.type == "cuda")
    ema = EMA(model, config.ema_decay)
    state = {"epoch": -1, "best_score": math.inf, "best_epoch": -1, "best_metrics": {},
             "history": []}
    last_path = out_dir / config.last_name
    if config.resume and last_path.is_file():
        state = _resume(last_path, model, ema, optimizer, scheduler, scaler, device,
                        _settings(config, model_config)) or state
    start, ran = time.time(), 0
    for epoch in range(state["epoch"] + 1, config.epochs):
        ran += 1
        loss = _train_one_epoch(model, train_loader, loss_fn, optimizer, scheduler, scaler,
                                ema, config, device, epoch)
        recalibrate_batchnorm(ema.module, train_loader, loss_fn, device,
                              config.precise_bn_batches,
                              config.amp and device.type == "cuda")
        metrics = _validate(ema, valid_fn)
        row = {"epoch": epoch, "train_loss": loss, "lr": scheduler.get_last_lr()[0], **metrics}
        state["history"].append(row)
        improved = metrics["score"] < state["best_score"]
        if improved:
            state.update(best_score=metrics["score"], best_epoch=epoch, best_metrics=metrics)
        state["epoch"] = epoch
        if rank() == 0:
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v
                              for k, v in row.items()}), flush=True)
            if improved:
                _save_best(out_dir / config.checkpoint_name, ema.module, family, model_config,
                           {**metrics, "epoch": epoch})
            _save_last(last_path, {**_last_state(model, ema, optimizer, scheduler, scaler,
                                                 state, config),
                                   "settings": _settings(config, model_config)})
        if is_distributed():
            dist.barrier()
    return {"best_score": state["best_score"], "best_epoch": state["best_epoch"],
            "best_metrics": state["best_metrics"], "history": state["history"],
            "checkpoint": str(out_dir / config.checkpoint_name),
            "epochs_run": ran, "seconds": time.time() - start}


def _last_state(model, ema, optimizer, scheduler, scaler, state, config) -> dict:
    return {"model": _unwrap(model).state_dict(), "ema": ema.module.state_dict(),
            "ema_updates": ema.updates, "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "train_config": dataclasses.asdict(config), **state}


# TrainConfig fields that shape the optimisation: a resume state written with other values
# would continue a different run.
_SCHEDULE_FIELDS = ("epochs", "lr", "weight_decay", "warmup_frac", "min_lr_ratio",
                    "ema_decay")


def _settings(config: TrainConfig, model_config) -> dict:
    """What a resume state must have been written with: model config and schedule."""
    model = (registry.config_to_dict(model_config)
             if dataclasses.is_dataclass(model_config) else model_config)
    return {"model_config": model,
            **{k: getattr(config, k) for k in _SCHEDULE_FIELDS}}


def _resume(path: Path, model, ema, optimizer, scheduler, scaler, device, settings: dict
            ) -> dict | None:
    """Load a resume state into the objects and return the loop state; None (nothing
    loaded) when it was written with other settings."""
    saved = torch.load(path, map_location=device, weights_only=False)
    before = saved.get("settings")
    if before is not None and before != settings:
        changed = sorted(k for k in set(before) | set(settings)
                         if before.get(k) != settings.get(k))
        if changed == ["model_config"]:
            old, new = before["model_config"] or {}, settings["model_config"] or {}
            changed = [f"model_config.{k}" for k in sorted(set(old) | set(new))
                       if old.get(k) != new.get(k)]
        if rank() == 0:
            print(f"{path} was written with other settings ({', '.join(changed)}): "
                  "not resumed, training from scratch", flush=True)
        return None
    _unwrap(model).load_state_dict(saved["model"])
    ema.module.load_state_dict(saved["ema"])
    ema.updates = int(saved["ema_updates"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    scaler.load_state_dict(saved["scaler"])
    if rank() == 0:
        print(f"resumed from {path} after epoch {saved['epoch']}", flush=True)
    return {k: saved[k] for k in ("epoch", "best_score", "best_epoch", "best_metrics",
                                  "history")}
