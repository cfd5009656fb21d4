"""Member-aware modules: one layer's late-phase weights phi_1..phi_K and its two modes.

Every member-aware module (a :class:`LateModule`) has ``K`` members and an attribute ``member``:

* ``member = k`` ("member k" mode): the input is member k's minibatch; the layer uses phi_k.
* ``member = None`` ("stacked" mode): the input holds K equal slices along dim 0 (N = K B; slice k is member k's
  minibatch); slice k uses phi_k, and batch statistics are computed per slice.

:func:`member_mode` switches a whole model between the modes (and restores the previous ones afterwards).

A forward in stacked mode therefore computes, slice by slice, exactly what K forwards in member mode compute (tested),
which is what makes the vectorized path of Algorithm 1 exact. Wrapped layers keep their theta tensors as the same
Parameter objects (a hypernetwork layer's weight W becomes sum_j T_j c_j: its template bank T is a new theta
tensor); each member's phi tensors are separate Parameters (one ``nn.ParameterList`` entry per member), so
each member can have its own optimizer over its own tensors.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .distributed import BATCHNORM_TYPES, _dense_format, batch_norm_over_ranks
from .errors import LatePhaseError

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_EXACT = (torch.float32, torch.float64)


def stacked_rows(x: torch.Tensor, K: int, rows: int | None, where: str) -> int:
    """Per-member minibatch size B of a stacked-mode input x whose dim 0 holds K B rows (member k: rows k B..(k+1) B-1).

    ``rows`` is the size of the stacked batch the model was called with (set by :func:`member_mode`; None when
    unknown). A late-phase layer must see that batch in dim 0: a 3-D or larger input whose dim 0 is not ``rows`` holds
    e.g. time-major activations (T, N, ...), whose member slices are not along dim 0, so it is refused rather than
    split along time. A 2-D input may hold a multiple of ``rows`` (a batch-major flattening (N T, H) keeps the member
    slices contiguous); a time-major flattening (T N, H) cannot be told apart and must be avoided by the model."""
    n = x.shape[0]
    if rows is not None and n != rows and not (x.dim() == 2 and n % rows == 0):
        raise LatePhaseError(f"{where}: dim 0 of its input has {n} entries but the stacked batch has {rows} (K={K} "
                             f"member minibatches); the vectorized path needs the batch in dim 0 of every late-phase "
                             f"layer's input -- for time-major activations use batch-first layers (e.g. "
                             f"nn.LSTM(batch_first=True)) or path='sequential'")
    if n % K:
        raise LatePhaseError(f"{where}: a stacked batch of {n} samples does not split into K={K} equal member "
                             f"minibatches; give K*B samples along dim 0")
    return n // K


NOT_A_NETWORK = ("after the release the model holds K members, so a plain forward is refused: evaluate with "
                 "lp.collapse() (one network, the mean phi), lp.ensemble_probs(x) (the ensemble) or "
                 "`with shared.member_mode(lp.model, k):` (member k); training steps go through lp.step")


def _members_of(p: torch.Tensor, K: int, requires_grad: bool | None = None) -> nn.ParameterList:
    grad = p.requires_grad if requires_grad is None else requires_grad
    return nn.ParameterList([nn.Parameter(p.detach().clone(), requires_grad=grad) for _ in range(K)])


def _stack(plist: nn.ParameterList) -> torch.Tensor:
    return torch.stack(list(plist))


def _mean(plist: nn.ParameterList, members: Sequence[int]) -> torch.Tensor:
    """phi_bar = (1/|S|) sum_{k in S} phi_k over the chosen members S."""
    return torch.stack([plist[k].detach() for k in members]).mean(0)


class LateModule(nn.Module):
    """Base of the member-aware modules: K members, the mode attribute ``member`` and the phi tensors.

    The contract a member-aware layer fulfils (all that :class:`shared.LatePhase` relies on):

    * ``K`` and ``member`` (set by :func:`member_mode`): k runs member k on its own minibatch; None runs the stacked
      batch, slice k with phi_k, and must compute slice by slice exactly what member mode computes (use
      :meth:`stacked_rows` to get the per-member size B; it also refuses inputs whose dim 0 is not the batch, and any
      stacked forward outside :func:`member_mode` after the release);
    * :meth:`phi_lists`: (name, ``nn.ParameterList`` of K Parameters) per late-phase tensor; a name equal to the name of
      a parameter the family selected ties the copies to that original (its pre-T0 optimizer state and hyperparameters
      are inherited); other names are new tensors (e.g. rank-1 factors);
    * ``to_plain(members)``: the layer of the original class with phi_bar = mean over ``members``.

    Subclasses list the attribute names of their per-member ``ParameterList``s in ``_phi_attrs`` (or override
    :meth:`phi_lists`).
    """

    _phi_attrs: tuple = ()

    def __init__(self, K: int):
        super().__init__()
        self.K = int(K)
        self.member: int | None = None
        self.rows: int | None = None  # size of the stacked batch of the current forward (set by member_mode)
        # False after the release (set by LatePhase) until member_mode sets a mode: a forward of the model the user
        # holds would silently compute K networks on slices of the batch, so it is refused (see stacked_rows)
        self.mode_set = True

    def phi_lists(self) -> list[tuple[str, nn.ParameterList]]:
        """(name, ParameterList over members) for every late-phase tensor of this layer, in a fixed order."""
        return [(name, getattr(self, name)) for name in self._phi_attrs if getattr(self, name) is not None]

    def phi(self, k: int) -> list[nn.Parameter]:
        """Member k's late-phase Parameters phi_k (in the order of :meth:`phi_lists`)."""
        return [plist[k] for _, plist in self.phi_lists()]

    def stacked_rows(self, x: torch.Tensor) -> int:
        """B for a stacked-mode input x of K B rows (see :func:`stacked_rows`); refuses a forward outside
        :func:`member_mode` after the release."""
        if not self.mode_set:
            raise LatePhaseError(NOT_A_NETWORK)
        return stacked_rows(x, self.K, self.rows, type(self).__name__)

    def extra_repr(self) -> str:
        return f"K={self.K}, member={'stacked' if self.member is None else self.member}"


# ----------------------------------------------------------------------------- BatchNorm

def _into(result: torch.Tensor, out: torch.Tensor) -> None:
    """Make sure an out= kernel's result landed in ``out`` (a kernel may reallocate an out tensor)."""
    if result.data_ptr() != out.data_ptr() or result.stride() != out.stride():
        out.copy_(result)


class _SliceBatchNorm(torch.autograd.Function):
    """Batch normalisation of the K equal slices of x (dim 0), each with its own batch statistics, affine map and
    running statistics, using nn.BatchNorm's own kernels slice by slice. For slice k (n values per channel):

        mu_kc = mean x_k,  var_kc = biased variance of x_k,  y_k = w_kc (x_k - mu_kc) / sqrt(var_kc + eps) + b_kc,

    and, where a slice gets running statistics (r_mean, r_var, m), r <- (1 - m) r + m s with the unbiased variance,
    exactly as F.batch_norm. One autograd node for the stacked batch, so the input gradient is assembled in one tensor
    (slicing a tensor in autograd would allocate a full-size gradient per slice); the output is written into one
    tensor slice by slice. No transposing copies; the layout is kept (channels_last stays channels_last).
    ``stats`` lists (running_mean, running_var, momentum) per slice, the tensors possibly shared or None.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, K, eps, stats):
        B = x.shape[0] // K
        y = torch.empty_like(x)
        pick = (lambda t, k: None if t is None else t[k])
        save_mean = save_invstd = None
        for k in range(K):
            sl = slice(k * B, (k + 1) * B)
            rm, rv, m = stats[k]
            if k == 0:  # the functional kernel tells the statistics' dtype (float32 for low-precision input)
                yk, mean0, invstd0 = torch.native_batch_norm(x[sl], pick(weight, 0), pick(bias, 0), rm, rv, True, m,
                                                             eps)
                y[sl].copy_(yk)
                save_mean = mean0.new_empty((K, *mean0.shape))
                save_invstd = invstd0.new_empty((K, *invstd0.shape))
                save_mean[0], save_invstd[0] = mean0, invstd0
                continue
            out = torch.ops.aten.native_batch_norm.out(x[sl], pick(weight, k), pick(bias, k), rm, rv, True, m, eps,
                                                       out=y[sl], save_mean=save_mean[k], save_invstd=save_invstd[k])
            _into(out[0], y[sl])
            _into(out[1], save_mean[k])
            _into(out[2], save_invstd[k])
        ctx.save_for_backward(x, weight, save_mean, save_invstd)
        ctx.K, ctx.eps, ctx.has_bias = K, eps, bias is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        x, weight, save_mean, save_invstd = ctx.saved_tensors
        K = ctx.K
        B = x.shape[0] // K
        gy = gy.contiguous(memory_format=_dense_format(x))
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_w, need_b = need_w and weight is not None, need_b and ctx.has_bias
        gx = torch.empty_like(x) if need_x else None
        C = x.shape[1]
        gw = x.new_empty((K, C), dtype=weight.dtype if weight is not None else save_mean.dtype)
        gb = torch.empty_like(gw)
        mask = [bool(need_x), bool(need_w), bool(need_b)]
        for k in range(K):
            sl = slice(k * B, (k + 1) * B)
            gxk, gwk, gbk = torch.ops.aten.native_batch_norm_backward(
                gy[sl], x[sl], None if weight is None else weight[k], None, None, save_mean[k], save_invstd[k], True,
                ctx.eps, mask)
            if need_x:
                gx[sl].copy_(gxk)
            if need_w:
                gw[k].copy_(gwk)
            if need_b:
                gb[k].copy_(gbk)
        return (gx if need_x else None, gw if need_w else None, gb if need_b else None, None, None, None)


def _traced_slices(x, weight, bias, K, eps, stats):
    """What :class:`_SliceBatchNorm` computes, in plain tensor operations that torch.compile traces into its graph
    (the eager Function writes each slice into preallocated tensors through out= kernels, which dynamo cannot trace:
    it would break the graph at every late-phase BatchNorm layer and recompile the code between the breaks once per
    layer). Slice k of x, viewed as (K, B, C, rest): mu_kc, var_kc = mean and biased variance over B and rest (n
    values), y = w_kc (x - mu_kc) / sqrt(var_kc + eps) + b_kc, and r <- (1 - m) r + m s with s = mu_kc and the
    unbiased variance var_kc n / (n - 1), in the order of ``stats``. Statistics in float32 or better, as nn.BatchNorm
    computes them for bf16 input. Equal to the eager Function up to float rounding (tested)."""
    C = x.shape[1]
    xs = x.reshape(K, x.shape[0] // K, C, -1)
    if x.dtype not in _EXACT:
        xs = xs.float()
    var, mean = torch.var_mean(xs, dim=(1, 3), correction=0, keepdim=True)
    y = (xs - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.reshape(K, 1, C, 1)
    if bias is not None:
        y = y + bias.reshape(K, 1, C, 1)
    n = xs.shape[1] * xs.shape[3]
    with torch.no_grad():
        for k, (rm, rv, m) in enumerate(stats):
            if rm is not None:
                rm.mul_(1 - m).add_(mean[k].reshape(C), alpha=m)
                rv.mul_(1 - m).add_(var[k].reshape(C), alpha=m * n / max(n - 1, 1))
    return y.to(x.dtype).reshape(x.shape)


class LateBatchNorm(LateModule):
    """BatchNorm with per-slice statistics in stacked mode; late (phi) or shared (theta) scale and shift.

    Member k in training mode: mu_k, var_k = mean and biased variance of x over (batch, spatial) positions of member
    k's minibatch (n values per channel);  y = gamma_k (x - mu_k) / sqrt(var_k + eps) + beta_k;  running statistics
    r <- (1 - m) r + m s with s = mu_k and the unbiased variance var_k n / (n - 1), where m = momentum, or
    m = 1 / num_batches_tracked when momentum is None (cumulative average). Eval mode uses the running statistics.
    Exactly nn.BatchNorm's semantics, applied to member k.

    late=True: gamma, beta (phi) and the running statistics are per member (buffers of shape (K, C) and (K,)).
    late=False: gamma, beta are theta -- the original module's own Parameters and buffers -- and in stacked mode the
    shared running statistics receive the K member updates in the order k = 1..K, as K sequential passes do.
    Stacked mode in training uses nn.BatchNorm's kernels on each slice (see _SliceBatchNorm); eval mode applies the
    running statistics as one scale/shift per member.

    ``sync`` (set by :class:`shared.LatePhase` during its steps under torch.distributed): in training mode the batch
    statistics of each member (each slice in stacked mode) are taken over its whole minibatch on all ranks
    (:func:`shared.distributed.batch_norm_over_ranks`), the single-process protocol; the updates above then use
    those statistics and n is the member's count over all ranks.
    """

    def __init__(self, bn: nn.Module, K: int, late: bool = True):
        super().__init__(K)
        if type(bn) not in BATCHNORM_TYPES:
            raise LatePhaseError(f"{type(bn).__name__} is not nn.BatchNorm1d/2d/3d; convert it to one of those "
                                 f"(e.g. SyncBatchNorm back to BatchNorm2d) before adding late-phase weights")
        self.kind = type(bn)
        self.num_features, self.eps, self.momentum = bn.num_features, bn.eps, bn.momentum
        self.affine, self.track_running_stats, self.late = bn.affine, bn.track_running_stats, late
        self.sync = False
        if late:
            self._phi_attrs = ("weight", "bias") if bn.affine else ()
            self.weight = _members_of(bn.weight, K) if bn.affine else None
            self.bias = _members_of(bn.bias, K) if bn.affine else None
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                buf = getattr(bn, name)
                if buf is not None:
                    buf = buf.detach().clone().unsqueeze(0).repeat(K, *([1] * buf.dim()))
                self.register_buffer(name, buf)
        else:
            self.weight, self.bias = bn.weight, bn.bias
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                self.register_buffer(name, getattr(bn, name))

    # -- member mode: nn.BatchNorm's own code path with member k's tensors
    def _native(self, x, weight, bias, rm, rv, nbt):
        eaf = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and nbt is not None:
            nbt.add_(1)
            eaf = 1.0 / float(nbt) if self.momentum is None else self.momentum
        bn_training = self.training or (rm is None and rv is None)
        track = not self.training or self.track_running_stats
        if self.sync and self.training:
            one = (lambda t: None if t is None else t.unsqueeze(0))
            return batch_norm_over_ranks(x, one(weight), one(bias), 1, self.eps,
                                         [(rm if track else None, rv if track else None, eaf)])
        return F.batch_norm(x, rm if track else None, rv if track else None, weight, bias, bn_training, eaf,
                            self.eps)

    def _member_forward(self, x, k):
        if not self.late:
            return self._native(x, self.weight, self.bias, self.running_mean, self.running_var,
                                self.num_batches_tracked)
        pick = (lambda t: None if t is None else t[k])
        return self._native(x, pick(self.weight), pick(self.bias), pick(self.running_mean),
                            pick(self.running_var), pick(self.num_batches_tracked))

    # -- stacked mode
    def _affine_stacked(self):
        if not self.affine:
            return None, None
        if self.late:
            return _stack(self.weight), _stack(self.bias)
        return self.weight.expand(self.K, -1), self.bias.expand(self.K, -1)

    def _slice_stats(self, update: bool) -> list:
        """(running_mean, running_var, momentum m) for each slice k, in the order the K member passes would update
        them. Late: member k's own rows, m = momentum or 1 / num_batches_tracked_k (after the increment). Shared: the
        same buffers for every slice, m_k = momentum or 1 / (n0 + k) (cumulative average over the K updates)."""
        K, rm, rv, nbt = self.K, self.running_mean, self.running_var, self.num_batches_tracked
        if not update:
            return [(None, None, 0.0)] * K
        if self.late:
            if nbt is not None:
                nbt.add_(1)
            if self.momentum is None:
                counts = nbt.tolist()
                return [(rm[k], rv[k], 1.0 / counts[k]) for k in range(K)]
            return [(rm[k], rv[k], self.momentum) for k in range(K)]
        if self.momentum is None:
            n0 = int(nbt)
            nbt.add_(K)
            return [(rm, rv, 1.0 / (n0 + k + 1)) for k in range(K)]
        if nbt is not None:
            nbt.add_(K)
        return [(rm, rv, self.momentum)] * K

    def _stacked_forward(self, x):
        K, C = self.K, self.num_features
        B = self.stacked_rows(x)
        weight, bias = self._affine_stacked()
        rm, rv = self.running_mean, self.running_var
        if self.training or (rm is None and rv is None):
            update = self.training and self.track_running_stats and rm is not None
            if self.sync and self.training:
                return batch_norm_over_ranks(x, weight, bias, K, self.eps, self._slice_stats(update))
            n = x[:B].numel() // C
            if self.training and n <= 1:
                raise LatePhaseError(f"BatchNorm needs more than 1 value per channel in each member's minibatch when "
                                     f"training (got {n}); use a per-member batch of at least 2")
            if torch.compiler.is_compiling():
                return _traced_slices(x, weight, bias, K, self.eps, self._slice_stats(update))
            return _SliceBatchNorm.apply(x, weight, bias, K, self.eps, self._slice_stats(update))
        x5 = x.reshape(K, B, C, -1)
        invstd = torch.rsqrt(rv + self.eps)
        scale = invstd if weight is None else invstd * weight
        shift = -rm * scale if bias is None else bias - rm * scale
        scale, shift = scale.reshape(-1, 1, C, 1), shift.reshape(-1, 1, C, 1)
        if x.dtype not in _EXACT:
            scale, shift = scale.to(x.dtype), shift.to(x.dtype)
        return torch.addcmul(shift, x5, scale).reshape(x.shape)

    def forward(self, x):
        self.kind._check_input_dim(self, x)
        if self.member is not None:
            return self._member_forward(x, self.member)
        return self._stacked_forward(x)

    def reset_running_stats(self) -> None:
        """Reset every member's running statistics (mean 0, variance 1, count 0)."""
        if self.running_mean is not None:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.zero_()

    def to_plain(self, members: Sequence[int]) -> nn.Module:
        """The original BatchNorm class with gamma_bar, beta_bar = mean over ``members`` and, for stats="mean", the
        mean of the members' running mean and running variance (num_batches_tracked: their maximum)."""
        p = (self.weight[0] if self.late else self.weight) if self.affine else self.running_mean
        kw = {} if p is None else {"device": p.device, "dtype": p.dtype}
        bn = self.kind(self.num_features, self.eps, self.momentum, self.affine, self.track_running_stats, **kw)
        with torch.no_grad():
            if self.affine:
                bn.weight.copy_(_mean(self.weight, members) if self.late else self.weight)
                bn.bias.copy_(_mean(self.bias, members) if self.late else self.bias)
                bn.weight.requires_grad_(self.weight[0].requires_grad if self.late else self.weight.requires_grad)
                bn.bias.requires_grad_(bn.weight.requires_grad)
            if self.running_mean is not None and bn.running_mean is not None:
                if self.late:
                    idx = torch.as_tensor(list(members), device=self.running_mean.device)
                    bn.running_mean.copy_(self.running_mean[idx].mean(0))
                    bn.running_var.copy_(self.running_var[idx].mean(0))
                    if self.num_batches_tracked is not None:
                        bn.num_batches_tracked.copy_(self.num_batches_tracked[idx].max())
                else:
                    bn.running_mean.copy_(self.running_mean)
                    bn.running_var.copy_(self.running_var)
                    if self.num_batches_tracked is not None:
                        bn.num_batches_tracked.copy_(self.num_batches_tracked)
        bn.train(self.training)
        return bn

    def extra_repr(self) -> str:
        return (f"{self.num_features}, K={self.K}, {'late' if self.late else 'shared'}, eps={self.eps}, "
                f"momentum={self.momentum}, affine={self.affine}, "
                f"member={'stacked' if self.member is None else self.member}")


# ----------------------------------------------------------------------------- classifier head

class LateLinear(LateModule):
    """A Linear layer whose weight and bias are late-phase: y = x W_k^T + b_k for member k.

    Stacked mode: one batched matmul over the members' stacked weights, y_k = x_k W_k^T + b_k for each slice. The
    batch is dim 0 (extra dims such as time follow it)."""

    _phi_attrs = ("weight", "bias")

    def __init__(self, linear: nn.Linear, K: int):
        super().__init__(K)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = _members_of(linear.weight, K)
        self.bias = _members_of(linear.bias, K) if linear.bias is not None else None

    def forward(self, x):
        if self.member is not None:
            k = self.member
            return F.linear(x, self.weight[k], None if self.bias is None else self.bias[k])
        K = self.K
        self.stacked_rows(x)
        x3 = x.reshape(K, -1, self.in_features)
        w = _stack(self.weight).transpose(1, 2)
        y = torch.bmm(x3, w) if self.bias is None else torch.baddbmm(_stack(self.bias).unsqueeze(1), x3, w)
        return y.reshape(*x.shape[:-1], self.out_features)

    def to_plain(self, members: Sequence[int]) -> nn.Linear:
        """nn.Linear with W_bar, b_bar = mean over ``members``."""
        w = self.weight[0]
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=w.device,
                        dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(_mean(self.weight, members))
            if self.bias is not None:
                lin.bias.copy_(_mean(self.bias, members))
        lin.requires_grad_(w.requires_grad)
        return lin


# ----------------------------------------------------------------------------- rank-1 factors

class LateRank1(LateModule):
    """Rank-1 multiplicative late-phase factors on a Linear or ConvNd layer (BatchEnsemble style).

    Member k uses W_k = W o (r_k s_k^T): for Linear y = ((x o s_k) W^T) o r_k + b; for ConvNd the input channels are
    scaled by s_k and the output channels by r_k: y = conv(x o s_k, W) o r_k + b. W and b are theta (the original
    layer's Parameters, kept in ``self.base``); r_k (out features/channels) and s_k (in features/channels) are phi,
    initialised to ones, so all members equal the original layer at release.
    """

    _phi_attrs = ("r", "s")

    def __init__(self, layer: nn.Module, K: int):
        super().__init__(K)
        if isinstance(layer, nn.Linear):
            n_out, n_in = layer.out_features, layer.in_features
        elif isinstance(layer, CONV_TYPES):
            if layer.groups != 1:
                raise LatePhaseError(f"rank-1 factors need groups=1 convolutions (got groups={layer.groups}); "
                                     f"exclude this layer from the Rank1 family")
            n_out, n_in = layer.out_channels, layer.in_channels
        else:
            raise LatePhaseError(f"rank-1 factors apply to nn.Linear and nn.Conv1d/2d/3d, not {type(layer).__name__}")
        self.base = layer
        w = layer.weight
        self.r = _members_of(torch.ones(n_out, device=w.device, dtype=w.dtype), K, w.requires_grad)
        self.s = _members_of(torch.ones(n_in, device=w.device, dtype=w.dtype), K, w.requires_grad)

    def forward(self, x):
        base = self.base
        if self.member is not None:  # member mode = stacked mode with one slice
            K, s, r = 1, self.s[self.member].unsqueeze(0), self.r[self.member].unsqueeze(0)
        else:
            K, s, r = self.K, _stack(self.s), _stack(self.r)
            self.stacked_rows(x)
        bias = base.bias
        if x.dtype not in _EXACT:  # under autocast keep the activations in their low precision
            s, r = s.to(x.dtype), r.to(x.dtype)
            bias = None if bias is None else bias.to(x.dtype)
        if isinstance(base, nn.Linear):
            x3 = x.reshape(K, -1, base.in_features)
            y = F.linear(x3 * s.unsqueeze(1), base.weight)
            y = y * r.unsqueeze(1) if bias is None else torch.addcmul(bias, y, r.unsqueeze(1))
            return y.reshape(*x.shape[:-1], base.out_features)
        tail = [1] * (x.dim() - 2)
        B = x.shape[0] // K
        xs = (x.reshape(K, B, *x.shape[1:]) * s.reshape(K, 1, -1, *tail)).reshape(x.shape)
        y = base._conv_forward(xs, base.weight, None)
        y5 = y.reshape(K, B, *y.shape[1:])
        r5 = r.reshape(K, 1, -1, *tail)
        y5 = y5 * r5 if bias is None else torch.addcmul(bias.reshape(-1, *tail), y5, r5)
        return y5.reshape(y.shape)

    def to_plain(self, members: Sequence[int]) -> nn.Module:
        """The original layer with W o (r_bar s_bar^T) folded in (r_bar, s_bar: means over ``members``)."""
        layer = copy.deepcopy(self.base)
        r, s = _mean(self.r, members), _mean(self.s, members)
        tail = [1] * (layer.weight.dim() - 2)
        with torch.no_grad():
            layer.weight.mul_(r.reshape(-1, 1, *tail) * s.reshape(1, -1, *tail))
        return layer


# ----------------------------------------------------------------------------- hypernetwork: template banks

def template_bank(weights: Sequence[torch.Tensor], J: int, generator: torch.Generator | None = None) -> nn.Parameter:
    """The template bank T_1..T_J of the n = len(weights) layers that share it: one Parameter of shape (J, *W.shape)
    (theta) with

        T_i = W_i (i = 1..n, layer i's trained weight),   T_j ~ N(0, 2 / fan_in) (j = n+1..J),

    the new templates drawn kaiming-normal (ReLU gain, fan_in = W[0].numel()), as the reference draws every template.
    With the coefficients c_i = e_i, layer i's weight sum_j T_j c_ij = W_i is reproduced exactly."""
    n = len(weights)
    if n == 0 or not n <= J:
        raise LatePhaseError(f"a template bank for {n} layers needs J >= {max(n, 1)} templates, got J={J}")
    w0 = weights[0]
    if any(w.shape != w0.shape or w.dtype != w0.dtype or w.device != w0.device for w in weights):
        raise LatePhaseError("the layers sharing a template bank need weights of one shape, dtype and device; "
                             "use share=False")
    with torch.no_grad():
        std = (2.0 / max(1, w0[0].numel())) ** 0.5
        extra = torch.randn((J - n, *w0.shape), generator=generator, dtype=w0.dtype).mul_(std)
        T = torch.cat([torch.stack([w.detach() for w in weights]), extra.to(w0.device)])
    return nn.Parameter(T, requires_grad=w0.requires_grad)


class LateHyper(LateModule):
    """A Linear or ConvNd layer whose weight a linear hypernetwork generates from a template bank (the reference's
    hypernetwork late-phase weights): member k uses

        W_k = sum_{j=1..J} T_j c_kj,

    with the templates T (``self.T``, shape (J, *W.shape), theta, possibly shared with the other layers of the same
    weight shape, see :func:`template_bank`) and member k's coefficients c_k in R^J (``self.c``, phi), initialised to
    e_i, the unit vector that picks this layer's own template T_i = W, so every member starts as the original layer.
    The bias b stays theta (the original Parameter, in ``self.base``; the original weight Parameter is removed from
    it, W being sum_j T_j c_j now).

    Stacked mode: the K weights in one matrix product, (W_1; ...; W_K) = C T with C = (c_1; ...; c_K) (K x J); then
    Linear: one batched matmul, y_k = x_k W_k^T + b; ConvNd: one convolution with groups = K g (g: the layer's groups)
    over the K slices moved into the channel dim, (K B, C_in, ...) -> (B, K C_in, ...), so that group k g + h of the
    stacked call is group h of member k: y_k = conv(x_k, W_k) + b. The memory format (channels_last) is kept.
    """

    _phi_attrs = ("c",)

    def __init__(self, layer: nn.Module, K: int, T: nn.Parameter, index: int):
        super().__init__(K)
        if not isinstance(layer, (nn.Linear,) + CONV_TYPES):
            raise LatePhaseError(f"hypernetwork weights apply to nn.Linear and nn.Conv1d/2d/3d, not "
                                 f"{type(layer).__name__}")
        w = layer.weight
        if tuple(T.shape[1:]) != tuple(w.shape) or not 0 <= index < T.shape[0]:
            raise LatePhaseError(f"template bank of shape {tuple(T.shape)} does not fit a weight of shape "
                                 f"{tuple(w.shape)} at template {index}")
        self.base = layer
        del layer._parameters["weight"]
        self.T = T
        self.index = int(index)
        e = torch.zeros(T.shape[0], dtype=w.dtype, device=w.device)
        e[self.index] = 1
        self.c = _members_of(e, K, w.requires_grad)

    @property
    def J(self) -> int:
        return self.T.shape[0]

    def weights(self, members: Sequence[int] | None = None) -> torch.Tensor:
        """W_k = sum_j T_j c_kj for k in ``members`` (default: all K), stacked: shape (len(members), *W.shape)."""
        C = _stack(self.c) if members is None else torch.stack([self.c[k] for k in members])
        return (C @ self.T.flatten(1)).view(C.shape[0], *self.T.shape[1:])

    def forward(self, x):
        base = self.base
        if self.member is not None:
            w = self.weights([self.member])[0]
            return F.linear(x, w, base.bias) if isinstance(base, nn.Linear) else base._conv_forward(x, w, base.bias)
        K = self.K
        B = self.stacked_rows(x)
        w = self.weights()
        if isinstance(base, nn.Linear):
            x3 = x.reshape(K, -1, base.in_features)
            wt = w.transpose(1, 2)
            y = torch.bmm(x3, wt) if base.bias is None else torch.baddbmm(base.bias, x3, wt)
            return y.reshape(*x.shape[:-1], base.out_features)
        return self._grouped_conv(x, w.flatten(0, 1), K, B)

    def _grouped_conv(self, x: torch.Tensor, w: torch.Tensor, K: int, B: int) -> torch.Tensor:
        """y_k = conv(x_k, W_k) + b for every slice k of x, as one convolution with groups = K g; ``w`` holds
        (W_1; ...; W_K) along dim 0."""
        base = self.base
        C, S = x.shape[1], x.shape[2:]
        xg = torch.empty((B, K * C, *S), dtype=x.dtype, device=x.device, memory_format=_dense_format(x))
        xg.view(B, K, C, *S).copy_(x.reshape(K, B, C, *S).transpose(0, 1))
        padding = base.padding
        if base.padding_mode != "zeros":
            xg = F.pad(xg, base._reversed_padding_repeated_twice, mode=base.padding_mode)
            padding = 0
        conv = (F.conv1d, F.conv2d, F.conv3d)[len(base.kernel_size) - 1]
        bias = None if base.bias is None else base.bias.repeat(K)
        yg = conv(xg, w, bias, base.stride, padding, base.dilation, K * base.groups)
        n_out, S_out = base.out_channels, yg.shape[2:]
        y = torch.empty((K * B, n_out, *S_out), dtype=yg.dtype, device=yg.device, memory_format=_dense_format(yg))
        y.view(K, B, n_out, *S_out).copy_(yg.reshape(B, K, n_out, *S_out).transpose(0, 1))
        return y

    def to_plain(self, members: Sequence[int]) -> nn.Module:
        """The original layer class with W_bar = sum_j T_j c_bar_j, c_bar = mean of c_k over ``members``; W is linear
        in c, so W_bar = (1/|S|) sum_{k in S} W_k, the members' mean weight (the bias b is theta, unchanged)."""
        layer = copy.deepcopy(self.base)
        T = self.T.detach()
        w = (_mean(self.c, members) @ T.flatten(1)).view(T.shape[1:])
        layer.weight = nn.Parameter(w, requires_grad=self.T.requires_grad)
        return layer

    def extra_repr(self) -> str:
        mode = "stacked" if self.member is None else self.member
        return f"J={self.J}, template={self.index}, K={self.K}, member={mode}"


# ----------------------------------------------------------------------------- custom selection

class LateCustom(LateModule):
    """Any module whose selected parameters are late-phase: member k runs ``inner`` with phi_k substituted
    (torch.func.functional_call); stacked mode vectorizes the K members with torch.vmap over (phi_k, slice k).

    In stacked mode the first positional argument is split into K slices along dim 0 (other arguments are passed to
    every member unchanged) and tensor outputs are merged back along dim 0. The module must have no buffers: mutable
    state such as BatchNorm statistics needs a member-aware module (the BatchNorm family).
    """

    def __init__(self, inner: nn.Module, names: Sequence[str], K: int):
        super().__init__(K)
        buffers = [n for n, _ in inner.named_buffers()]
        if buffers:
            raise LatePhaseError(f"the Custom family cannot replicate {type(inner).__name__}: it has buffers "
                                 f"{buffers[:3]} (mutable state); use the BatchNorm family for BatchNorm layers")
        self.names = list(names)
        self.inner = inner
        lists = {}
        for name in self.names:
            owner_name, _, leaf = name.rpartition(".")
            owner = inner.get_submodule(owner_name)
            p = owner._parameters[leaf]
            lists[name.replace(".", "-")] = _members_of(p, K)
            del owner._parameters[leaf]
        self.phi_members = nn.ModuleDict(lists)

    def phi_lists(self) -> list[tuple[str, nn.ParameterList]]:
        return [(name, self.phi_members[name.replace(".", "-")]) for name in self.names]

    def forward(self, *args, **kwargs):
        if self.member is not None:
            k = self.member
            params = {name: plist[k] for name, plist in self.phi_lists()}
            return torch.func.functional_call(self.inner, params, args, kwargs)
        K = self.K
        x = args[0]
        B = self.stacked_rows(x)
        stacked = {name: _stack(plist) for name, plist in self.phi_lists()}
        rest = args[1:]

        def one(params, xk):
            return torch.func.functional_call(self.inner, params, (xk, *rest), kwargs)

        try:
            out = torch.vmap(one, in_dims=(0, 0), randomness="different")(stacked, x.reshape(K, B, *x.shape[1:]))
        except RuntimeError as e:
            raise LatePhaseError(f"{type(self.inner).__name__} could not be vectorized over members with torch.vmap "
                                 f"({str(e).splitlines()[0]}); use path='sequential'") from e
        return _merge_members(out)

    def to_plain(self, members: Sequence[int]) -> nn.Module:
        """A copy of the original module with phi_bar = mean over ``members`` put back in place."""
        inner = copy.deepcopy(self.inner)
        for name, plist in self.phi_lists():
            owner_name, _, leaf = name.rpartition(".")
            p = nn.Parameter(_mean(plist, members).clone(), requires_grad=plist[0].requires_grad)
            inner.get_submodule(owner_name).register_parameter(leaf, p)
        return inner


def _merge_members(out):
    """(K, B, ...) -> (K B, ...) for a tensor or a tuple/list of tensors (other values pass through)."""
    if isinstance(out, torch.Tensor):
        return out.reshape(out.shape[0] * out.shape[1], *out.shape[2:])
    if isinstance(out, (tuple, list)):
        return type(out)(_merge_members(o) for o in out)
    return out


def late_modules(model: nn.Module) -> list[tuple[str, LateModule]]:
    """(name, module) for every member-aware module of ``model``, in registration order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LateModule)]


def set_member(modules, member: int | None, rows: int | None = None) -> None:
    """Put the member-aware ``modules`` (a model, or a list of LateModules) in member mode (``member = k``) or stacked
    mode (``None``; ``rows``: the size of the stacked batch, checked by the layers)."""
    if isinstance(modules, nn.Module):
        modules = [m for _, m in late_modules(modules)]
    for m in modules:
        m.member, m.rows, m.mode_set = member, rows, True


def refuse_plain_forward(model: nn.Module) -> None:
    """After the release: a forward of ``model`` in stacked mode outside :func:`member_mode` (or a step) raises
    LatePhaseError naming the ways to evaluate, instead of computing K networks on slices of the batch."""
    for _, m in late_modules(model):
        m.member, m.rows, m.mode_set = None, None, False


@contextlib.contextmanager
def member_mode(model: nn.Module, member: int | None, rows: int | None = None):
    """Run ``model`` as member k (``member_mode(model, k)``) or in stacked mode (``member_mode(model, None)``) inside
    the ``with`` block; every member-aware layer's previous mode is restored afterwards.

    Example::

        with shared.member_mode(lp.model, 2):
            logits = lp.model(x)          # member 2's network on x

    ``rows`` (stacked mode): the size of the stacked batch the block feeds, so that the layers can refuse inputs whose
    dim 0 is not that batch (see :func:`stacked_rows`)."""
    mods = [m for _, m in late_modules(model)]
    if member is not None and mods and not 0 <= member < mods[0].K:
        raise LatePhaseError(f"member must be in 0..{mods[0].K - 1} or None (stacked), got {member}")
    prev = [(m.member, m.rows, m.mode_set) for m in mods]
    set_member(mods, member, rows)
    try:
        yield model
    finally:
        for m, (k, r, on) in zip(mods, prev):
            m.member, m.rows, m.mode_set = k, r, on
