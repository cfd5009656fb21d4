"""Checkpoints: complete state, atomic writes, and bit-for-bit resumption on the CPU -- in process with fresh objects
and across processes after a hard kill."""
import os
import random
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn as nn

import shared
from shared import BatchNorm, Head, LatePhase, LatePhaseError

SGD = dict(theta_optimizer=shared.sgd(), phi_optimizer=shared.sgd())  # the paper's SGD (LatePhase never guesses one)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One training run, written as a script so that it can also run (and be killed) in a fresh process. Data come from
# every global generator (torch, numpy, random) and the model has dropout, so resuming must restore all of them.
RUN = textwrap.dedent("""
    import random
    import numpy as np
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    from shared import BatchNorm, Head, LatePhase

    K, B = 2, 4

    def make():
        torch.manual_seed(0)
        np.random.seed(0)
        random.seed(0)
        model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                              nn.Dropout(0.2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
        return LatePhase(model, K, [BatchNorm(), Head()], sigma0=0.1,
                         theta_optimizer=lambda p: torch.optim.Adam(p, lr=1e-2),
                         phi_optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
                         theta_scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, 2, gamma=0.5),
                         phi_scheduler=lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 10))

    def batch():
        x = torch.randn(K * B, 2, 5, 5) + float(np.random.rand())
        if random.random() < 0.5:
            x = x.flip(-1)
        return x, torch.randint(0, 3, (K * B,))

    def train(lp, until, every=None):
        while lp.outer_step < until:
            lp.step(*batch(), F.cross_entropy)
            lp.step_schedulers()
            if every:
                every(lp)
""")


def run_namespace():
    ns = {}
    exec(RUN, ns)
    return ns


def assert_identical(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def full_state(lp):
    out = dict(lp.model.state_dict())
    for i, opt in enumerate(lp.optimizers):
        for j, st in opt.state_dict()["state"].items():
            for key, v in st.items():
                out[f"opt{i}.{j}.{key}"] = torch.as_tensor(v)
    return out


def test_resume_in_process_is_bit_identical(tmp_path):
    ns = run_namespace()
    lp = ns["make"]()
    ns["train"](lp, 6)
    reference = full_state(lp)

    lp = ns["make"]()
    ns["train"](lp, 3)
    shared.save(tmp_path / "run.ckpt", lp.state_dict())
    assert os.listdir(tmp_path) == ["run.ckpt"]
    torch.manual_seed(123)  # disturb every generator: the checkpoint must restore them
    np.random.seed(123)
    random.seed(123)
    fresh = ns["make"]()
    fresh.load_state_dict(shared.load(tmp_path / "run.ckpt"))
    assert (fresh.outer_step, fresh.t) == (3, 6)
    ns["train"](fresh, 6)
    assert_identical(full_state(fresh), reference)
    assert [s.last_epoch for s in fresh.schedulers] == [6] * 3


def test_resume_after_a_hard_kill_is_bit_identical(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(RUN + textwrap.dedent("""
        import os, signal, sys
        import shared
        torch.set_num_threads(1)
        mode, ckpt, out = sys.argv[1], sys.argv[2], sys.argv[3]
        lp = make()
        if mode == "resume":
            lp.load_state_dict(shared.load(ckpt))

        def checkpoint(lp):
            shared.save(ckpt, lp.state_dict())
            if mode == "kill" and lp.outer_step == 3:
                os.kill(os.getpid(), signal.SIGKILL)

        train(lp, 7, checkpoint)
        torch.save(lp.model.state_dict(), out)
    """))
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))

    def run(mode, out):
        return subprocess.run([sys.executable, str(script), mode, str(tmp_path / "run.ckpt"), str(tmp_path / out)],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)

    ns = run_namespace()  # the uninterrupted run, in this process
    reference = ns["make"]()
    ns["train"](reference, 7)
    killed = run("kill", "never.pt")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (tmp_path / "never.pt").exists() and not any(".tmp" in f for f in os.listdir(tmp_path))
    resumed = run("resume", "resumed.pt")
    assert resumed.returncode == 0, resumed.stderr
    assert_identical(torch.load(tmp_path / "resumed.pt"), reference.model.state_dict())


def test_checkpoint_contents_and_atomic_failure(tmp_path):
    ns = run_namespace()
    lp = ns["make"]()
    ns["train"](lp, 1)
    state = lp.state_dict()
    assert {"model", "theta_optimizer", "phi_optimizers", "schedulers", "outer_step", "rng", "K"} <= set(state)
    assert len(state["phi_optimizers"]) == 2 and len(state["schedulers"]) == 3
    assert {"torch", "cuda", "numpy", "python"} == set(state["rng"])
    path = tmp_path / "a.ckpt"
    shared.save(path, state)
    with pytest.raises(Exception):
        shared.save(path, {"model": lambda: None})  # not serialisable: the old checkpoint must survive
    assert os.listdir(tmp_path) == ["a.ckpt"]
    assert shared.load(path)["outer_step"] == 1


def test_loading_a_mismatched_checkpoint_is_refused(tmp_path):
    ns = run_namespace()
    lp = ns["make"]()
    state = lp.state_dict()
    other = LatePhase(nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4)), 3, **SGD)
    with pytest.raises(LatePhaseError, match="K=2"):
        other.load_state_dict(state)
    with pytest.raises(LatePhaseError, match="schedulers"):
        LatePhase(nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4)), 2, **SGD).load_state_dict(state)
    different = LatePhase(nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)), 2,
                          [BatchNorm(), Head()], theta_scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, 2),
                          phi_scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, 2), **SGD)
    with pytest.raises(LatePhaseError, match="does not fit"):
        different.load_state_dict(state)
    with pytest.raises(LatePhaseError, match="not a LatePhase checkpoint"):
        lp.load_state_dict({"model": {}})
    with pytest.raises(LatePhaseError, match="no checkpoint"):
        shared.load(tmp_path / "missing.ckpt")


def _tensor_data_offsets(path):
    """(start, size) of every tensor's bytes inside a torch.save zip file (the local header precedes each entry)."""
    import zipfile
    raw = path.read_bytes()
    out = []
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            if "/data/" in info.filename and info.file_size:
                off = info.header_offset
                start = off + 30 + int.from_bytes(raw[off + 26:off + 28], "little") + \
                    int.from_bytes(raw[off + 28:off + 30], "little")
                out.append((start, info.file_size))
    return out


def test_a_flipped_bit_anywhere_in_the_weights_is_refused(tmp_path):
    """torch.load checks no CRC: the SHA-256 digest written with the checkpoint catches one changed bit in any tensor
    (and in the plain values); files without a digest are refused unless verify=False."""
    ns = run_namespace()
    lp = ns["make"]()
    ns["train"](lp, 1)
    path = tmp_path / "run.ckpt"
    shared.save(path, lp.state_dict())
    good = path.read_bytes()
    tensors = _tensor_data_offsets(path)
    assert len(tensors) > 10
    for start, size in tensors[::5] + [tensors[-1]]:
        raw = bytearray(good)
        raw[start + size // 2] ^= 0x10
        path.write_bytes(bytes(raw))
        with pytest.raises(shared.CheckpointError, match="do not match the SHA-256 digest") as e:
            shared.load(path)
        assert str(path) in str(e.value) and "\n" not in str(e.value)
    path.write_bytes(good.replace(b"outer_step", b"outer_steq"))  # a changed key in the pickled values
    with pytest.raises(shared.CheckpointError, match="do not match"):
        shared.load(path)
    path.write_bytes(good)
    assert shared.load(path)["outer_step"] == 1
    foreign = tmp_path / "foreign.pt"
    torch.save({"outer_step": 1}, foreign)
    with pytest.raises(shared.CheckpointError, match="no integrity digest"):
        shared.load(foreign)
    assert shared.load(foreign, verify=False) == {"outer_step": 1}
    with pytest.raises(shared.CheckpointError, match="is a folder"):
        shared.load(tmp_path)
    assert shared.checkpoint.digest(lp.state_dict()) == shared.checkpoint.digest(torch.load(path)["state"])


def test_a_full_disk_is_one_line_naming_the_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    import builtins
    import errno
    import shared.checkpoint as ck
    path = tmp_path / "run.ckpt"
    shared.save(path, {"w": torch.zeros(10)})
    real_open = builtins.open

    class Full:
        def __init__(self, f, room):
            self.f, self.room = f, room

        def write(self, data):
            if len(data) > self.room:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.room -= len(data)
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    for room in (0, 100, 5000):
        monkeypatch.setattr(ck, "open", lambda p, mode="r", room=room: Full(real_open(p, mode), room), raising=False)
        for write in (lambda: shared.save(path, {"w": torch.ones(100_000)}), lambda: ck.atomic_write(path, "x" * 9000)):
            with pytest.raises(ck.WriteError) as e:
                write()
            msg = str(e.value)
            assert isinstance(e.value, OSError) and e.value.errno == errno.ENOSPC and "\n" not in msg
            assert msg.startswith(f"disk full: cannot write {path}: No space left on device (") and "free there" in msg
            assert os.listdir(tmp_path) == ["run.ckpt"]  # no temporary file; the old checkpoint is intact
    monkeypatch.undo()
    assert torch.equal(shared.load(path)["w"], torch.zeros(10))
    (tmp_path / "run.ckpt.tmp999999999").write_text("left by a killed process")
    (tmp_path / f"run.ckpt.tmp{os.getpid()}").write_text("this process's own")
    assert ck.remove_stale_temporaries(tmp_path) == ["run.ckpt.tmp999999999"]
