"""The late-phase weight families a run can name (``--phi``): one registry, name -> how to build the family and how
it combines, read by the config's validation, the trainer's release and its preflight.

A new family is one entry here: its builder turns a validated config into :class:`shared.Family` objects (imported
when a run builds them, so that reading configs needs no torch).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class FamilyEntry:
    """One ``--phi`` name: ``build(cfg) -> [shared.Family, ...]``; ``alone``: combines with no other family;
    ``only_with``: the families it may be combined with (None: any); ``needs_rank1_layers``: reads
    ``cfg.rank1_layers``."""
    help: str
    build: Callable
    alone: bool = False
    only_with: tuple[str, ...] | None = None
    needs_rank1_layers: bool = False


def _bn(cfg) -> list:
    import shared
    return [shared.BatchNorm()]


def _head(cfg) -> list:
    import shared
    return [shared.Head()]


def _rank1(cfg) -> list:
    import shared
    return [shared.Rank1(*cfg.rank1_layers)]


def _hyper(cfg) -> list:  # every Linear/Conv weight W_k = sum_j T_j c_kj, coefficients c_k per member
    import shared
    return [shared.Hypernetwork()]


def _all(cfg) -> list:  # every weight late-phase: a late-phase full ensemble
    import torch.nn as nn

    import shared
    return [shared.BatchNorm(), shared.Custom(types=(nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))]


REGISTRY: dict[str, FamilyEntry] = {
    "bn": FamilyEntry("BatchNorm gamma, beta and running statistics", _bn),
    "head": FamilyEntry("the final nn.Linear", _head),
    "rank1": FamilyEntry("rank-1 factors W o (r_k s_k^T) on the layers of --rank1-layers", _rank1,
                         needs_rank1_layers=True),
    "hyper": FamilyEntry("hypernetwork coefficients of every Linear/Conv weight (template banks theta)", _hyper,
                         only_with=("bn",)),
    "all": FamilyEntry("every weight (a late-phase full ensemble)", _all, alone=True),
}
NAMES = tuple(REGISTRY)


def build(cfg) -> list:
    """The shared.Family objects of the families named by ``cfg.phi``, in that order."""
    return [family for name in cfg.phi for family in REGISTRY[name].build(cfg)]


def problems(phi: tuple, rank1_layers: tuple) -> list[str]:
    """Every rule of the registry that ``--phi`` / ``--rank1-layers`` break, as one-line messages (empty: valid)."""
    if not all(f in REGISTRY for f in phi):
        return [f"phi families must be among {', '.join(NAMES)} (or none), got {' '.join(phi)}"]
    out = []
    if len(set(phi)) != len(phi):
        out.append(f"phi names a family twice: {' '.join(phi)}")
    for name in phi:
        entry = REGISTRY[name]
        if entry.needs_rank1_layers and not rank1_layers:
            out.append(f"phi family {name} needs --rank1-layers (module names)")
        if entry.alone and len(phi) > 1:
            out.append(f"phi {name} ({entry.help}) combines with no other family, got {' '.join(phi)}")
        others = set(phi) - {name}
        if entry.only_with is not None and not others <= set(entry.only_with):
            out.append(f"phi {name} ({entry.help}) combines with {', '.join(entry.only_with)} only, got "
                       f"{' '.join(phi)}")
    if phi and rank1_layers and not any(REGISTRY[f].needs_rank1_layers for f in phi):
        out.append(f"rank1_layers ({' '.join(rank1_layers)}) apply to the phi family rank1, which phi "
                   f"({' '.join(phi)}) does not include: add rank1 to --phi or drop --rank1-layers")
    return out
