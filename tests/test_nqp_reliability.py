"""Bad input against `python -m nqp`, by class: every mistake is one `error:` line and exit 2, before any work; sizes
that cannot fit are refused by their memory; no warning spam, no temporary file left behind, stdout failures named
as such."""
import os
import subprocess
import sys

import pytest

from nqp.cli import main
from nqp.files import OutputError, Outputs, remove_stale_temporaries, temporary_name, write_atomic
from nqp.resources import check_memory, check_threads, cpu_count, format_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def error_line(capsys, *argv) -> str:
    code = main(list(argv))
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    return lines[0]


TINY = ["--dim", "3", "--K", "2"]


@pytest.mark.parametrize("argv, text", [
    # silent before: the curve ended before the first late-phase step
    (["curve", "--horizon", "5", "--t0", "3", "--K", "10", "--dim", "3", "--out", "c.png"], ">= 13 (T0 + K)"),
    # conflicting flags: K of plain SGD, Monte Carlo flags without --simulate, a swept parameter given as a flag
    (["predict", "--method", "sgd", "--K", "5"], "--K applies to late-phase methods and to --method sgd --ensemble"),
    (["curve", *TINY, "--t0", "10", "--horizon", "30", "--runs", "5", "--out", "c.png"], "--runs applies to --simulate"),
    (["curve", *TINY, "--t0", "10", "--horizon", "30", "--seed", "1", "--threads", "1", "--out", "c.png"],
     "--seed, --threads apply to --simulate"),
    (["sweep", "--dim", "3", "--x", "lr", "0.1", "0.2", "--y", "K", "2", "--lr", "0.3", "--out", "s"],
     "--lr is swept by --x"),
    (["sweep", "--dim", "3", "--x", "K", "2", "3", "--y", "gamma_theta", "0.5", "--K", "7", "--out", "s"],
     "--K is swept by --x"),
    # no prefix matching
    (["predict", "--gam", "0.5"], "unrecognized arguments: --gam"),
    (["predict", "--gamma_theta", "0.5"], "(flags are spelled with dashes, e.g. --gamma-theta)"),
    # sizes that cannot fit: refused by their memory before anything is allocated
    (["predict", "--dim", "1e12"], "the problem needs at least 43.7 TiB of memory but this machine has"),
    (["predict", "--dim", str(10 ** 30)], "of memory but this machine has"),
    (["predict", "--dim", "3", "--lyapunov", "--K", "1000000", "--lr", "1e-12"], "covariances of"),
    (["simulate", "--dim", "2", "--runs", str(10 ** 12), "--steps", "40", "--K", "2"], "--runs 1,000,000,000,000 runs"),
    (["curve", *TINY, "--t0", "10", "--horizon", "30", "--points", str(10 ** 12), "--out", "c.png"], "--points"),
    (["sweep", "--dim", "3", "--x", "lr", f"0.01:1:{10 ** 12}", "--y", "K", "2", "--out", "s"], "values of lr"),
    (["sweep", "--dim", "3", "--x", "lr", "0.01:1:100000", "--y", "K", "1:10000:10000", "--out", "s"], "grid points"),
    # absurd thread counts
    (["simulate", *TINY, "--runs", "2", "--steps", "40", "--threads", "100000"], "--threads 100000: this machine has"),
    # non-finite range ends (numpy used to warn first)
    (["sweep", "--dim", "3", "--x", "lr", "0:inf:3", "--y", "K", "2", "--out", "s"], "range ends must be finite"),
])
def test_refusals_are_one_line(capsys, tmp_path, monkeypatch, argv, text):
    monkeypatch.chdir(tmp_path)
    assert text in error_line(capsys, *argv)
    written = [os.path.join(d, f) for d, _, files in os.walk(tmp_path) for f in files]
    assert written == []  # refused before any work: no file, no temporary file


def test_integers_in_scientific_notation_are_integers(capsys):
    assert main(["predict", "--dim", "1e2", "--json"]) == 0
    sci = capsys.readouterr().out
    assert main(["predict", "--dim", "100", "--json"]) == 0
    assert capsys.readouterr().out == sci
    assert "expected an integer" in error_line(capsys, "predict", "--dim", "2.5")


def test_a_diverging_simulation_is_one_line_without_warnings():
    r = subprocess.run([sys.executable, "-W", "default", "-m", "nqp", "simulate", "--method", "multiplicative",
                        "--curvature", "1", "--noise", "5", "--lr", "0.3", "--K", "2", "--steps", "600", "--runs", "2",
                        "--burn-in", "0", "--float32"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), r.stderr
    assert "Warning" not in r.stderr


def test_a_noiseless_curve_has_no_log_scale_warning(tmp_path):
    r = subprocess.run([sys.executable, "-W", "default", "-m", "nqp", "curve", *TINY, "--t0", "10", "--horizon", "30",
                        "--points", "5", "--noise", "0", "--w0", "1", "--out", str(tmp_path / "c.png")],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_stdout_failures_are_named_and_a_closed_pipe_is_quiet():
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    with open("/dev/full", "w") as full:
        r = subprocess.run([sys.executable, "-m", "nqp", "predict", "--dim", "3"], stdout=full, stderr=subprocess.PIPE,
                           text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == "error: cannot write the output to stdout: No space left on device"
    p = subprocess.Popen([sys.executable, "-m", "nqp", "predict", "--dim", "3"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, cwd=ROOT)
    p.stdout.close()  # the reader went away before the output
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0 and err == b""


def test_the_command_stdout_names_a_closed_stream_and_passes_a_closed_pipe():
    """nqp.console.Stdout (both CLIs' stdout): a write to a closed stream is a StdoutError, a broken pipe stays one."""
    import io

    from nqp.console import Stdout, StdoutError
    closed = io.StringIO()
    closed.close()
    with pytest.raises(StdoutError, match="closed"):
        Stdout(closed).write("x")

    class Gone(io.StringIO):
        def flush(self):
            raise BrokenPipeError

    with pytest.raises(BrokenPipeError):
        Stdout(Gone()).flush()
    out = io.StringIO()
    Stdout(out).write("kept")
    assert out.getvalue() == "kept" and Stdout(out).getvalue() == "kept"  # everything else reaches the stream


def test_outputs_all_or_nothing_and_no_temporary_left(tmp_path):
    (tmp_path / "a.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with Outputs() as out:
            out.write_text(tmp_path / "a.txt", "new")
            out.write(tmp_path / "b.png", lambda f: (_ for _ in ()).throw(RuntimeError("plot failed")))
    assert (tmp_path / "a.txt").read_text() == "old" and sorted(os.listdir(tmp_path)) == ["a.txt"]
    assert write_atomic(tmp_path / "a.txt", "new") == str(tmp_path / "a.txt")
    assert (tmp_path / "a.txt").read_text() == "new" and sorted(os.listdir(tmp_path)) == ["a.txt"]


def test_a_full_disk_is_one_line_naming_the_file_and_leaves_nothing(tmp_path, monkeypatch):
    import errno

    def full(f):
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(OutputError, match=r"cannot write .*sweep.json: the disk is full \(.* free there\)"):
        with Outputs() as out:
            out.write(tmp_path / "sweep.json", full)
    assert os.listdir(tmp_path) == []


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    mine = temporary_name(tmp_path / "x.json")
    stale = mine.replace(f".{os.getpid()}.", f".{dead}.")
    for p in (mine, stale, tmp_path / "keep.tmp"):
        open(p, "w").close()
    assert remove_stale_temporaries(str(tmp_path)) == [os.path.basename(stale)]
    assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(mine), "keep.tmp"])


def test_resource_helpers():
    assert format_bytes(512) == "512 B" and format_bytes(1.5 * 2 ** 30) == "1.5 GiB"
    check_memory([("nothing", 10, "--x")], "a request")
    with pytest.raises(Exception, match=r"a request needs at least .* of memory .* big: .* \(--big\)"):
        check_memory([("big", 1e20, "--big"), ("small", 1, "--small")], "a request")
    check_threads(None)
    check_threads(cpu_count())
    with pytest.raises(Exception, match="give at most"):
        check_threads(cpu_count() + 1)


def test_no_outputs_when_the_folder_cannot_take_files(capsys, tmp_path):
    line = error_line(capsys, "sweep", "--dim", "3", "--x", "K", "2", "--y", "lr", "0.1", "--out", "/proc/nqp_sweep")
    assert "/proc/nqp_sweep" in line
