"""Late-phase weights for any PyTorch model (von Oswald, Kobayashi, Sacramento et al., ICLR 2021).

    lp = shared.LatePhase(model, K=10, families=[shared.BatchNorm(), shared.Head()],
                          inherit_optimizer_state=opt)          # release at T0, continuing with the user's optimizer
    for x, y in shared.stack_batches(train_loader, K=10):   # K member minibatches stacked along dim 0
        lp.step(x, y, F.cross_entropy)                        # one outer step of Algorithm 1
    final = lp.collapse(train_loader)         # plain model (eval mode), phi_bar = mean_k phi_k, BatchNorm re-estimated

See :mod:`shared.core` for Algorithm 1, :mod:`shared.release` for the surgery and the optimizers at the release,
:mod:`shared.families` for the late-phase weight families (and how to write one), :mod:`shared.modules` for the
member-aware layers and :func:`member_mode`, :mod:`shared.averaging` for weight averaging and ensembles (one
BatchNorm rule), :mod:`shared.swa`, :mod:`shared.checkpoint` and :mod:`shared.distributed`.
"""
from .averaging import collapse, ensemble_logits, ensemble_probs, update_bn
from .batching import stack_batches
from .checkpoint import CheckpointError, load, save
from .core import LatePhase
from .errors import LatePhaseError
from .families import BatchNorm, Custom, Family, Head, Hypernetwork, Rank1, Selection
from .modules import LateModule, member_mode
from .release import sgd
from .swa import SWA

__all__ = ["LatePhase", "LatePhaseError", "sgd", "BatchNorm", "Head", "Rank1", "Hypernetwork", "Custom", "Family",
           "Selection", "LateModule", "member_mode", "stack_batches", "collapse", "ensemble_logits", "ensemble_probs",
           "update_bn", "SWA", "save", "load", "CheckpointError"]
