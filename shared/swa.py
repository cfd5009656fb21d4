"""Stochastic weight averaging, alone or combined with late-phase weights, built on torch.optim.swa_utils.

As in the reference: from the SWA epoch on, all weights -- theta and every member's phi_k of a late-phase model, or
the weights of a plain model -- are time-averaged with equal weights (``AveragedModel``, one ``update()`` per epoch),

    theta_swa = (1/n) sum_{i=1..n} theta^(i),   phi_k,swa = (1/n) sum_{i=1..n} phi_k^(i),

the BatchNorm running statistics along with them (``use_buffers``), optionally at a constant SWA learning rate
(``SWALR`` on every optimizer of the LatePhase), and at the end the BatchNorm statistics are recomputed from data
(:func:`shared.averaging.update_bn`: per member for a late-phase model). The average of a late-phase model is again a
late-phase model: collapse it (:func:`shared.averaging.collapse`) or use it as an ensemble.
"""
from __future__ import annotations

from typing import Iterable

import torch.nn as nn
from torch.optim.swa_utils import SWALR, AveragedModel

from .averaging import update_bn
from .errors import LatePhaseError


class SWA:
    """SWA over a :class:`shared.LatePhase` run or a plain model.

    Args:
        target: the LatePhase object being trained (theta and every phi_k are averaged), or an nn.Module.
        swa_lr: the constant learning rate of theta's optimizer from the SWA start (reference: 0.05); None keeps the
            run's own learning-rate schedule (no SWALR).
        swa_lr_phi: the members' constant learning rate (default: ``swa_lr``).
        anneal_epochs, anneal_strategy: SWALR's transition to the SWA lr (default 0: constant right away).
    Call :meth:`step_schedulers` once per epoch instead of the run's own schedulers (when ``swa_lr`` is given),
    :meth:`update` once per epoch (the reference averages at the end of every epoch from the SWA epoch on), and
    :meth:`finalize` at the end.

    Example::

        swa = shared.SWA(lp, swa_lr=0.05)
        for epoch in range(swa_start, epochs):
            train_one_epoch(lp); swa.step_schedulers(); swa.update()
        model = swa.finalize(train_loader)   # late-phase model: theta_swa, phi_k,swa, BatchNorm per member
    """

    def __init__(self, target, swa_lr: float | None = None, swa_lr_phi: float | None = None, anneal_epochs: int = 0,
                 anneal_strategy: str = "cos"):
        if (swa_lr is not None and not swa_lr > 0) or (swa_lr_phi is not None and not swa_lr_phi > 0):
            raise LatePhaseError(f"SWA learning rates must be > 0, got swa_lr={swa_lr}, swa_lr_phi={swa_lr_phi}")
        self.source = target if isinstance(target, nn.Module) else target.model
        self.averaged = AveragedModel(self.source, use_buffers=True)
        self.schedulers = []
        if swa_lr is not None and not isinstance(target, nn.Module):
            phi_lr = swa_lr if swa_lr_phi is None else swa_lr_phi
            if target.theta_optimizer is not None:
                self.schedulers.append(SWALR(target.theta_optimizer, swa_lr, anneal_epochs, anneal_strategy))
            self.schedulers += [SWALR(opt, phi_lr, anneal_epochs, anneal_strategy) for opt in target.phi_optimizers]

    @property
    def model(self) -> nn.Module:
        """The averaged model (a late-phase model with theta_swa and every phi_k,swa, or a plain model)."""
        return self.averaged.module

    @property
    def n_averaged(self) -> int:
        return int(self.averaged.n_averaged)

    def update(self) -> None:
        """Add the current weights (and BatchNorm statistics) to the equal-weight running average."""
        self.averaged.update_parameters(self.source)

    def step_schedulers(self) -> None:
        """Step the SWA learning-rate schedulers (once per epoch)."""
        for s in self.schedulers:
            s.step()

    def finalize(self, loader: Iterable, device=None) -> nn.Module:
        """Recompute the BatchNorm statistics of the averaged model (every member's) from ``loader``; return it."""
        if self.n_averaged == 0:
            raise LatePhaseError("SWA.finalize before any SWA.update(); call update() at least once")
        update_bn(loader, self.averaged.module, device)
        return self.averaged.module

    def state_dict(self) -> dict:
        return {"averaged": self.averaged.state_dict(), "schedulers": [s.state_dict() for s in self.schedulers]}

    def load_state_dict(self, state: dict) -> None:
        self.averaged.load_state_dict(state["averaged"])
        if len(state["schedulers"]) != len(self.schedulers):
            raise LatePhaseError("the SWA checkpoint has a different number of schedulers; build SWA the same way")
        for s, sd in zip(self.schedulers, state["schedulers"]):
            s.load_state_dict(sd)
