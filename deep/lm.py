"""Training of the enwik8 character LSTM with rank-1 multiplicative late-phase weights (`python -m deep train
--config enwik8_lstm_*`).

Model: :class:`deep.models.lstm.CharLSTM` (256 byte symbols, embedding 190, one LSTM layer of 500 units, untied
decoder: 1.56 M parameters, no regularisation). Data: enwik8 split into the standard 90M/5M/5M bytes (or
``text_split`` for another text), truncated BPTT over ``batch_size`` contiguous columns of the training stream in
windows of ``bptt`` characters (:class:`deep.data.text.BPTTBatcher`; the first window of each epoch has a random
length so the truncation points move). The LSTM state is carried from window to window (detached) and reset at the
start of every epoch. Optimiser: plain SGD (``lr``, no momentum), gradient-norm clipping ``grad_clip``, the
"annealing" learning-rate schedule per epoch (:func:`deep.config.annealing_lr`).

Late-phase weights (family ``rank1``): every weight matrix of the LSTM cell (``cell.input_proj`` = W_ih and
``cell.hidden_proj`` = W_hh) gets rank-1 multiplicative factors, W_k = W o (r_k s_k^T), r_k and s_k initialised to ones
at the release (:class:`shared.Rank1`). ``enwik8_lstm_rank1`` trains one set of factors from the start (K = 1: no
ensembling); ``enwik8_lstm_lp`` trains the plain LSTM until epoch T0 and then K members. Members and the BPTT
state: member k owns a fixed contiguous block of ``batch_size`` rows of every window (its own columns of the
stream; with ``rotate_members`` member k reads column block (k + epoch) mod K), so an outer step of Algorithm 1 is
one window of K * batch_size rows, and the rows of the carried state that belong to member k continue member k's own
columns. :class:`StatefulLM` keeps that state inside the model, so the vectorized path (one stacked forward, member k
on rows k*B..(k+1)*B-1) and the sequential path (member k's rows alone) carry it the same way; they are equal in
float64 (tested).

Gradient clipping after the release acts on the *mean member's* gradient (:meth:`shared.LatePhase.clip_grad_norm_`):
its norm is sqrt(|theta.grad / K|^2 + (1/K) sum_k |phi_k.grad|^2) (theta.grad holds sum_k grad_theta L(M_k)), and all
gradients are scaled by min(1, grad_clip / (norm + 1e-6)), as torch.nn.utils.clip_grad_norm_ does. For K = 1 this is
clip_grad_norm_ over all parameters; for identical members it is the base model's clip of one member's gradient.

SWA (``_swa`` presets): from ``swa_start`` the learning rate is constant (``swa_lr``) and all weights -- theta and
every member's factors -- are averaged once per epoch (equal weights); there is no BatchNorm to re-estimate.

Evaluation: bits per character (mean next-byte cross-entropy / ln 2) on the validation and the test part, each
streamed in ``eval_batch_size`` columns with the state carried across windows from a zero start (the last
< eval_batch_size bytes of a part are not predicted). Models: "averaged" (the rank-1 factors averaged over members
and folded into the weights, W o (r_bar s_bar^T): one plain LSTM), "ensemble" (the mean of the K members'
predicted probabilities, each member with its own state) and every member. Each epoch logs the averaged model's
validation bits per character (and the ensemble's).

The hyperparameters of the presets (lr 1.0, clip 1.0, batch 32 per member, bptt 100, 20 epochs, annealing from epoch
10 to 0.1, T0 = 10, gamma_theta = 1, SWA from epoch 15 at lr 0.1) are this project's choices: the paper gives the
model size and the results only.

Outputs as for the image runs: config.json, log.jsonl, checkpoint.pt (atomic, after every epoch; resume is
bit-identical on the CPU), results.json (models.{averaged, ensemble, members}.stored hold bpc_valid and bpc_test;
the model has no BatchNorm, so there is one rule). Under torchrun each member's rows are split over the ranks (each rank carries the state of
its rows); the evaluation columns are split over the ranks and the sums reduced.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import shared
from shared import distributed as dist_utils
from shared.core import maybe_autocast
from shared.modules import late_modules, member_mode

from .config import TextConfig
from .errors import DataError, DeepError
from .data.text import VOCAB_SIZE, BPTTBatcher, bits_per_character, download_enwik8, load_enwik8
from .models.lstm import CharLSTM, parameter_count
from .trainer import Trainer

# ----------------------------------------------------------------------------- the stateful model

class StatefulLM(CharLSTM):
    """A CharLSTM that carries its LSTM state (h, c) from call to call: ``forward(inputs (N, T)) -> logits
    (N, T, V)``, the state of the N rows continuing from the previous call.

    ``reset(rows)`` starts ``rows`` zero states. When the model carries late-phase layers in member mode k (the
    sequential path of :class:`shared.LatePhase`), the input is member k's block of rows and only rows
    k*N..(k+1)*N-1 of the state are used and advanced; in stacked mode (or without late-phase layers) all rows are.
    The state is detached after every call (truncated BPTT) and is not part of the state_dict."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.carry: tuple[torch.Tensor, torch.Tensor] | None = None

    def reset(self, rows: int) -> None:
        self.carry = self.init_state(rows)

    def _member(self) -> int | None:
        for _, m in late_modules(self):
            return m.member
        return None

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.carry is None:
            raise ValueError("StatefulLM: call reset(rows) before the first window")
        h, c = self.carry
        member, n = self._member(), inputs.shape[0]
        if member is None:
            if n != h.shape[0]:
                raise ValueError(f"StatefulLM carries {h.shape[0]} rows but got {n}; reset(rows) first")
            logits, (h2, c2) = super().forward(inputs, (h, c))
            self.carry = (h2.detach(), c2.detach())
            return logits
        rows = slice(member * n, (member + 1) * n)
        if rows.stop > h.shape[0]:
            raise ValueError(f"StatefulLM carries {h.shape[0]} rows, too few for member {member}'s {n} rows")
        logits, (h2, c2) = super().forward(inputs, (h[rows], c[rows]))
        h, c = h.clone(), c.clone()
        h[rows], c[rows] = h2.detach(), c2.detach()
        self.carry = (h, c)
        return logits


def sequence_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy (nats) over all positions of a (N, T, V) window."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


@torch.no_grad()
def stream_nats(model: StatefulLM, data: torch.Tensor, rows: int, bptt: int, members: int = 0,
                autocast=None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Sum of next-byte negative log-likelihoods (nats) over a stream cut into ``rows`` columns, state carried.

    members = 0: ``model`` is a plain network; returns (sum (1,), empty, count). members = K: ``model`` carries K
    late-phase members and runs in stacked mode on K copies of each window; returns (per-member sums (K,), ensemble
    sum (1,) of -log((1/K) sum_k p_k), count). Under torchrun every rank takes every world-th column and the sums
    are reduced."""
    device = next(model.parameters()).device
    rows = max(1, min(rows, data.numel() - 1))
    batcher = BPTTBatcher(data, rows, bptt, device=device)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist_utils.is_distributed() else (0, 1)
    mine = torch.arange(rows, device=device)[rank::world]
    K = max(members, 1)
    was, saved = model.training, model.carry
    model.eval()
    model.reset(K * mine.numel())
    sums = torch.zeros(K, dtype=torch.float64, device=device)
    ens = torch.zeros(1, dtype=torch.float64, device=device)
    count = 0
    try:
        with member_mode(model, None):
            for x, y in batcher:
                x, y = x[mine], y[mine]
                count += y.numel()
                if not y.numel():
                    continue
                with maybe_autocast(device, autocast):
                    logits = model(torch.cat([x] * K) if members else x)
                logp = torch.log_softmax(logits.float(), -1).reshape(K, *y.shape, -1)
                target = logp.gather(-1, y.expand(K, *y.shape).unsqueeze(-1)).squeeze(-1)  # (K, r, T)
                sums -= target.double().sum((1, 2))
                if members:
                    ens -= (torch.logsumexp(target.double(), 0) - math.log(K)).sum()
    finally:
        model.carry = saved
        model.train(was)
    total = torch.tensor([count], dtype=torch.float64, device=device)
    if world > 1:
        for t in (sums, ens, total):
            dist.all_reduce(t)
    return sums, ens, int(total.item())


def bpc(nats: torch.Tensor | float, count: int) -> float:
    """Bits per character of a sum of ``nats`` over ``count`` predicted characters."""
    return float(bits_per_character(float(nats) / count))


# ----------------------------------------------------------------------------- the run

class LMRun(Trainer):
    """One enwik8 run on the trainer of :mod:`deep.trainer` (see the module doc)."""

    UNIT = "chars"
    METRIC = ("bpc_valid", "valid {:.3f} bpc")
    loss_fn = staticmethod(sequence_loss)

    def __init__(self, cfg: TextConfig, *args, **kwargs):
        super().__init__(cfg, *args, **kwargs)
        if cfg.batch_size % self.world:
            raise DeepError(f"batch_size {cfg.batch_size} (rows per member) must be divisible by the {self.world} "
                            f"ranks")

    def load_data(self) -> None:
        cfg = self.cfg
        path = Path(self.data_dir).expanduser()
        if self.download and not path.is_file():
            download_enwik8(path)
        split = tuple(cfg.text_split) if cfg.text_split else "enwik8"
        train, valid, test = load_enwik8(path, split)
        if cfg.train_subset:
            train = train[:cfg.train_subset]
        if cfg.test_subset:
            valid, test = valid[:cfg.test_subset], test[:cfg.test_subset]
        self.train_data, self.valid_data, self.test_data = train, valid, test
        rows = cfg.batch_size * cfg.members
        if (train.numel() - 1) // rows < 1:
            raise DataError(f"the training text ({train.numel()} bytes) is too short for {rows} rows")

    def memory_needs(self) -> list:
        cfg = self.cfg
        H, E = cfg.hidden_size, cfg.embedding_dim
        params = parameter_count(VOCAB_SIZE, E, H)
        element = 2 if self.amp else 4
        rows = max(cfg.members * cfg.batch_size // self.world, 1)
        window = min(cfg.bptt, max((self.train_data.numel() - 1) // rows, 1))
        eval_rows = max(min(cfg.eval_batch_size, self.valid_data.numel() - 1), 1) * cfg.members
        eval_window = min(cfg.bptt, max((self.valid_data.numel() - 1) // eval_rows, 1))
        copies = 2 + (cfg.momentum > 0) + cfg.swa  # weights, gradients, momentum, the SWA average
        # per position: the embedding, four gates, h and c, the logits and their gradient
        return [(f"the LSTM weights ({params:,} parameters) with gradients and momentum", 4 * copies * params,
                 "--hidden-size, --embedding-dim"),
                (f"the activations of {rows} rows x {window} characters per step",
                 element * rows * window * (E + 6 * H + 2 * VOCAB_SIZE), "--batch-size, --K, --bptt, --hidden-size"),
                (f"evaluation windows of {eval_rows} rows", 4 * 2 * eval_rows * eval_window * VOCAB_SIZE,
                 "--eval-batch-size, --bptt")]

    def build_model(self) -> nn.Module:
        return StatefulLM(VOCAB_SIZE, self.cfg.embedding_dim, self.cfg.hidden_size).to(self.device)

    def _batcher(self, members: int) -> BPTTBatcher:
        """Training windows of members * batch_size rows (member k: its own block of rows)."""
        cfg = self.cfg
        return BPTTBatcher(self.train_data, cfg.batch_size * members, cfg.bptt, device=self.device, seed=self.seed,
                           members=members, rotate_members=members > 1)

    def steps_per_epoch(self, members: int) -> int:
        return len(self._batcher(members))

    def epoch_batches(self, epoch: int, members: int):
        batcher = self._batcher(members)
        state = batcher.state_dict()
        state["epoch"] = epoch
        batcher.load_state_dict(state)
        self.model.reset(members * self.cfg.batch_size // self.world)  # the carried state starts at zero each epoch
        for x, y in batcher:
            if self.distributed:
                x, y = dist_utils.shard(x, members), dist_utils.shard(y, members)
            yield x, y

    def examples(self, batch) -> int:
        return batch[1].numel() * self.world

    def example_input(self):
        self.model.reset(1)
        n = min(self.cfg.bptt, 64)  # the MACs per character do not depend on the window; a huge --bptt costs nothing
        return torch.zeros(1, n, dtype=torch.long, device=self.device), n

    # ------------------------------------------------------------------ evaluation
    def _plain(self) -> StatefulLM:
        late = self._late()
        if late is not None:
            return shared.collapse(late)
        return self._base()

    def _bpc(self, model: StatefulLM, data: torch.Tensor) -> float:
        nats, _, count = stream_nats(model, data, self.cfg.eval_batch_size, self.cfg.bptt, autocast=self.amp)
        return bpc(nats[0], count)

    def _bpc_members(self, late, data) -> tuple[float, list]:
        K = late_modules(late)[0][1].K
        nats, ens, count = stream_nats(late, data, self.cfg.eval_batch_size, self.cfg.bptt, members=K,
                                       autocast=self.amp)
        return bpc(ens[0], count), [bpc(v, count) for v in nats]

    def epoch_metrics(self) -> dict:
        out = {"bpc_valid": self._bpc(self._plain(), self.valid_data)}
        late = self._late()
        if late is not None and self.cfg.K > 1:
            out["bpc_valid_ensemble"] = self._bpc_members(late, self.valid_data)[0]
        return out

    def evaluate_models(self, rules=("stored",)) -> dict:
        """Bits per character (valid, test) of the averaged model, the ensemble and every member; the model has no
        BatchNorm, so the only rule is "stored"."""
        plain = self._plain()
        models = {"averaged": {"stored": {"bpc_valid": self._bpc(plain, self.valid_data),
                                          "bpc_test": self._bpc(plain, self.test_data)}}}
        late = self._late()
        if late is not None and self.cfg.K > 1:
            ev, mv = self._bpc_members(late, self.valid_data)
            et, mt = self._bpc_members(late, self.test_data)
            models["ensemble"] = {"stored": {"bpc_valid": ev, "bpc_test": et}}
            models["members"] = {"stored": [{"bpc_valid": v, "bpc_test": t} for v, t in zip(mv, mt)]}
        for name, by_rule in models.items():
            for m in by_rule["stored"] if isinstance(by_rule["stored"], list) else [by_rule["stored"]]:
                if not all(math.isfinite(x) for x in m.values()):
                    raise DeepError(f"the {name} model's bits per character are not finite; the run diverged")
        return models

    def final_models(self) -> dict:
        out = {"averaged": self._plain().eval(), "bn_rule": None}
        late = self._late()
        if late is not None and self.cfg.K > 1:
            out["members"] = [shared.collapse(late, members=[k]) for k in range(self.cfg.K)]
        return out

    def build_spec(self) -> dict:
        return {"builder": "deep.models.lstm.CharLSTM", "kwargs": {"vocab_size": VOCAB_SIZE,
                "embedding_dim": self.cfg.embedding_dim, "hidden_size": self.cfg.hidden_size}}

    def result_extra(self) -> dict:
        return {"parameters": sum(p.numel() for p in self._plain().parameters()),
                "train_chars": self.train_data.numel(), "valid_chars": self.valid_data.numel(),
                "test_chars": self.test_data.numel()}


def train(cfg: TextConfig, **kwargs) -> dict:
    """Train and evaluate one enwik8 run (see :class:`LMRun`); returns the results dict (also in results.json)."""
    return LMRun(cfg, **kwargs).train()
