"""python -m deep under bad input and bad luck: every mistake refused before the first step, damaged checkpoints,
one run per folder, full disks and out-of-memory sizes as one line each, no temporary file left behind."""
import errno
import gzip
import json
import os
import signal
import subprocess
import sys
import zipfile

import pytest
import torch

import shared
from deep.cli import main
from deep.config import PRESETS, with_overrides
from deep.data.formats import read_idx
from deep.data.text import read_bytes
from deep.errors import DeepError
from deep.runfolder import LOCK_NAME, RunLock

from data_files import idx_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYNTH = ["--config", "synthetic_bench", "--arch", "wrn-10-1", "--synthetic-size", "16", "--batch-size", "4",
         "--eval-batch-size", "16", "--epochs", "1", "--device", "cpu", "--no-progress", "--augment", "false"]
LATE = ["--phi", "bn", "head", "--K", "2", "--epochs", "2", "--T0", "1"]


def one_error(capsys, *parts, notes=False):
    """The captured stderr is exactly one `error:` line (plus `note:` lines where allowed) containing ``parts``."""
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    others = [line for line in lines if not line.startswith("error: ") and not (notes and line.startswith("note: "))]
    assert len(errors) == 1 and not others, lines
    for part in parts:
        assert part in errors[0], (part, errors[0])
    return errors[0]


def leftovers(folder):
    return sorted(name for name in os.listdir(folder) if ".tmp" in name or name == LOCK_NAME)


# ---------------------------------------------------------------------------------------------------- flags, config

@pytest.mark.parametrize("flags, msg", [
    (["--out", ""], "--out '' is empty"),
    (["--out", "   "], "is empty"),
    (["--out", " runs/x"], "surrounding whitespace or control characters"),
    (["--out", "runs/a\nb"], "surrounding whitespace or control characters"),
    (["--out", "/"], "the root of the file system"),
    (["--seed", "-1"], "--seed must be an integer in 0..4294967295, got -1"),
    (["--seed", str(2 ** 64)], "--seed must be an integer in 0..4294967295"),
    (["--phi", "head", "--rank1-layers", "conv"], "apply to the phi family rank1, which phi (head) does not"),
    (["--phi", "bn", "bn"], "phi names a family twice"),
    (["--epochs", "3", "--swa-start", "2", "--swa-lr", "0"], "swa_lr must be > 0 when SWA is on"),
])
def test_bad_flags_are_refused_before_anything_runs(flags, msg, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train"] + SYNTH + flags) == 2
    one_error(capsys, msg)
    assert os.listdir(tmp_path) == []  # nothing was created, not even the default runs/ folder


@pytest.mark.parametrize("field, value, msg", [
    ("epochs", "many", "epochs must be an integer, got 'many'"), ("epochs", 3.0, "epochs must be an integer"),
    ("lr", 10 ** 400, "lr must be a finite number"), ("phi", ("bn", 1), "phi must be a list of strings"),
    ("nesterov", 1, "nesterov must be true or false"), ("name", "../elsewhere", "it names the run folder"),
])
def test_every_field_is_type_checked(field, value, msg):
    with pytest.raises(DeepError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        with_overrides(PRESETS["synthetic_bench"], {field: value})


def test_a_stored_config_with_wrong_types_is_refused_on_resume(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    config = PRESETS["synthetic_bench"].to_dict()
    for bad in ({"epochs": "many"}, {"hidden_size": 3}, {"epochs": -1}):
        (out / "config.json").write_text(json.dumps({"kind": "image", "config": {**config, **bad}, "seed": 0}))
        assert main(["train", "--resume", "--out", str(out)]) == 2
        one_error(capsys, "holds no valid config")


# ---------------------------------------------------------------------------------------------------- preflight

@pytest.mark.parametrize("flags, msg", [
    (LATE + ["--phi", "rank1", "--rank1-layers", "conv", "blocks.0.conv9"],
     "--rank1-layers pattern 'blocks.0.conv9' matches no Linear or Conv layer of the wrn-10-1 model"),
    (["--arch", "wrn-28-100000"], "3,642,880,499,200,474 parameters"),
    (["--arch", "wrn-1000000-1"], "16,202,582,490 parameters"),
    (["--synthetic-size", "10000000000"], "12,500,000,000 synthetic images"),
    (LATE + ["--K", "100000000"], "K 100000000 member minibatches of batch_size 4 need 400000000 training images"),
])
def test_what_would_fail_later_fails_in_seconds(flags, msg, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out)] + SYNTH + flags) == 2
    line = one_error(capsys, msg)
    if "parameters" in msg or "synthetic" in msg:
        assert "of CPU memory but this machine has" in line and "; lower those settings" in line
    assert not out.exists()


def test_lstm_and_finetune_sizes_are_checked_before_building(tmp_path, capsys):
    (tmp_path / "enwik8").write_bytes(b"the late phase " * 200)
    lm = ["train", "--config", "enwik8_lstm_base", "--data-dir", str(tmp_path / "enwik8"), "--text-split", "2400",
          "300", "300", "--device", "cpu", "--out", str(tmp_path / "lm")]
    assert main(lm + ["--hidden-size", "10000000"]) == 2
    one_error(capsys, "the LSTM weights (400,010,200,048,896 parameters)")
    from PIL import Image
    for split in ("train", "val"):
        (tmp_path / "im" / split / "n01").mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (8, 8)).save(tmp_path / "im" / split / "n01" / f"{i}.png")
    ft = ["finetune", "--data-dir", str(tmp_path / "im"), "--arch", "resnet18", "--weights", "none", "--K", "2",
          "--batch-size", "2", "--accum", "1", "--device", "cpu", "--out", str(tmp_path / "ft")]
    assert main(ft + ["--crop", "100000", "--resize", "100000", "--workers", "0"]) == 2
    one_error(capsys, "images of 100000x100000 per micro-step")
    assert main(ft + ["--workers", "100000"]) == 2
    one_error(capsys, "--workers 100000 (data-loading processes per rank) is more than the")


def test_bench_refuses_absurd_threads_and_sizes(capsys):
    base = ["bench", "--device", "cpu", "--arch", "10-1", "--batch", "2", "--K", "2", "--rounds", "1"]
    assert main(base + ["--threads", "100000"]) == 2  # torch.set_num_threads(100000) would crash the process
    one_error(capsys, "--threads 100000 is more than the")
    for flags, msg in ((["--image-size", "100000"], "images of 100000x100000 per step"),
                       (["--classes", "1000000000"], "(65,000,077,200 parameters each)")):
        assert main(base + flags) == 2
        one_error(capsys, "the benchmark needs at least", msg)


def test_a_failed_allocation_is_one_line(tmp_path, monkeypatch, capsys):
    import deep.images

    def too_big(self):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 92160000000000 bytes. Error code 12")
    monkeypatch.setattr(deep.images.ImageRun, "build_model", too_big)
    assert main(["train", "--out", str(tmp_path / "run")] + SYNTH) == 2
    one_error(capsys, "out of CPU memory: an allocation of 85830.7 GiB failed")
    assert not os.path.exists(tmp_path / "run" / LOCK_NAME)


# ---------------------------------------------------------------------------------------------------- data

def test_damaged_data_files_are_one_line(tmp_path):
    good = gzip.compress(idx_bytes(torch.zeros(20, 28, 28, dtype=torch.uint8).numpy()), mtime=0)
    damaged = bytearray(good)
    for i in range(12, len(damaged) - 12, 3):
        damaged[i] ^= 0xFF
    (tmp_path / "a-idx3-ubyte.gz").write_bytes(bytes(damaged))
    with pytest.raises(DeepError, match="cannot read idx file .*the file is damaged: re-download or reinstall it"):
        read_idx(tmp_path / "a-idx3-ubyte.gz")
    with zipfile.ZipFile(tmp_path / "enwik8.zip", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("enwik8", b"the late phase weights " * 100)
    raw = bytearray((tmp_path / "enwik8.zip").read_bytes())
    for i in range(50, 150, 4):
        raw[i] ^= 0xFF
    cases = {"flipped.zip": bytes(raw), "cut.zip": bytes(raw[:len(raw) // 2]), "not_a.zip": b"plain text",
             "empty": b""}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(DeepError, match="damaged zip archive|holds no text") as e:
            read_bytes(tmp_path / name)
        assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------------- checkpoints

def test_a_damaged_checkpoint_is_refused_on_resume(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out)] + SYNTH + LATE) == 0
    capsys.readouterr()
    ckpt = out / "checkpoint.pt"
    good = ckpt.read_bytes()
    with zipfile.ZipFile(ckpt) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    local = info.header_offset  # the local header: 30 bytes, then the name and the extra field
    start = local + 30 + int.from_bytes(good[local + 26:local + 28], "little") + \
        int.from_bytes(good[local + 28:local + 30], "little")
    assert good[start:start + info.file_size] == zipfile.ZipFile(ckpt).read(info.filename)
    resume = ["train", "--resume", "--out", str(out), "--no-progress"]
    for flips in (1, 1024):
        raw = bytearray(good)
        for k in range(flips):
            raw[start + (k * 97) % info.file_size] ^= 1 << (k % 8)
        ckpt.write_bytes(bytes(raw))
        assert main(resume) == 2
        one_error(capsys, f"--resume: {ckpt} is damaged: its contents do not match the SHA-256 digest",
                  "delete it to start afresh")
    torch.save({"format": "deep-run/2"}, ckpt)
    assert main(resume) == 2
    one_error(capsys, "has no integrity digest")
    ckpt.write_bytes(good)
    state = shared.load(ckpt)
    del state["latephase"]["phi_optimizers"]  # intact (its digest fits) but incomplete
    shared.save(ckpt, state)
    assert main(resume) == 2
    one_error(capsys, f"--resume: {ckpt} is incomplete or does not fit this run", "delete it to start afresh")
    ckpt.write_bytes(good)
    assert main(resume) == 0 and leftovers(out) == []


# ---------------------------------------------------------------------------------------------------- one run per folder

HOLD = ("import sys; from deep.runfolder import RunLock; lock = RunLock(sys.argv[1]); print('held', flush=True); "
        "sys.stdin.read()")


def test_one_run_per_folder_and_stale_locks(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()  # a run that has just started: its config.json, no checkpoint yet
    (out / "config.json").write_text(json.dumps({"kind": "image", "config": PRESETS["synthetic_bench"].to_dict(),
                                                 "seed": 0}))
    env = dict(os.environ, PYTHONPATH=ROOT)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=env)
    try:
        assert holder.stdout.readline() == "held\n"
        for args in (SYNTH, ["--resume"]):
            assert main(["train", "--out", str(out)] + args) == 2
            one_error(capsys, f"--out {out} is in use by another run (process {holder.pid} on ",
                      "wait for it to end, stop it, or choose another --out")
        with pytest.raises(DeepError, match="in use by another run"):
            RunLock(str(out))
    finally:
        holder.kill()  # SIGKILL: the lock file stays behind, with a pid that no longer runs
        holder.wait()
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == holder.pid
    (out / "checkpoint.pt.tmp999999999").write_bytes(b"half a checkpoint of a killed run")
    assert main(["train", "--out", str(out)] + SYNTH) == 0
    err = capsys.readouterr().err
    assert f"note: {out}: the run of process {holder.pid}" in err and "taking the folder over" in err
    assert leftovers(out) == []
    # within one process the newer holder takes over; the file goes with the last one
    a, b = RunLock(str(out)), RunLock(str(out))
    a.release()
    assert (out / LOCK_NAME).exists()
    b.release()
    assert not (out / LOCK_NAME).exists()


@pytest.mark.parametrize("stop", ["error", "ctrl-c", "sigterm"])
def test_the_lock_is_released_on_errors_and_interrupts(stop, tmp_path, monkeypatch, capsys):
    import deep.trainer
    real = deep.trainer.Trainer.run_epoch

    def run_epoch(self):
        if self.epoch == 1:
            if stop == "error":
                raise DeepError("non-finite loss in epoch 2")
            if stop == "ctrl-c":
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self)
    monkeypatch.setattr(deep.trainer.Trainer, "run_epoch", run_epoch)
    out = tmp_path / "run"
    assert main(["train", "--out", str(out)] + SYNTH + LATE) == 2
    msg = {"error": "non-finite loss", "ctrl-c": f"interrupted; continue it with --resume --out {out}",
           "sigterm": f"terminated (SIGTERM); continue it with --resume --out {out}"}[stop]
    one_error(capsys, msg)
    assert leftovers(out) == [] and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


# ---------------------------------------------------------------------------------------------------- full disks, stdout

def test_a_full_disk_is_one_line_and_leaves_nothing_behind(tmp_path, monkeypatch, capsys):
    import builtins
    import shared.checkpoint as ck
    real_open = builtins.open

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    for name, then in (("config.json", "start the run again"), ("log.jsonl", "continue the run with --resume"),
                       ("checkpoint.pt", "start the run again: no epoch was checkpointed yet"),
                       ("results.json", "evaluate again")):
        out = tmp_path / name.split(".")[0].upper()
        monkeypatch.setattr(ck, "open", lambda p, mode="r", name=name: Full(real_open(p, mode)) if name in str(p)
                            else real_open(p, mode), raising=False)
        assert main(["train", "--out", str(out)] + SYNTH) == 2, name
        one_error(capsys, f"disk full: cannot write {out / name}: No space left on device (0 B written, ", then)
        assert leftovers(out) == []
    monkeypatch.undo()


def test_stdout_errors(tmp_path, monkeypatch, capsys):
    class Closed:
        def __init__(self, error):
            self.error = error

        def write(self, text):
            raise self.error

        def flush(self):
            pass
    monkeypatch.setattr(sys, "stdout", Closed(BrokenPipeError(errno.EPIPE, "Broken pipe")))
    monkeypatch.setattr("deep.cli._silence_stdout", lambda: None)
    assert main(["configs"]) == 0  # the reader went away (| head): nothing to report
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(sys, "stdout", Closed(OSError(errno.ENOSPC, "No space left on device")))
    assert main(["configs", "fmnist_bn"]) == 2
    one_error(capsys, "cannot write the output to stdout: No space left on device")


@pytest.mark.parametrize("depth, width, classes, channels, side", [(10, 1, 10, 3, 32), (16, 4, 100, 1, 28),
                                                                    (22, 3, 7, 3, 9)])
def test_the_closed_form_wrn_size_counts_the_built_model(depth, width, classes, channels, side):
    from deep.models.wrn import wrn, wrn_size
    model = wrn(depth, width, classes, channels).eval()
    outputs = []
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            m.register_forward_hook(lambda m, i, o: outputs.append(o[0].numel()))
    model(torch.zeros(1, channels, side, side))
    bn = sum(m.num_features for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert wrn_size(depth, width, classes, channels, side) == (sum(p.numel() for p in model.parameters()), bn,
                                                               sum(outputs), max(outputs))


def test_table_names_a_non_finite_seed_instead_of_dropping_it(tmp_path, capsys):
    for seed, accuracy in ((0, 95.0), (1, float("nan")), (2, 96.0)):
        (tmp_path / f"s{seed}").mkdir()
        (tmp_path / f"s{seed}" / "results.json").write_text(json.dumps({
            "config": {"name": "cifar10_bn"}, "seed": seed,
            "models": {"averaged": {"stored": {"accuracy": accuracy, "nll": 0.2}}}}))
    assert main(["table"] + [str(tmp_path / f"s{i}") for i in range(3)]) == 0
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [
        f"note: {tmp_path / 's1' / 'results.json'} (cifar10_bn, seed 1): averaged.stored.accuracy = nan not finite "
        f"(a diverged run?); left out of the means and counts (n=)"]
    assert "95.50 ± 0.71 (n=2)" in captured.out
