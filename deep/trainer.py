"""The one trainer design of the deep benchmarks: a run of the paper's protocol with checkpoints, resume and results.

Protocol. Epochs count passes over the training set. Until epoch T0 the whole network trains with SGD on minibatches
of ``batch_size``, every parameter in one optimizer (lr, momentum, Nesterov, weight decay). At T0 the late-phase
weights are released (:class:`shared.LatePhase`: K members, each with its own optimizer at ``lr_phi`` and
``weight_decay_phi``; the pre-T0 momentum carried over) and every outer step of Algorithm 1 consumes K minibatches,
stacked into one batch (member k owns slice k), so each member sees 1/K of the data per epoch. Before every step
every param group's lr is set from the config's one schedule (:meth:`deep.config.RunConfig.lr_factor`, read per
epoch or per step: :meth:`~deep.config.RunConfig.lr_epoch`); no scheduler state. From epoch ``swa_start`` (1-based) all
weights -- theta and every phi_k, or the plain model's -- are averaged once per epoch (:class:`shared.SWA`) while the
schedule holds the constant swa_lr. Gradient clipping is :meth:`shared.LatePhase.clip_grad_norm_` (the mean member's
gradient norm; before the release, and for K = 1, torch's clip over all parameters). Non-finite losses stop the run
with one line naming the epoch: the losses are summed on the device and checked every step on the CPU, every 50 steps
on accelerators (no host synchronisation in between), and always before a checkpoint.

Everything a wrong flag would break later is built and checked before the first step (:meth:`Trainer.preflight`:
the late-phase surgery on a copy of the model).

A subclass provides the data, the model and the metrics: :meth:`load_data`, :meth:`build_model`,
:meth:`epoch_batches`, :meth:`steps_per_epoch`, :meth:`epoch_metrics`, :meth:`evaluate_models` (and ``loss_fn``,
``UNIT``, :meth:`examples`). :class:`deep.images.ImageRun`, :class:`deep.lm.LMRun` and
:class:`deep.finetune.FineTune` are the three.

Outputs in the run folder: config.json (the config, seed and kind: ``--resume`` reads it), log.jsonl (one line per
epoch), checkpoint.pt (complete state, written atomically at the end of every epoch; resuming continues bit-for-bit on
the CPU) and results.json.

Under torchrun every rank takes its share of each member's minibatch, and BatchNorm takes its statistics over the
member's whole minibatch on all ranks (:mod:`shared.distributed`), so W processes follow the one-process protocol.
"""
from __future__ import annotations

import abc
import contextlib
import copy
import fnmatch
import hashlib
import io
import json
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import shared
from shared import distributed as dist_utils
from shared.checkpoint import WriteError, atomic_write, remove_stale_temporaries
from shared.core import maybe_autocast
from shared.modules import LateBatchNorm

from . import families
from .config import check_seed, upgrade
from .errors import DeepError
from .runfolder import RunLock, check_out_value, default_out, holder, in_use
from .system import check_memory, hardware, keep_freed_memory, pick_device, sync
from .untrusted import subfolder

SCHEMA = "late-phase-results/2"
FORMAT = "deep-run/2"
RULES = ("stored", "reestimated", "reference")  # the BatchNorm rules of deep.evaluate
EVAL_FIELDS = ("ood", "ood_folders", "eval_batch_size", "eval_every", "test_subset", "bn_images",
               "mc_samples")  # config fields that do not change training


def write_json(path: str, obj) -> None:
    """Write ``obj`` as JSON atomically (shared.checkpoint.atomic_write)."""
    atomic_write(path, json.dumps(obj, indent=1))


def median(xs):
    xs = sorted(x for x in xs if x is not None)
    return xs[len(xs) // 2] if xs else None


class Trainer(abc.ABC):
    """One run (see the module doc). ``cfg`` is a validated config; ``out`` the run folder (default
    runs/<name>_seed<seed>); ``resume`` continues the run in ``out`` from its checkpoint; ``download`` lets the data
    (or weights) be fetched where they are missing."""

    UNIT = "images"                       # what examples() counts, for the throughput in the log
    loss_fn = staticmethod(F.cross_entropy)

    METRIC = ("test_accuracy", "test {:.2f}%")  # the log entry shown on the console line, and its format

    def __init__(self, cfg, seed: int = 0, data_dir: str = "data", out: str | None = None, device: str | None = None,
                 resume: bool = False, progress: bool = True, command: str | None = None, download: bool = False,
                 quiet: bool = False, stream=None, export: str = "all", evaluate_only: bool = False,
                 trunk_epoch: int | None = None, fork: str | None = None, save_predictions: bool = False):
        self._lock = None
        self.cfg, self.seed, self.data_dir, self.progress, self.download = cfg, check_seed(seed), data_dir, \
            progress, download
        self.quiet, self.stream, self.export_what, self.evaluate_only = quiet, stream, export, evaluate_only
        self.trunk_epoch, self.save_predictions = trunk_epoch, save_predictions
        self.command = command or " ".join(["python -m deep"] + sys.argv[1:])
        self.out = check_out_value(out) if out is not None else default_out(cfg.name, self.seed)
        self.ckpt_path = os.path.join(self.out, "checkpoint.pt")
        self.device = pick_device(device)
        self.distributed = dist_utils.init_from_env("gloo" if self.device.type == "cpu" else "nccl")
        self.rank = torch.distributed.get_rank() if self.distributed else 0
        self.world = torch.distributed.get_world_size() if self.distributed else 1
        self._check_out(resume)
        cuda = self.device.type == "cuda"
        if cuda:
            torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest kernels
        self.amp = torch.bfloat16 if (cuda and cfg.bf16) else None
        self.channels_last = cfg.channels_last  # NHWC: faster convolutions on CUDA, and on the CPU (oneDNN) too
        self.malloc = keep_freed_memory() if self.device.type == "cpu" else None

        torch.manual_seed(self.seed)
        self.load_data()
        self._needs = self.memory_needs()
        check_memory(self.device, self._needs)  # before the model exists: an absurd size costs nothing
        self.model = self.build_model()
        if self.distributed:
            dist_utils.broadcast_module(self.model)
            # BatchNorm over each whole minibatch on all ranks, as in one process (LatePhase keeps doing so)
            self.model = dist_utils.sync_batchnorm(self.model)
        self.fams = families.build(cfg) if cfg.late_phase else []
        self.macs = forward_macs(self.model, self.example_input())
        self.preflight()
        if cfg.compile:
            self.model.compile()  # in place: parameter names and state_dict keys stay the same
        self.opt = torch.optim.SGD(self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                   weight_decay=cfg.weight_decay)
        self.lp = self.swa = None
        self.epoch, self.steps, self.log = 0, 0, []
        self.check_every = 1 if self.device.type == "cpu" else 50
        if self.rank == 0:
            os.makedirs(self.out, exist_ok=True)  # only now: a failed start leaves no folder behind
            self._lock = RunLock(self.out, self.command)  # one run per folder (deep.runfolder); rank 0 holds it
        try:
            if self.rank == 0:
                self._check_out(resume)  # again, under the lock: another run may have left a checkpoint meanwhile
                remove_stale_temporaries(self.out)
            if resume:
                self._resume()
            else:
                if fork is not None:
                    self._fork(fork)
                if self.rank == 0:
                    with self._writing("free space (or choose another --out) and start the run again"):
                        write_json(os.path.join(self.out, "config.json"),
                                   {"kind": cfg.KIND, "config": cfg.to_dict(), "seed": self.seed})
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the run folder (its lock); also on leaving a ``with`` block and at the end of the process."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @contextlib.contextmanager
    def _writing(self, then: str):
        """A failed write of a run file (disk full, quota, permissions) as one line: the file, the space, ``then``."""
        try:
            yield
        except WriteError as e:
            raise DeepError(f"{e}; {then}") from None

    # ------------------------------------------------------------------ hooks for the subclasses
    @abc.abstractmethod
    def load_data(self) -> None:
        """Read the data sets (and make the loaders)."""

    @abc.abstractmethod
    def build_model(self) -> nn.Module:
        """The network, on ``self.device``."""

    @abc.abstractmethod
    def steps_per_epoch(self, members: int) -> int:
        """Outer steps of one epoch with ``members`` member minibatches per step."""

    @abc.abstractmethod
    def epoch_batches(self, epoch: int, members: int):
        """This rank's batches of epoch ``epoch`` (0-based), one per outer step, each holding ``members`` member
        minibatches stacked along dim 0."""

    def examples(self, batch) -> int:
        """How many examples (``UNIT``) one step's batch holds on all ranks together."""
        return batch[0].shape[0] * self.world

    def example_input(self):
        """One input of the model's forward holding ``per`` examples, as (input, per): for the FLOP count."""
        return None, 1

    def epoch_metrics(self) -> dict:
        """Quick metrics for this epoch's log line (e.g. the averaged model's test accuracy)."""
        return {}

    def evaluate_models(self, rules: tuple = RULES) -> dict:
        """The final models' metrics: {model: {BatchNorm rule: metrics}} for ``rules`` (see deep.evaluate)."""
        return {}

    def result_extra(self) -> dict:
        """Entries of results.json beyond the common ones (data sizes, ...)."""
        return {}

    def memory_needs(self) -> list:
        """Lower bounds of what the run will allocate on its device, computed before the model is built (closed
        forms or a meta-device model): [(what, bytes, the flags that change it)], checked against the device's
        memory (:func:`deep.system.check_memory`) so that a size that cannot fit is refused in seconds."""
        return []

    # ------------------------------------------------------------------ console
    def say(self, text: str) -> None:
        """One console line ``[name] text`` (rank 0, unless quiet), flushed: readable without a TTY (nohup, SLURM)."""
        if self.rank == 0 and not self.quiet:
            print(f"[{self.cfg.name}] {text}", file=self.stream or sys.stdout, flush=True)

    def _eta(self) -> float:
        """Seconds the remaining epochs should take: each at the mean wall time of the logged epochs of its phase
        (of all epochs where its phase has not run yet)."""
        cfg = self.cfg
        walls = {p: [e["wall_seconds"] for e in self.log if e.get("phase") == p and "wall_seconds" in e]
                 for p in ("pre", "late")}
        every = walls["pre"] + walls["late"]
        if not every:
            return 0.0
        mean = {p: (sum(w) / len(w) if w else sum(every) / len(every)) for p, w in walls.items()}
        return sum(mean["late" if cfg.late_phase and e >= cfg.T0 else "pre"] for e in range(self.epoch, cfg.epochs))

    def _epoch_line(self, entry: dict) -> str:
        cfg = self.cfg
        key, fmt = self.METRIC
        metric = fmt.format(entry[key]) if entry.get(key) is not None else ""
        rate = entry.get(f"{self.UNIT}_per_s")
        unit = {"images": "img/s", "chars": "char/s"}.get(self.UNIT, f"{self.UNIT}/s")
        elapsed = sum(e.get("wall_seconds", 0.0) for e in self.log)
        phase = f"late K={entry['K']}" if entry["phase"] == "late" else "pre"
        width = len(str(cfg.epochs))
        return (f"epoch {entry['epoch']:{width}d}/{cfg.epochs}  {phase:9s} loss {entry['loss']:.4f}  "
                f"lr {entry['lr']:.4g}  {metric}  {rate or 0:,.0f} {unit}  elapsed {_clock(elapsed)}  "
                f"ETA {_clock(self._eta())}")

    def _release_line(self) -> str:
        cfg = self.cfg
        names = "+".join(cfg.phi) + (f" ({', '.join(cfg.rank1_layers)})" if "rank1" in cfg.phi else "")
        gamma = cfg.theta_scale
        line = (f"release at epoch {self.epoch + 1} (t = {self.t} minibatches): K={cfg.K} members of {names}, "
                f"gamma_theta={gamma:g}; each outer step now takes {cfg.K} minibatches")
        if cfg.late_batch_size != cfg.batch_size:
            line += f" of {cfg.late_batch_size} examples (batch_size_late)"
        if cfg.theta_weight_decay != cfg.weight_decay:
            line += f"; theta's weight decay {cfg.theta_weight_decay:g} (weight_decay_theta)"
        if cfg.K > 1 and "all" not in cfg.phi:  # phi all: nothing is shared, there is no theta step
            # docs/theory.md section 3.6 (the block model: theta and phi are disjoint parameter sets). Per minibatch,
            # theta moves gamma_theta lr_theta / lr times the plain rate, in one K gamma_theta-times step every K
            # minibatches on the mean of their gradients; the averaged phi moves phi_lr / (K lr) times the plain rate.
            step = cfg.K * gamma
            line += (f"; per minibatch theta moves at {gamma:.3g}x the plain rate (one {step:.3g}x step every {cfg.K} "
                     f"minibatches, on the mean of their gradients) and the members' average phi at "
                     f"{cfg.phi_lr / (cfg.K * cfg.lr):.3g}x (block model, docs/theory.md section 3.6)")
        return line

    # ------------------------------------------------------------------ set-up
    def _check_out(self, resume: bool) -> None:
        if os.path.exists(self.out) and not os.path.isdir(self.out):
            raise DeepError(f"--out {self.out} is a file, not a folder; choose another --out")
        owner = holder(self.out) if self.rank == 0 and self._lock is None else None
        if owner is not None:
            raise DeepError(in_use(self.out, owner))
        if os.path.isdir(self.ckpt_path):
            raise DeepError(f"{self.ckpt_path} is a folder, not a checkpoint; choose another --out")
        if os.path.exists(self.ckpt_path) and not resume:
            raise DeepError(f"{self.ckpt_path} exists: pass --resume to continue that run, or choose another --out")
        if resume and not os.path.exists(self.ckpt_path):
            raise DeepError(f"--resume: no checkpoint at {self.ckpt_path}; start the run without --resume")
        parent = os.path.dirname(os.path.abspath(self.out))
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
            raise DeepError(f"--out {self.out}: cannot create the run folder in {parent} (not a writable folder); "
                            f"choose another --out")

    def preflight(self) -> None:
        """Build now what the release would build, on a meta-device copy of the model (:func:`late_phase_sizes`): a
        family that selects nothing, a rank-1 pattern that matches no layer, or K member copies that cannot fit in
        memory fail in seconds, not after T0 epochs. (SWA vs T0 and every field's range are checked by the config's
        validate().)"""
        cfg = self.cfg
        if not cfg.late_phase:
            return
        if "rank1" in cfg.phi:
            types = shared.Rank1().types
            layers = [name for name, m in self.model.named_modules() if type(m) in types]
            for pattern in cfg.rank1_layers:
                if not any(fnmatch.fnmatchcase(name, pattern) for name in layers):
                    raise DeepError(f"--rank1-layers pattern {pattern!r} matches no Linear or Conv layer of the "
                                    f"{cfg.arch} model (its layers: {', '.join(layers[:6])}"
                                    f"{', ...' if len(layers) > 6 else ''}); fix the pattern")
        per_member, buffers, growth = late_phase_sizes(self.model, families.build(cfg), cfg.K, cfg.path)
        copies = 2 + (cfg.momentum > 0)  # values, gradients, momentum
        check_memory(self.device, self._needs + [
            (f"{cfg.K} member copies of {per_member:,} late-phase values (the model grows by {growth:,} values)",
             4 * copies * max(growth, 0), "--K, --phi"),
            (f"{cfg.K} member copies of {buffers:,} BatchNorm statistics", 4 * cfg.K * buffers, "--K, --phi")])

    def _eager(self):
        """Under --compile, evaluation runs eagerly: only the training steps are compiled (one graph per phase).
        Evaluation's forms of the model (eval mode under no_grad, the averaged network, each member, every
        BatchNorm rule, the evaluation batch size) would each add a graph -- a recompile apiece, for passes that run
        once per epoch -- and fill the cache of compiled graphs past its limit."""
        stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6; older ones compile evaluation too
        return stance("force_eager") if self.cfg.compile and stance else contextlib.nullcontext()

    def _autocast(self):
        return maybe_autocast(self.device, self.amp)

    @property
    def t(self) -> int:
        """Minibatches (of batch_size, all members) consumed so far."""
        return self.lp.t if self.lp is not None else self.steps

    # ------------------------------------------------------------------ phases
    def release(self) -> None:
        """T0: K members of the late-phase weights; Algorithm 1 from here on."""
        cfg = self.cfg
        self.lp = shared.LatePhase(
            self.model, cfg.K, self.fams, gamma_theta=cfg.theta_scale, gamma_theta_scales=cfg.gamma_theta_scales,
            sigma0=cfg.sigma0, theta_optimizer=shared.sgd(cfg.lr, cfg.momentum, cfg.nesterov, cfg.theta_weight_decay),
            phi_optimizer=shared.sgd(cfg.phi_lr, cfg.momentum, cfg.nesterov, cfg.phi_weight_decay),
            path=cfg.path, T0=self.steps,
            inherit_optimizer_state=self.opt if self.steps > 0 else None, phi_momentum=cfg.phi_momentum,
            generator=torch.Generator().manual_seed(self.seed + 12345), check_finite_every=0, autocast=self.amp)
        if cfg.compile:
            # The surgery replaced layers, so the plain model's graphs can never run again: drop them, and the late
            # phase compiles afresh (instead of a recompile that tests the stale guards first on every call).
            torch.compiler.reset()
            self.lp.model.compile()
        self.opt = None

    def start_swa(self) -> None:
        """From swa_start on: an equal-weight average of all weights, updated once per epoch."""
        self.swa = shared.SWA(self.lp if self.lp is not None else self.model)

    # ------------------------------------------------------------------ steps
    def plain_step(self, batch) -> torch.Tensor:
        """One SGD step of the plain model (before the release); returns the detached minibatch loss."""
        x, y = batch
        self.opt.zero_grad(set_to_none=True)
        with self._autocast():
            loss = self.loss_fn(self.model(x), y)
        loss.backward()
        if self.distributed:
            dist_utils.allreduce_grads(self.model.parameters())
        if self.cfg.grad_clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.steps += 1
        return loss.detach()

    def late_step(self, batch) -> torch.Tensor:
        """One outer step of Algorithm 1 (K minibatches); returns the mean member loss (detached)."""
        x, y = batch
        losses = self.lp.forward_backward(x, y, self.loss_fn)
        if self.cfg.grad_clip:
            self.lp.clip_grad_norm_(self.cfg.grad_clip)
        self.lp.update()
        self.steps += self.lp.K
        return losses.mean()

    def _set_lr(self, epoch: float) -> None:
        """The one learning-rate mechanism: every param group's lr = its base lr x ``cfg.lr_factor(epoch, part)``
        at the (fractional) epoch ``epoch`` (:meth:`deep.config.RunConfig.lr_epoch`: per epoch or per step), set
        before every step. The base lrs follow from the config alone -- lr for theta (times gamma_theta
        when gamma_theta scales theta's lr), the members' lr for phi -- so no scheduler state is checkpointed, and a
        resumed or forked run sets the same lrs as one trained through."""
        cfg = self.cfg
        if self.lp is None:
            parts = [(self.opt, "theta", cfg.lr)]
        else:
            theta_lr = cfg.lr * self.lp.gamma_theta if cfg.gamma_theta_scales == "lr" else cfg.lr
            parts = [(self.lp.theta_optimizer, "theta", theta_lr)] if self.lp.theta_optimizer is not None else []
            parts += [(opt, "phi", cfg.phi_lr) for opt in self.lp.phi_optimizers]
        for opt, part, base in parts:
            lr = base * cfg.lr_factor(epoch, part)
            for group in opt.param_groups:
                group["lr"] = lr

    def _check_finite(self, total: torch.Tensor, step: int) -> None:
        if not bool(torch.isfinite(total)):
            raise DeepError(f"non-finite loss in epoch {self.epoch + 1} of {self.cfg.name} (by outer step {step}, "
                            f"minibatch t={self.t}); lower --lr or check the data")

    # ------------------------------------------------------------------ epochs
    def run_epoch(self) -> dict:
        """One epoch: the release and the SWA start where they are due, the steps, the schedules, the average,
        the log line and the checkpoint."""
        cfg = self.cfg
        wall = time.perf_counter()
        if cfg.late_phase and self.lp is None and self.epoch >= cfg.T0:
            self.say(self._release_line())
            self.release()
        if cfg.swa and self.swa is None and self.epoch >= cfg.swa_start - 1:
            self.say(f"SWA from epoch {self.epoch + 1}: the weights of epochs {self.epoch + 1}..{cfg.epochs} are "
                     f"averaged, once per epoch, at the constant lr {cfg.swa_lr:g}")
            self.start_swa()
        members = self.lp.K if self.lp is not None else 1
        n = self.steps_per_epoch(members)
        optimizers = self.lp.optimizers if self.lp is not None else [self.opt]
        self._set_lr(cfg.lr_epoch(self.epoch, 0, n))  # the lr logged is the one the epoch starts with
        lrs = [opt.param_groups[0]["lr"] for opt in optimizers]
        from tqdm.auto import tqdm
        bar = tqdm(total=n, desc=f"{cfg.name} epoch {self.epoch + 1}/{cfg.epochs}", leave=False,
                   disable=not (self.progress and not self.quiet and self.rank == 0))
        self.model.train()
        total = torch.zeros((), device=self.device)
        examples = 0
        sync(self.device)
        start = time.perf_counter()
        for i, batch in enumerate(self.epoch_batches(self.epoch, members)):
            self._set_lr(cfg.lr_epoch(self.epoch, i, n))  # every step, from the one schedule (as nanoGPT does)
            total += self.late_step(batch) if self.lp is not None else self.plain_step(batch)
            examples += self.examples(batch)
            if (i + 1) % self.check_every == 0:
                self._check_finite(total, i + 1)
            bar.update(1)
        sync(self.device)
        seconds = time.perf_counter() - start
        bar.close()
        self._check_finite(total, n)
        if self.distributed:
            torch.distributed.all_reduce(total)
            total /= self.world
        if self.swa is not None:
            self.swa.update()
        entry = {"epoch": self.epoch + 1, "t": self.t, "phase": "late" if self.lp is not None else "pre",
                 "K": members, "lr": lrs[0], "lr_phi": lrs[-1], "loss": float(total) / max(n, 1),
                 f"{self.UNIT}_per_s": examples / seconds if seconds > 0 else None, "seconds": seconds}
        self.epoch += 1
        if self.epoch % cfg.eval_every == 0 or self.epoch == cfg.epochs:  # the last epoch always
            evaluated = time.perf_counter()
            with self._eager():
                entry.update(self.epoch_metrics())
            entry["eval_seconds"] = time.perf_counter() - evaluated
        entry["wall_seconds"] = time.perf_counter() - wall
        self.log.append(entry)
        if self.rank == 0:
            self.save()
        self.say(self._epoch_line(entry))
        return entry

    def train(self) -> dict:
        """Run the remaining epochs, evaluate, export the final models; returns the results (also in
        results.json)."""
        while self.epoch < self.cfg.epochs:
            self.run_epoch()
        # the exports are written before results.json: a run killed in between has no results and finishes (and
        # exports again) when resumed, so a finished run always has its exports
        return self.evaluate(export=self.rank == 0 and self.export_what != "none")

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> None:
        """The complete state, atomically (checkpoint.pt), and the log (log.jsonl)."""
        state = {"format": FORMAT, "kind": self.cfg.KIND, "config": self.cfg.to_dict(), "seed": self.seed,
                 "epoch": self.epoch, "steps": self.steps, "log": self.log, "world_size": self.world}
        if self.lp is not None:
            state.update(phase="late", latephase=self.lp.state_dict())
        else:
            state.update(phase="pre", model=self.model.state_dict(), optimizer=self.opt.state_dict(),
                         rng=shared.checkpoint.rng_state())
        if self.swa is not None:
            state["swa"] = self.swa.state_dict()
        then = ("free space (or move the run folder), then continue the run with --resume: the previous checkpoint "
                "is intact" if os.path.isfile(self.ckpt_path) else
                "free space (or choose another --out) and start the run again: no epoch was checkpointed yet")
        with self._writing(then):
            shared.save(self.ckpt_path, state)
        with self._writing("free space (or move the run folder), then continue the run with --resume: the checkpoint "
                           "is complete"):
            atomic_write(os.path.join(self.out, "log.jsonl"), "".join(json.dumps(e) + "\n" for e in self.log))
        if self.epoch == self.trunk_epoch and self.lp is None and self.swa is None:
            with open(self.ckpt_path, "rb") as f, self._writing("free space, then run the study again (it resumes)"):
                # the state after trunk_epoch plain epochs, for other runs to fork
                atomic_write(os.path.join(self.out, "trunk.pt"), f.read())

    def _fork(self, path: str) -> None:
        """Start from the trunk ``path`` (a plain-phase checkpoint after E epochs of a run that :func:`shareable`
        says trains exactly as this one for those E epochs): the weights, optimizer, schedule, RNG states and the
        log of those epochs are taken over, so this run continues as if it had trained them itself (tested: a forked
        run is bit-identical to one trained from scratch)."""
        try:
            state = shared.load(path)
        except shared.CheckpointError as e:
            raise DeepError(f"fork: {e}; delete the trunk to train the run from scratch") from None
        if not isinstance(state, dict) or state.get("format") != FORMAT or state.get("phase") != "pre":
            raise DeepError(f"{path} is not the plain-phase trunk of a run of this version")
        why = shareable(upgrade(state["config"]), self.cfg.to_dict(), state["epoch"])
        if why or state["seed"] != self.seed or state.get("world_size") != self.world or state["kind"] != \
                self.cfg.KIND:
            raise DeepError(f"cannot fork {path}: {why or 'another seed, kind or number of processes'}")
        self.epoch, self.steps, self.log = state["epoch"], state["steps"], state["log"]
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        shared.checkpoint.set_rng_state(state["rng"])

    def _resume(self) -> None:
        try:
            state = shared.load(self.ckpt_path)
        except shared.CheckpointError as e:
            raise DeepError(f"--resume: {e.problem}; delete it to start afresh, or choose another --out") from None
        if not isinstance(state, dict) or state.get("format") != FORMAT or state.get("kind") != self.cfg.KIND:
            raise DeepError(f"{self.ckpt_path} is not a checkpoint of a {self.cfg.KIND} run of this version; "
                            f"choose another --out")
        try:
            self._restore(state)
        except DeepError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as e:
            what = f"no entry {e}" if isinstance(e, KeyError) else " ".join(str(e).split())[:200] or type(e).__name__
            raise DeepError(f"--resume: {self.ckpt_path} is incomplete or does not fit this run ({what}); delete it "
                            f"to start afresh, or choose another --out") from None

    def _restore(self, state: dict) -> None:
        """Continue from a verified checkpoint ``state`` of this kind (settings compared first)."""
        mine, stored = self.cfg.to_dict(), upgrade(state["config"])  # older sentinels read as today's
        # re-evaluating may change what is evaluated, not the weights; how often the epochs are evaluated never does
        free = EVAL_FIELDS if self.evaluate_only else ("eval_every",)
        diff = [k for k in mine if stored.get(k) != mine[k] and k not in free]
        if diff or state["seed"] != self.seed:
            what = ", ".join(f"{k}: {stored.get(k)!r} -> {mine[k]!r}" for k in diff[:4]) or \
                f"seed {state['seed']} -> {self.seed}"
            raise DeepError(f"--resume with different settings ({what}); resume with the run's own settings")
        if state.get("world_size") != self.world:
            raise DeepError(f"the run used {state.get('world_size')} process(es), this one has {self.world}; resume "
                            f"with the same number (each rank's data shard depends on it)")
        self.epoch, self.steps, self.log = state["epoch"], state["steps"], state["log"]
        if state["phase"] == "late":
            steps, self.steps = self.steps, state["latephase"]["T0"]
            self.release()  # rebuild the members on the fresh model; every state is loaded below
            self.steps = steps
            if "swa" in state:
                self.start_swa()
            # checkpoints written before the one lr mechanism carry LambdaLR states; the lrs now follow from the
            # config and the epoch alone (_set_lr), so those states are set aside, not needed
            self.lp.load_state_dict({**state["latephase"], "schedulers": []})
        else:
            self.model.load_state_dict(state["model"])
            self.opt.load_state_dict(state["optimizer"])
            if "swa" in state:
                self.start_swa()
            shared.checkpoint.set_rng_state(state["rng"])
        if "swa" in state:
            self.swa.load_state_dict(state["swa"])

    # ------------------------------------------------------------------ results
    def header(self) -> dict:
        """What every results.json starts with: schema, config, seed, command, date, hardware and provenance."""
        return {"schema": SCHEMA, "kind": self.cfg.KIND, "config": self.cfg.to_dict(), "seed": self.seed,
                "command": self.command, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                "hardware": hardware(self.device, self.amp, self.channels_last), "world_size": self.world,
                "malloc": self.malloc, "epochs_trained": self.epoch}

    def evaluate(self, rules=None, filename: str = "results.json", export: bool = False) -> dict:
        """Evaluate the final models (see :meth:`evaluate_models`; ``rules``: the BatchNorm rules, default all) and
        write ``filename`` in the run folder; with ``export``, :meth:`export` the final networks just before."""
        start = time.perf_counter()
        self.say(f"evaluating the final models ({self.cfg.name}, epoch {self.epoch}/{self.cfg.epochs})")
        self.__dict__["_eval_steps"] = {}
        with self._eager():
            models = self.evaluate_models(tuple(rules) if rules else RULES)
        rate = f"{self.UNIT}_per_s"
        steps = dict(self.__dict__["_eval_steps"])
        seconds = time.perf_counter() - start
        steps["other (OOD sets loaded, predictions written)"] = max(seconds - sum(steps.values()), 0.0)
        result = {**self.header(), "models": models, "cost": self.cost(),
                  "train_seconds": sum(e["seconds"] for e in self.log if "seconds" in e),
                  "epoch_eval_seconds": sum(e.get("eval_seconds", 0.0) for e in self.log),
                  "eval_seconds": seconds, "eval_step_seconds": steps,
                  rate: {"pre": median([e.get(rate) for e in self.log if e.get("phase") == "pre"]),
                         "late": median([e.get(rate) for e in self.log if e.get("phase") == "late"])},
                  **self.result_extra()}
        if export:
            self.export()
        if self.rank == 0:
            with self._writing("free space, then evaluate again with --resume (the trained run is in the checkpoint)"):
                write_json(os.path.join(self.out, filename), result)
        self.say(f"evaluated in {_clock(result['eval_seconds'])} (the steps above and "
                 f"{_clock(steps['other (OOD sets loaded, predictions written)'])} of other work; the per-epoch test "
                 f"metrics took {_clock(result['epoch_eval_seconds'])} during training): "
                 f"{os.path.join(self.out, filename)}")
        for line in final_lines(result["models"]):
            self.say(line)
        return result

    def cost(self) -> dict:
        """What the run cost: parameters (all trained ones -- theta and every member's phi -- and those of one
        network), forward multiply-accumulates per example (Conv/Linear layers of the plain architecture), the
        examples trained on and the training FLOPs estimated as 3 x 2 x MACs per example (forward and backward);
        relative to the base model (the plain network trained for the same epochs): examples / (epochs x the
        examples of a plain epoch), since both count the plain architecture's MACs (rank-1 and hypernetwork
        weight compositions are not counted); and the forward passes per test example of each reported model."""
        late = self.lp.model if self.lp is not None else self.model
        epochs = [e for e in self.log if e.get("phase") in ("pre", "late")]
        examples = sum((e.get(f"{self.UNIT}_per_s") or 0) * e.get("seconds", 0) for e in epochs)
        plain = self.plain_epoch_examples()
        return {"parameters": sum(p.numel() for p in late.parameters() if p.requires_grad),
                "network_parameters": sum(p.numel() for p in self._plain_network().parameters()),
                "members": self.cfg.K if self.lp is not None else 1,
                "forward_macs_per_example": self.macs, "training_examples": round(examples),
                "training_flops": 6 * self.macs * round(examples) if self.macs else None,
                "training_flops_vs_base": examples / (plain * len(epochs)) if plain and epochs else None,
                "test_passes": prediction_passes(self.cfg)}

    def plain_epoch_examples(self) -> int | None:
        """The examples one epoch of the plain network trains on (None: not known for this kind)."""
        return None

    def _plain_network(self) -> nn.Module:
        return shared.collapse(self.lp.model) if self.lp is not None else self.model

    # ------------------------------------------------------------------ the models to evaluate
    def _late(self) -> nn.Module | None:
        """The late-phase model to evaluate (the SWA average when SWA runs), or None before the release."""
        if self.lp is None:
            return None
        return self.swa.model if self.swa is not None else self.lp.model

    def _base(self) -> nn.Module:
        """The plain model to evaluate when there is no late-phase model (the SWA average when SWA runs)."""
        return self.swa.model if self.swa is not None else self.model

    # ------------------------------------------------------------------ exported models
    def final_models(self) -> dict:
        """The final networks to export, plain modules of the original architecture: {"averaged": model,
        "members": [model, ...]} (members only after a release with K > 1), and the BatchNorm rule of their
        statistics (the reference protocol's for this config)."""
        return {}

    def build_spec(self) -> dict:
        """How to build the architecture an exported state_dict loads into (see deep.models.load_exported)."""
        return {}

    def export(self) -> None:
        """Write the final networks as plain state_dicts into RUN/export/ (averaged.pt and member_K.pt, with
        ``export="all"``; only averaged.pt with ``"averaged"``) and their description export/models.json."""
        nets = self.final_models()
        if not nets:
            return
        folder = subfolder(self.out, "export")  # refused if a link: the files would land outside the run folder
        files = {"averaged": "averaged.pt"}
        members = nets.get("members", []) if self.export_what == "all" else []
        files.update({f"member_{k}": f"member_{k}.pt" for k in range(len(members))})
        digests = {}
        for name, net in zip(files, [nets["averaged"]] + members):  # plain torch.save files: torch.load reads them
            buf = io.BytesIO()
            torch.save(net.state_dict(), buf)
            digests[name] = hashlib.sha256(buf.getvalue()).hexdigest()  # checked by deep.models.load_exported
            atomic_write(os.path.join(folder, files[name]), buf.getvalue())
        write_json(os.path.join(folder, "models.json"),
                   {"kind": self.cfg.KIND, "config": self.cfg.name, "seed": self.seed, "epoch": self.epoch,
                    "bn_rule": nets.get("bn_rule"), "build": self.build_spec(), "files": files, "sha256": digests})
        self.say(f"exported {len(files)} model(s) to {folder}")


# Fields that do not affect the plain (pre-release) epochs: two runs that differ only in these, with the same seed,
# train exactly alike until the first of them releases its late-phase weights or starts SWA.
LATE_OR_SWA_FIELDS = ("name", "phi", "K", "rank1_layers", "T0", "gamma_theta", "gamma_theta_scales", "phi_momentum",
                      "sigma0", "lr_phi", "weight_decay_phi", "weight_decay_theta", "batch_size_late", "path",
                      "swa_start", "swa_lr")


def shareable(trunk: dict, mine: dict, epochs: int) -> str | None:
    """Why a run with config ``mine`` cannot start from the state after ``epochs`` plain epochs of a run with config
    ``trunk`` (same seed), or None if it can: every field that shapes the plain epochs must agree (all but
    LATE_OR_SWA_FIELDS and EVAL_FIELDS), neither run may have released its late-phase weights or started SWA within
    those epochs, and ``mine`` must not need to release before them."""
    diff = sorted(k for k in mine if k not in LATE_OR_SWA_FIELDS + EVAL_FIELDS and trunk.get(k) != mine[k])
    if diff:
        return f"the configs differ in {', '.join(diff[:4])}"
    for name, c in (("the trunk's run", trunk), ("this run", mine)):
        if c.get("phi") and c["T0"] < epochs:
            return f"{name} releases its late-phase weights at T0 = {c['T0']}, before epoch {epochs}"
        if c.get("swa_start", 0) and c["swa_start"] <= epochs:
            return f"{name} starts SWA at epoch {c['swa_start']}, within the first {epochs}"
    return None


# what final_lines shows of a model's metrics: (key, label, format)
SHOWN = (("accuracy", "acc", "{:.2f}%"), ("nll", "NLL", "{:.4f}"), ("ece", "ECE", "{:.2f}%"),
         ("ood_mean", "AUROC", "{:.1f}%"), ("bpc_valid", "valid", "{:.4f} bpc"), ("bpc_test", "test", "{:.4f} bpc"))


def final_lines(models: dict) -> list[str]:
    """The final metrics of a results dict in a few console lines: one per model (averaged, ensemble, members, MC
    dropout), each rule's numbers after its name; members as the mean over members with their range (min-max)
    of the first metric. AUROC: the mean over OOD sets of the predictive-entropy AUROC."""
    def fmt(m: dict) -> str:
        bits = []
        for key, label, form in SHOWN:
            v = m.get(key)
            if key == "ood_mean" and isinstance(v, dict):
                v = v.get("auroc_entropy")
            if isinstance(v, (int, float)):
                bits.append(f"{label} {form.format(v)}")
        return " ".join(bits)

    lines = []
    for name, by_rule in models.items():
        parts = []
        for rule, m in by_rule.items():
            if isinstance(m, list):  # the members: their mean, and the range of the first metric shown
                if not m:
                    continue
                key = next((k for k, _, _ in SHOWN if isinstance(m[0].get(k), (int, float))), None)
                mean = {k: sum(x[k] for x in m) / len(m) for k in m[0] if isinstance(m[0][k], (int, float))}
                span = (f" (range {min(x[key] for x in m):.2f}-{max(x[key] for x in m):.2f})" if key else "")
                parts.append(f"{rule}: mean of {len(m)} {fmt(mean)}{span}")
            elif isinstance(m, dict):
                parts.append(f"{rule}: {fmt(m)}")
        if parts:
            lines.append(f"  {name:9s} " + " | ".join(parts))
    return lines


def prediction_passes(cfg) -> dict:
    """Forward passes per test example of each model a run reports -- the cost of prediction, beside the training
    cost: the averaged model is one ordinary network, the ensemble runs its K members, MC dropout its N samples."""
    passes = {"averaged": 1}
    if cfg.late_phase and cfg.K > 1:
        passes.update(ensemble=cfg.K, members=1)
    if getattr(cfg, "mc_samples", 0):
        passes["mc_dropout"] = cfg.mc_samples
    return passes


@torch.no_grad()
def late_phase_sizes(model: nn.Module, fams: list, K: int, path: str = "vectorized") -> tuple[int, int, int]:
    """(phi values per member, BatchNorm statistics per member, growth of the parameter count) of the release of
    ``fams`` on ``model``, counted on the real surgery (:class:`shared.LatePhase`) of a meta-device copy: exact for
    every family (the growth includes the K member copies and new theta tensors such as template banks, net of the
    weights they replace), nothing allocated, and any refusal of the release (a family selecting nothing) raised
    now. The global RNG is left as it was (a hypernetwork bank draws its new templates)."""
    with torch.random.fork_rng(devices=[]):
        meta = copy.deepcopy(model).to("meta")
        before = sum(p.numel() for p in meta.parameters())
        lp = shared.LatePhase(meta, K, fams, theta_optimizer=shared.sgd(), phi_optimizer=shared.sgd(), path=path,
                              check_finite_every=0, distributed=False)
    per_member = sum(p.numel() for p in lp.phi_params[0])
    late_bns = [m for m in meta.modules() if isinstance(m, LateBatchNorm) and m.late]
    buffers = sum(b.numel() for m in late_bns for b in m.buffers(recurse=False)) // K
    return per_member, buffers, sum(p.numel() for p in meta.parameters()) - before


def forward_macs(model: nn.Module, example) -> int | None:
    """Multiply-accumulates of one forward pass per example, counted over the Conv and Linear layers with hooks:
    conv: out_elements * in_channels / groups * prod(kernel); linear: out_elements * in_features. ``example``:
    (input, examples it holds), or (None, _) for no count."""
    x, per = example
    if x is None:
        return None
    total = [0]

    def hook(m, inp, out):
        if isinstance(m, nn.modules.conv._ConvNd):
            total[0] += out.numel() * (m.in_channels // m.groups) * int(torch.tensor(m.kernel_size).prod())
        else:
            total[0] += out.numel() * m.in_features

    was = model.training
    model.eval()
    hooks = [m.register_forward_hook(hook) for m in model.modules()
             if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return total[0] // per


def _clock(seconds: float) -> str:
    """1h02m, 3m05s or 12s."""
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s" if m else f"{sec}s"


def has_batchnorm(model: nn.Module) -> bool:
    from shared.modules import LateBatchNorm
    return any(isinstance(m, (nn.modules.batchnorm._BatchNorm, LateBatchNorm)) for m in model.modules())


class ClassifierRun(Trainer):
    """A classification run: evaluates the base model, or the averaged model, the ensemble and every member, each
    under the BatchNorm rules of :mod:`deep.evaluate` (``stored`` and ``reestimated``; ``reference`` for the averaged
    late-phase model). A subclass adds :meth:`test_batches`, :meth:`ood_batches` and :meth:`bn_batches`."""

    @abc.abstractmethod
    def test_batches(self):
        """An iterator of (inputs, labels) over this rank's share of the test set, on the device."""

    def ood_batches(self) -> dict:
        """name -> a zero-argument callable giving an iterator of (inputs, labels) of an OOD set."""
        return {}

    @abc.abstractmethod
    def bn_batches(self):
        """An iterator of training inputs for BatchNorm re-estimation (training transform, cfg.bn_images examples
        on all ranks together; all of one pass when 0)."""

    def _score(self, model, rule: str | None = None, passes: int = 1):
        """Metrics of a plain network; with ``rule``, its predictions are kept for predictions.pt."""
        from .evaluate import predict_plain, summarize
        ood = self.ood_batches()
        predictions = predict_plain(model, self.test_batches, ood, self.amp, passes)
        if rule is not None and passes == 1:
            self.__dict__.setdefault("_predictions", {})[rule] = predictions
        return summarize(predictions, list(ood))

    def _scored(self, what: str, fn):
        """fn() with a console line saying what is evaluated and how long it took (also kept for results.json's
        ``eval_step_seconds``)."""
        start = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - start
        self.__dict__.setdefault("_eval_steps", {})[what] = seconds
        self.say(f"  {what}: {_clock(seconds)}")
        return out

    def _networks(self, rule: str) -> dict:
        """The final networks under a BatchNorm rule: {"averaged": plain model, "late": late-phase model or None};
        computed once per rule (re-estimation costs a pass over the training data)."""
        from .evaluate import reference_averaged
        cache = self.__dict__.setdefault("_final", {})
        if rule in cache:
            return cache[rule]
        late = self._late()
        if late is None:
            net = self._base()
            if rule == "reestimated":
                net = copy.deepcopy(net)
                shared.update_bn(self.bn_batches(), net)
            cache[rule] = {"averaged": net.eval(), "late": None}
        elif rule == "stored":
            cache[rule] = {"averaged": shared.collapse(late), "late": late}
        elif rule == "reference":
            cache[rule] = {"averaged": reference_averaged(late), "late": None}
        else:
            again = copy.deepcopy(late)
            shared.update_bn(self.bn_batches(), again)
            cache[rule] = {"averaged": shared.collapse(late, self.bn_batches()), "late": again}
        return cache[rule]

    def evaluate_models(self, rules: tuple = RULES) -> dict:
        from .evaluate import score_members
        late = self._late()
        bn = has_batchnorm(late if late is not None else self.model)
        rules = [r for r in rules if bn or r == "stored"]
        models: dict = {}
        for rule in rules:
            if rule == "reference" and late is None:
                continue  # the reference rule is the averaged late-phase model's; a base model has its stored one
            if rule in self.__dict__.get("_final", {}) or rule == "stored":
                nets = self._networks(rule)
            else:  # BatchNorm re-estimation passes over training data: a step of its own
                nets = self._scored(f"networks for the {rule} rule", lambda: self._networks(rule))
            models.setdefault("averaged", {})[rule] = self._scored(f"averaged ({rule})",
                                                                   lambda: self._score(nets["averaged"], rule))
            samples = getattr(self.cfg, "mc_samples", 0)
            if samples and rule != "reference":
                models.setdefault("mc_dropout", {})[rule] = self._scored(
                    f"MC dropout, {samples} passes ({rule})", lambda: self._score(nets["averaged"], passes=samples))
            if nets["late"] is not None:
                ens, members = self._scored(f"ensemble and {self.cfg.K} members ({rule})", lambda: score_members(
                    nets["late"], self.test_batches, self.ood_batches(), self.amp))
                models.setdefault("ensemble", {})[rule] = ens
                models.setdefault("members", {})[rule] = members
        if self.save_predictions and self.rank == 0:
            kept = {rule: {k: (v.half() if v.is_floating_point() else v) for k, v in p.items()}
                    for rule, p in self.__dict__.get("_predictions", {}).items()}
            atomic_write(os.path.join(self.out, "predictions.pt"), lambda f: torch.save(kept, f))
        return models

    def final_models(self) -> dict:
        from .table import default_rule
        rule = default_rule(self.cfg.to_dict())
        if rule == "reestimated" and not has_batchnorm(self.model):
            rule = "stored"
        nets = self._networks(rule)
        out = {"averaged": nets["averaged"], "bn_rule": rule}
        if nets["late"] is not None and self.cfg.K > 1:
            out["members"] = [shared.collapse(nets["late"], members=[k]) for k in range(self.cfg.K)]
        return out
