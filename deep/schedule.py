"""Learning-rate schedules, stepped once per epoch (epochs count passes over the training data)."""
from __future__ import annotations


def annealing_lr(epoch: int, base_lr: float, start: int, end: int, end_lr_ratio: float) -> float:
    """The reference code's "annealing" schedule at `epoch` (0-based):

        lr(e) = base_lr                                          for e < start
              = base_lr (1 - (1 - r) (e - start) / (end - start)) for start <= e < end
              = base_lr r                                        for e >= end,
    with r = end_lr_ratio (the end learning rate as a fraction of the base learning rate)."""
    if epoch < start:
        return base_lr
    if epoch >= end or end == start:
        return base_lr * end_lr_ratio
    frac = (epoch - start) / (end - start)
    return base_lr * (1.0 - (1.0 - end_lr_ratio) * frac)


def lr_factor(cfg, epoch: int) -> float:
    """Multiplier of every optimizer's base learning rate at `epoch` for config `cfg`: the annealing schedule
    (anneal_end_lr given for the base lr `cfg.lr`), then a constant swa_lr / lr from swa_start on."""
    if cfg.swa and epoch >= cfg.swa_start:
        return cfg.swa_lr / cfg.lr
    return annealing_lr(epoch, 1.0, cfg.anneal_start, cfg.anneal_end, cfg.anneal_end_lr / cfg.lr)
