"""Bookkeeping shared by the three trainers (images, enwik8, ImageNet fine-tuning): atomic JSON/log files, resume
checks, provenance."""
from __future__ import annotations

import contextlib
import json
import os
import platform
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

import shared
from shared import distributed as dist_utils

SCHEMA = "late-phase-results/1"


def write_json_atomic(path: str, obj) -> None:
    """Write `obj` as JSON to a temporary file, fsync it, then rename it over `path` (never a half-written file)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_log(out: str, log: list) -> None:
    """Rewrite `out`/log.jsonl atomically with one JSON line per epoch (so it always matches the checkpoint)."""
    tmp = os.path.join(out, "log.jsonl.tmp")
    with open(tmp, "w") as f:
        f.write("".join(json.dumps(e) + "\n" for e in log))
    os.replace(tmp, os.path.join(out, "log.jsonl"))


def settings_change(saved: dict, saved_seed, mine: dict, seed) -> str | None:
    """A description of the first differences between a checkpoint's settings and this run's, or None if equal
    (lists and tuples compare alike)."""
    norm = lambda d: {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}  # noqa: E731
    saved, mine = norm(saved), norm(mine)
    diff = sorted(k for k in mine if saved.get(k) != mine[k])
    if not diff and saved_seed == seed:
        return None
    return ", ".join(f"{k}: {saved.get(k)!r} -> {mine[k]!r}" for k in diff[:4]) or f"seed {saved_seed} -> {seed}"


class Trainer:
    """What the three trainers share besides :func:`setup`: the start or resumption of a run (:meth:`_begin`) and the
    epoch loop (:meth:`train`), and the plain (pre-release) SGD step. A subclass defines ``run_epoch()``,
    ``evaluate()`` and ``_resume()``, and sets ``loss_fn(outputs, targets)`` where it is not cross-entropy."""

    loss_fn = staticmethod(F.cross_entropy)

    def _autocast(self):
        """bf16 autocast where ``self.amp`` is set (CUDA), else nothing."""
        return torch.autocast(self.device.type, dtype=self.amp) if self.amp else contextlib.nullcontext()

    def _plain_step(self, x, y) -> torch.Tensor:
        """One SGD step of the plain model (before the release): gradients averaged over ranks, optional clipping
        (``cfg.grad_clip``); returns the detached minibatch loss."""
        self.opt.zero_grad(set_to_none=True)
        with self._autocast():
            loss = self.loss_fn(self.model(x), y)
        loss.backward()
        if self.distributed:
            dist_utils.allreduce_grads(self.model.parameters())
        if self.cfg.grad_clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        return loss.detach()

    def _begin(self, resume: bool) -> None:
        """Create the run folder (rank 0; only now, once data and model are ready, so a failed start leaves nothing
        behind), then load the checkpoint (resume) or record the run's settings in config.json (new run)."""
        if self.rank == 0:
            os.makedirs(self.out, exist_ok=True)  # setup() checked that it can be made
        if resume:
            self._resume()
        elif self.rank == 0:
            write_json_atomic(os.path.join(self.out, "config.json"), {"config": self.cfg.to_dict(), "seed": self.seed})

    def _progress(self, n: int, unit: str = "step"):
        """A tqdm bar over this epoch's `n` outer steps; shown on rank 0 when progress is on, a silent no-op else."""
        from tqdm.auto import tqdm
        return tqdm(total=n, desc=f"{self.cfg.name} epoch {self.epoch + 1}/{self.cfg.epochs}", leave=False, unit=unit,
                    disable=not (self.progress and self.rank == 0))

    def _step_schedules(self) -> float:
        """End of an epoch: check that the members stayed finite (after the release), step the learning-rate schedules
        and return the learning rate the epoch used (theta's)."""
        if self.lp is not None:
            self.lp.check_finite()
            lr = self.lp.optimizers[0].param_groups[0]["lr"]
            self.lp.step_schedulers()
        else:
            lr = self.opt.param_groups[0]["lr"]
            self.sched.step()
        return lr

    def train(self) -> dict:
        """Run the remaining epochs, then evaluate; returns the results dict (also in results.json)."""
        while self.epoch < self.cfg.epochs:
            self.run_epoch()
        return self.evaluate()


def setup(run, name: str, seed: int, out: str | None, device: str | None, resume: bool, command: str | None,
          error: type) -> None:
    """Set-up common to the trainers: join the torchrun process group if there is one (``run.distributed``,
    ``run.rank``, ``run.world``), pick the device (this rank's GPU, else the CPU), the output folder (default
    runs/<name>_seed<seed>) and ``run.ckpt_path``, which must exist exactly when `resume` is set (else `error`).
    The folder itself is made by :meth:`Trainer._begin`."""
    run.command = command or " ".join(["python -m deep"] + sys.argv[1:])
    run.distributed = dist_utils.init_from_env()
    run.rank = torch.distributed.get_rank() if run.distributed else 0
    run.world = torch.distributed.get_world_size() if run.distributed else 1
    if device is None:
        device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
    run.device = pick_device(device, error)
    run.out = out or os.path.join("runs", f"{name}_seed{seed}")
    run.ckpt_path = os.path.join(run.out, "checkpoint.pt")
    if os.path.exists(run.out) and not os.path.isdir(run.out):
        raise error(f"--out {run.out} is a file, not a folder; choose another --out")
    if os.path.exists(run.ckpt_path) and not resume:
        raise error(f"{run.ckpt_path} exists: pass --resume to continue that run, or choose another --out")
    if resume and not os.path.exists(run.ckpt_path):
        raise error(f"--resume: no checkpoint at {run.ckpt_path}; start the run without --resume")
    parent = os.path.dirname(os.path.abspath(run.out))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise error(f"--out {run.out}: cannot create the run folder in {parent} (not a writable folder); "
                    f"choose another --out")


def pick_device(device: str, error: type) -> torch.device:
    """``torch.device(device)`` for a --device value, checked: a CPU or CUDA device that exists here (else `error`
    with a one-line message)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise error(f"--device {device}: not a torch device (use cpu, cuda or cuda:N)") from None
    if dev.type not in ("cpu", "cuda"):
        raise error(f"--device {device}: not supported (use cpu, cuda or cuda:N)")
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise error(f"--device {device}: no CUDA device is available here; use --device cpu")
        if dev.index is not None and dev.index >= n:
            raise error(f"--device {device}: there are only {n} CUDA device(s) here (cuda:0 to cuda:{n - 1})")
    return dev


def save_checkpoint(run, fmt: str, **extra) -> None:
    """Save the complete state of a trainer atomically and rewrite its log.

    `run` has ``cfg``, ``seed``, ``epoch``, ``log``, ``out``, ``ckpt_path`` and ``lp`` (the :class:`shared.LatePhase`
    after the release, else None, when ``model``, ``opt`` and ``sched`` hold the plain run), and optionally ``swa``
    (anything with ``state_dict``). Before the release the RNG states are saved too; after it they are part of
    ``lp.state_dict()``. `extra` entries are stored as they are.
    """
    state = {"format": fmt, "config": run.cfg.to_dict(), "seed": run.seed, "epoch": run.epoch, "log": run.log,
             **extra}
    if run.lp is not None:
        state.update(phase="late", latephase=run.lp.state_dict())
    else:
        state.update(phase="pre", model=run.model.state_dict(), optimizer=run.opt.state_dict(),
                     scheduler=run.sched.state_dict(), rng=shared.checkpoint.rng_state())
    if getattr(run, "swa", None) is not None:
        state["swa"] = run.swa.state_dict()
    shared.save(run.ckpt_path, state)
    write_log(run.out, run.log)


def load_checkpoint(run, fmt: str, kind: str, error: type, world: int | None = None) -> dict:
    """Read ``run.ckpt_path`` and check that it continues this run: its format is `fmt` (else "not a `kind`
    checkpoint"), its config and seed are this run's, and (if `world` is given) it was written by as many processes.
    Failures raise `error` with a one-line message saying how to resume."""
    try:
        state = shared.load(run.ckpt_path)
    except shared.CheckpointError as e:
        raise error(f"--resume: {e}; delete it to start afresh, or choose another --out") from None
    if not isinstance(state, dict) or state.get("format") != fmt:
        raise error(f"{run.ckpt_path} is not {kind} checkpoint")
    what = settings_change(state["config"], state["seed"], run.cfg.to_dict(), run.seed)
    if what:
        raise error(f"--resume with different settings ({what}); resume with the run's own settings and seed")
    if world is not None and state.get("world_size") != world:
        raise error(f"the run used {state.get('world_size')} process(es), this one has {world}; resume with the same "
                    f"number (each rank's data shard depends on it)")
    return state


def restore(run, state: dict, release=None, start_swa=None) -> None:
    """Load a checkpoint from :func:`load_checkpoint` into a freshly built `run` (see :func:`save_checkpoint`).

    After the release, ``release()`` (if given) rebuilds the members on the fresh model first; ``start_swa()`` rebuilds
    the SWA average where the checkpoint has one; then every state (weights, optimizers, schedulers, RNG, average)
    is loaded, so the run continues bit for bit.
    """
    run.epoch, run.log = state["epoch"], state["log"]
    if state["phase"] == "late":
        if release is not None:
            release()
        if "swa" in state:
            start_swa()
        run.lp.load_state_dict(state["latephase"])
    else:
        run.model.load_state_dict(state["model"])
        run.opt.load_state_dict(state["optimizer"])
        run.sched.load_state_dict(state["scheduler"])
        if "swa" in state:
            start_swa()
        shared.checkpoint.set_rng_state(state["rng"])
    if "swa" in state:
        run.swa.load_state_dict(state["swa"])


def hardware(device: torch.device) -> dict:
    """Provenance of the measurements: device, torch and Python versions, CPU, threads (and the GPU's name)."""
    info = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def sync(device: torch.device) -> None:
    """Wait for the device (CUDA) so that wall-clock timings cover the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(xs):
    xs = sorted(x for x in xs if x is not None)
    return xs[len(xs) // 2] if xs else None
