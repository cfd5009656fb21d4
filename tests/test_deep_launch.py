"""A study on several processes (deep.launch): local workers, two study processes on one folder, a killed worker,
and the SLURM path through submitit's local executor all give the one-process report, number for number (timings
aside), with each run trained once."""
import importlib.util
import json
import multiprocessing
import os
import signal
import sys

import pytest

from deep.cli import main
from deep.launch import StudyJob, chains, job_batches, parse_time, run_local, status, submit, work
from deep.study import Arm, StudySpec, _train, load_spec, run_study


TINY = dict(arch="wrn-10-1", epochs=3, batch_size=4, eval_batch_size=16, anneal_start=1, anneal_end=2, ood=())


def _spec(other: bool = False):
    """Two seeds of a base arm that owns the trunk and a late-phase arm forking it, and a deep ensemble; ``other``:
    with a late-phase arm of its own (another lr: no shared epochs)."""
    arms = (Arm("base", "fmnist_base", dict(TINY)),
            Arm("late", "fmnist_bn", dict(TINY, T0=1, K=2)),
            *([Arm("late_lr", "fmnist_bn", dict(TINY, T0=1, K=2, lr=0.05))] if other else []),
            Arm("deep_ensemble", ensemble_of="base", size=2))
    return StudySpec(name="tiny", arms=arms, seeds=(0, 1), baseline="base").validate()


RUNS = {f"{a}/seed{s}" for a in ("base", "late") for s in (0, 1)}


def logged(cfg, seed, folder, resume, fork, trunk_epoch, **kw):
    """The trainer, noting each run it starts in OUT/taken.log (one line per start: run, pid, resume, fork)."""
    out = os.path.dirname(os.path.dirname(folder))
    with open(os.path.join(out, "taken.log"), "a") as f:
        f.write(json.dumps([os.path.relpath(folder, out), os.getpid(), resume, fork is not None]) + "\n")
    _train(cfg, seed, folder, resume, fork, trunk_epoch, **kw)


def dies_once(cfg, seed, folder, resume, fork, trunk_epoch, **kw):
    """:func:`logged`, but the first start of late seed 1 kills its own process (SIGKILL) after one epoch."""
    out = os.path.dirname(os.path.dirname(folder))
    marker = os.path.join(out, "killed")
    if folder.endswith(os.path.join("late", "seed1")) and not os.path.exists(marker):
        from deep.images import ImageRun
        with open(os.path.join(out, "taken.log"), "a") as f:
            f.write(json.dumps([os.path.relpath(folder, out), os.getpid(), resume, fork is not None]) + "\n")
        run = ImageRun(cfg, seed=seed, data_dir=kw["data_dir"], out=folder, device=kw["device"], progress=False,
                       quiet=True, fork=fork, trunk_epoch=trunk_epoch, save_predictions=True)
        run.run_epoch()  # checkpointed
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    logged(cfg, seed, folder, resume, fork, trunk_epoch, **kw)


def fails(cfg, seed, folder, *args, **kw):
    from deep.errors import DeepError
    raise DeepError(f"no data for {os.path.basename(folder)}")


def _taken(out) -> list:
    with open(os.path.join(out, "taken.log")) as f:
        return [json.loads(line) for line in f]


def _numbers(report):
    """The report without its timings (train seconds, images/s)."""
    if isinstance(report, dict):
        return {k: _numbers(v) for k, v in report.items() if k not in ("train_seconds", "images_per_s")}
    if isinstance(report, list):
        return [_numbers(v) for v in report]
    return report


@pytest.fixture(scope="module")
def sequential(data_root, tmp_path_factory):
    import torch
    out = tmp_path_factory.mktemp("sequential")
    # one thread, as every worker below gets (the conftest's one_thread fixture is per test and starts after this
    # module-scoped one): a run's sums, and so its numbers, depend on its thread count
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _numbers(run_study(_spec(), str(out), str(data_root), "cpu", quiet=True, runner=logged)), out
    finally:
        torch.set_num_threads(n)


def test_the_sequential_study_forks_in_dependency_order(sequential):
    _, out = sequential
    taken = _taken(out)
    assert [t[0] for t in taken] == ["base/seed0", "late/seed0", "base/seed1", "late/seed1"]
    assert [t[3] for t in taken] == [False, True] * 2  # late forks base's trunk


def test_two_workers_give_the_sequential_report(sequential, data_root, tmp_path):
    report = run_local(_spec(), str(tmp_path), workers=2, device="cpu", data_dir=str(data_root), quiet=True,
                       runner=logged, poll=0.1)
    assert _numbers(report) == sequential[0]
    taken = _taken(tmp_path)
    assert sorted(t[0] for t in taken) == sorted(RUNS)  # each run trained once
    assert len({t[1] for t in taken}) == 2  # by two processes
    forks = {t[0]: t[3] for t in taken}
    assert forks["late/seed0"] and forks["late/seed1"]  # the forks waited for their trunks


def test_a_killed_worker_s_run_is_resumed_by_another(sequential, data_root, tmp_path):
    report = run_local(_spec(), str(tmp_path), workers=2, device="cpu", data_dir=str(data_root), quiet=True,
                       runner=dies_once, poll=0.1)
    assert _numbers(report) == sequential[0]
    late1 = [t for t in _taken(tmp_path) if t[0] == "late/seed1"]
    assert len(late1) == 2 and late1[1][2] and late1[0][1] != late1[1][1]  # resumed, in the other worker
    assert not (tmp_path / "late" / "seed1" / "lock").exists()


def test_failing_workers_are_one_line(data_root, tmp_path, capfd):
    from deep.errors import DeepError
    with pytest.raises(DeepError, match=r"4 run\(s\) unfinished .*worker \d failed: no data for seed\d; worker"):
        run_local(_spec(), str(tmp_path), workers=2, device="cpu", data_dir=str(data_root), quiet=True, runner=fails,
                  poll=0.1)
    assert "error: worker" in capfd.readouterr().err


def _study_process(spec, out, data_root):
    import torch
    torch.set_num_threads(1)  # as the sequential study's
    run_study(spec, out, str(data_root), "cpu", quiet=True, runner=logged)


def test_two_study_processes_on_one_folder_share_the_runs(sequential, data_root, tmp_path):
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_study_process, args=(_spec(), str(tmp_path), data_root)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert [p.exitcode for p in procs] == [0, 0]
    assert sorted(t[0] for t in _taken(tmp_path)) == sorted(RUNS)
    assert _numbers(json.load(open(tmp_path / "report.json"))) == _numbers(json.loads(json.dumps(sequential[0])))


def test_work_waits_for_a_run_held_elsewhere_and_for_trunks(data_root, tmp_path):
    """A process that may take only the forks of seed 0 waits while the trunk owner is held by another process and
    takes them once its trunk is there."""
    from deep.runfolder import RunLock
    spec = _spec()
    ctx = multiprocessing.get_context("spawn")
    folder = tmp_path / "base" / "seed0"
    folder.mkdir(parents=True)
    with RunLock(str(folder)):
        p = ctx.Process(target=work, args=(spec, str(tmp_path)),
                        kwargs=dict(only=["late/seed0"], data_dir=str(data_root), device="cpu", quiet=True,
                                    runner=logged, poll=0.1))
        p.start()
        p.join(timeout=3)
        assert p.is_alive() and not (tmp_path / "taken.log").exists()  # waits: base holds the trunk to come
    p.join(timeout=120)  # base released without a trunk or a checkpoint: late trains it from scratch
    assert p.exitcode == 0
    assert _taken(tmp_path)[0][0] == "late/seed0" and not _taken(tmp_path)[0][3]
    assert status(spec, str(tmp_path))[:2] == [("base/seed0", "todo", ""), ("late/seed0", "done", "")]


def test_status_names_the_jobs_of_unfinished_runs(tmp_path):
    pytest.importorskip("submitit")
    spec = _spec()
    dead = multiprocessing.get_context("spawn").Process(target=print)
    dead.start()
    dead.join()
    (tmp_path / "slurm").mkdir()
    (tmp_path / "slurm" / "jobs.json").write_text(json.dumps([
        {"job_id": str(dead.pid), "cluster": "local", "runs": ["base/seed0", "late/seed0"]},
        {"job_id": str(os.getpid()), "cluster": "local", "runs": ["base/seed1"]},
        {"job_id": "1; rm -rf x", "cluster": "slurm", "runs": ["late/seed1"]}]))  # not a job id: ignored
    (tmp_path / "late" / "seed1").mkdir(parents=True)
    (tmp_path / "late" / "seed1" / "checkpoint.pt").write_bytes(b"")
    rows = {i: (st, d) for i, st, d in status(spec, str(tmp_path))}
    assert rows["base/seed0"][0] == "failed" and f"{dead.pid}_0_log.err" in rows["base/seed0"][1]
    assert rows["base/seed1"][0] == "queued" and rows["late/seed1"][0] == "interrupted"


def test_runs_in_queued_jobs_are_not_submitted_again(tmp_path):
    pytest.importorskip("submitit")
    from deep.errors import DeepError
    (tmp_path / "slurm").mkdir()
    (tmp_path / "slurm" / "jobs.json").write_text(json.dumps([{"job_id": str(os.getpid()), "cluster": "local",
                                                                "runs": sorted(RUNS)}]))
    assert submit(_spec(), str(tmp_path), cluster="local", quiet=True) == []
    with pytest.raises(DeepError, match="belong to jobs of an earlier submission"):
        submit(_spec(), str(tmp_path), cluster="local", quiet=True, wait=True)


def test_chains_follow_the_trunks():
    assert chains(_spec(other=True)) == [["base/seed0", "late/seed0"], ["late_lr/seed0"],
                                         ["base/seed1", "late/seed1"], ["late_lr/seed1"]]
    assert chains(_spec(other=True), {"late/seed1", "late_lr/seed0"}) == [["late_lr/seed0"], ["late/seed1"]]
    groups = chains(_spec(other=True))
    assert job_batches(groups, "chain") == [groups]
    assert job_batches(groups, "run") == [[["base/seed0"], ["late_lr/seed0"], ["base/seed1"], ["late_lr/seed1"]],
                                          [["late/seed0"], ["late/seed1"]]]
    assert job_batches([["late/seed1"]], "run") == [[["late/seed1"]]]  # its owner is done: no second array
    assert [parse_time(t) for t in ("90", "1:30:00", "1-00:00:00", "0:00:30")] == [90, 90, 1440, 1]


def test_submitit_local_jobs_give_the_sequential_report(sequential, data_root, tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the jobs' threads: those of the sequential study
    spec = _spec()
    jobs = submit(spec, str(tmp_path), cluster="local", data_dir=str(data_root), quiet=True, poll=0.1, wait=True)
    assert len(jobs) == 2  # one per chain
    assert _numbers(json.load(open(tmp_path / "report.json"))) == _numbers(json.loads(json.dumps(sequential[0])))
    rows = status(spec, str(tmp_path))
    assert {r[1] for r in rows} == {"done"} and len(rows) == 4
    assert (tmp_path / "slurm" / "spec.json").exists() and load_spec(str(tmp_path / "slurm" / "spec.json")) \
        .arms[1].resolved() == spec.arms[1].resolved()
    logs = "".join(p.read_text() for p in (tmp_path / "slurm").glob("*_log.out"))  # the jobs' logs
    for arm in ("base", "late"):  # each run trained once, the late-phase runs forking their seed's trunk
        for seed in (0, 1):
            assert logs.count(f"] {arm} seed {seed} (") == 1, logs
    assert logs.count("(forking") == 2
    assert submit(spec, str(tmp_path), cluster="local", quiet=True) == []  # nothing left to submit


def test_a_job_with_several_gpus_trains_under_torchrun(data_root, tmp_path):
    """What a SLURM job with --gpus-per-run 2 runs, here with two CPU processes: the run under torchrun."""
    spec = {"name": "one", "seeds": [0], "baseline": "base",
            "arms": {"base": {"config": "fmnist_base", "overrides": dict(TINY, epochs=1)}}}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    assert StudyJob(str(path), str(tmp_path / "s"), ["base/seed0"], str(data_root), gpus=2)() == ["base/seed0"]
    assert json.load(open(tmp_path / "s" / "base" / "seed0" / "results.json"))["world_size"] == 2


def test_without_submitit_the_launcher_names_the_extra(tmp_path, capsys, monkeypatch):
    """submitit is an optional extra: deep imports without it, and --launcher says how to install it."""
    monkeypatch.setitem(sys.modules, "submitit", None)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"seeds": [0], "baseline": "base", "arms": {"base": {"config": "fmnist_base"}}}))
    assert main(["study", str(spec), "--out", str(tmp_path / "s"), "--launcher", "submitit-local"]) == 2
    assert "pip install -e '.[cluster]'" in capsys.readouterr().err


def test_cli_flags(data_root, tmp_path, capsys):
    spec = {"name": "one", "seeds": [0], "baseline": "base",
            "arms": {"base": {"config": "fmnist_base", "overrides": dict(TINY, epochs=1)}}}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    out = str(tmp_path / "s")
    bad = [(["--workers", "2", "--launcher", "slurm", "--time", "10"], "only for runs on this machine"),
           (["--partition", "gpu"], "--partition: only with --launcher slurm"),
           (["--gpus-per-run", "0"], "--gpus-per-run: only with --launcher slurm"),
           (["--launcher", "slurm"], "needs --time"),
           (["--workers", "0"], "--workers must be >= 1"),
           (["--report-only", "--workers", "2"], "--report-only cannot be combined with --workers"),
           (["--device", "cpu", "--devices", "cpu"], "either --device"),
           (["--launcher", "slurm", "--time", "soon"], "--time 'soon'"),
           (["--launcher", "submitit-local", "--slurm-arg", "bogus"], "KEY=VALUE"),
           (["--only", "nope/seed0"], "is not a run of study one"),
           (["--devices", "cpu", "cuda:99"], "--device cuda:99"),
           (["--launcher", "submitit-local", "--slurm-arg", "bogus=1"], "Unknown argument 'bogus'")]
    for flags, msg in bad:
        assert main(["study", str(path), "--out", out, *flags]) == 2, flags
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, (flags, err)
    assert main(["study", str(path), "--out", out, "--status"]) == 0
    assert "todo         base/seed0" in capsys.readouterr().out
    assert main(["study", str(path), "--out", out, "--data-dir", str(data_root), "--device", "cpu", "--quiet",
                 "--only", "base/seed0"]) == 0
    assert os.path.exists(os.path.join(out, "base", "seed0", "results.json"))
    assert not os.path.exists(os.path.join(out, "report.md"))
    assert main(["study", str(path), "--out", out, "--status"]) == 0
    assert "1 runs: 1 done" in capsys.readouterr().out
    if importlib.util.find_spec("submitit"):  # nothing left to submit: the report
        assert main(["study", str(path), "--out", out, "--launcher", "submitit-local", "--wait", "--quiet"]) == 0
        assert os.path.exists(os.path.join(out, "report.md")) and capsys.readouterr().out.strip().endswith("report.md")
    assert main(["study", str(path), "--out", out, "--workers", "2", "--devices", "cpu", "--quiet"]) == 0
    assert capsys.readouterr().out.strip().endswith("report.md")
