"""Stochastic weight averaging combined with late-phase weights, built on torch.optim.swa_utils.

As in the reference: from the SWA epoch on, theta and every member's phi_k are time-averaged with equal weights
(``AveragedModel`` over the late-phase model, one ``update()`` per epoch),

    theta_swa = (1/n) sum_{i=1..n} theta^(i),   phi_k,swa = (1/n) sum_{i=1..n} phi_k^(i),

every optimizer runs at a constant SWA learning rate (``SWALR`` on theta's and each member's optimizer), and at the end
the BatchNorm statistics of every member are recomputed from data (:func:`shared.averaging.update_bn_members`). The
result is again a late-phase model: collapse it (:func:`shared.averaging.collapse`) or use it as an ensemble.
"""
from __future__ import annotations

from typing import Iterable

import torch.nn as nn
from torch.optim.swa_utils import SWALR, AveragedModel

from .averaging import update_bn_members
from .errors import LatePhaseError


class SWA:
    """SWA over a :class:`shared.LatePhase` run.

    Args:
        latephase: the LatePhase object being trained.
        swa_lr: the constant learning rate of theta's optimizer from the SWA start (reference: 0.05).
        swa_lr_phi: the members' constant learning rate (default: ``swa_lr``).
        anneal_epochs, anneal_strategy: SWALR's transition to the SWA lr (default 0: constant right away).
    Call :meth:`step_schedulers` once per epoch instead of the run's own schedulers, :meth:`update` once per epoch
    (the reference averages at the end of every epoch from the SWA epoch on), and :meth:`finalize` at the end.
    """

    def __init__(self, latephase, swa_lr: float, swa_lr_phi: float | None = None, anneal_epochs: int = 0,
                 anneal_strategy: str = "cos"):
        if not swa_lr > 0 or (swa_lr_phi is not None and not swa_lr_phi > 0):
            raise LatePhaseError(f"SWA learning rates must be > 0, got swa_lr={swa_lr}, swa_lr_phi={swa_lr_phi}")
        self.latephase = latephase
        self.averaged = AveragedModel(latephase.model)
        phi_lr = swa_lr if swa_lr_phi is None else swa_lr_phi
        self.schedulers = []
        if latephase.theta_optimizer is not None:
            self.schedulers.append(SWALR(latephase.theta_optimizer, swa_lr, anneal_epochs, anneal_strategy))
        self.schedulers += [SWALR(opt, phi_lr, anneal_epochs, anneal_strategy) for opt in latephase.phi_optimizers]

    @property
    def model(self) -> nn.Module:
        """The averaged late-phase model (theta_swa and every phi_k,swa)."""
        return self.averaged.module

    @property
    def n_averaged(self) -> int:
        return int(self.averaged.n_averaged)

    def update(self) -> None:
        """Add the current theta and phi_1..phi_K to the equal-weight running average."""
        self.averaged.update_parameters(self.latephase.model)

    def step_schedulers(self) -> None:
        """Step the SWA learning-rate schedulers (once per epoch)."""
        for s in self.schedulers:
            s.step()

    def finalize(self, loader: Iterable, device=None) -> nn.Module:
        """Recompute every member's BatchNorm statistics of the averaged model from ``loader`` and return it."""
        if self.n_averaged == 0:
            raise LatePhaseError("SWA.finalize before any SWA.update(); call update() at least once")
        update_bn_members(loader, self.averaged.module, device)
        return self.averaged.module

    def state_dict(self) -> dict:
        return {"averaged": self.averaged.state_dict(), "schedulers": [s.state_dict() for s in self.schedulers]}

    def load_state_dict(self, state: dict) -> None:
        self.averaged.load_state_dict(state["averaged"])
        if len(state["schedulers"]) != len(self.schedulers):
            raise LatePhaseError("the SWA checkpoint has a different number of schedulers; build SWA the same way")
        for s, sd in zip(self.schedulers, state["schedulers"]):
            s.load_state_dict(sd)
