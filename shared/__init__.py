"""Late-phase weights for any PyTorch model (von Oswald, Kobayashi, Sacramento et al., ICLR 2021).

    lp = shared.LatePhase(model, K=10, families=[shared.BatchNorm(), shared.Head()])   # release at T0
    loss = lp.step(x, y, F.cross_entropy)     # one outer step of Algorithm 1 on K stacked member minibatches
    final = lp.collapse(train_loader)         # plain model with phi_bar = mean_k phi_k, BatchNorm re-estimated

See :mod:`shared.core` for Algorithm 1, :mod:`shared.families` for the late-phase weight families,
:mod:`shared.averaging` for weight averaging and ensembles, :mod:`shared.swa`, :mod:`shared.checkpoint` and
:mod:`shared.distributed`.
"""
from .averaging import collapse, ensemble_logits, ensemble_probs, update_bn_members
from .checkpoint import CheckpointError, load, save
from .core import LatePhase, sgd
from .errors import LatePhaseError
from .families import BatchNorm, Custom, Family, Head, Rank1
from .swa import SWA

__all__ = ["LatePhase", "LatePhaseError", "sgd", "BatchNorm", "Head", "Rank1", "Custom", "Family", "collapse",
           "ensemble_logits", "ensemble_probs", "update_bn_members", "SWA", "save", "load",
           "CheckpointError"]
