"""A study on many processes: local workers (``--workers``, ``--devices``), several ``study`` processes on one folder,
and SLURM jobs through submitit (``--launcher slurm``); the report is the one process's, number for number.

Every way runs the same loop, :func:`work`: take the first run of the study, in :func:`deep.study.study_runs` order,
that is *ready* -- not finished, its folder not locked by another process (deep.runfolder), and, for an arm that
forks a trunk, that trunk written (or its owner not running anywhere) -- hold its folder's lock, train it
(:func:`deep.study.run_one`: resuming, forking or from scratch) and start over, until every run is finished. A
process that finds only runs held by others or trunks still training waits for them, so the run of a killed process
(its lock dropped by the operating system) is resumed by the next process that looks; the forks of a seed start as
soon as its trunk (the first T0 epochs) is written, not when its owner ends. Every run trains in exactly one process
at a time, and whether it forks or trains its first epochs itself changes no number (deep.study), so N workers give
the sequential report.

* ``--workers N`` starts N processes on this machine, worker i on ``--devices[i mod len]`` (default: every visible
  GPU, one worker each; on the CPU one device, its threads split between the workers), then writes the report.
* Two ``study`` commands on one ``--out`` share the runs the same way (e.g. one per machine on a shared file system
  with working ``flock``); each writes the report when it finds every run finished.
* ``--launcher slurm`` submits one SLURM job per run chain (a seed's trunk owner and the arms forking it, in order)
  or per run (``--job-per run``: the forks' jobs wait for their owners' through a SLURM dependency), as job arrays,
  with submitit; its files (spec.json, jobs.json, logs) go to DIR/slurm/. A job stopped at its time limit or
  preempted is requeued and resumes its run from the last epoch. ``--status`` lists the runs done / running / queued
  / failed from the folder and the scheduler; ``--report-only`` (or ``--wait``) writes the report. A run with
  ``--gpus-per-run G > 1`` trains under torchrun with G processes inside its job.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time

from nqp.files import pid_alive

from .errors import ConfigError, DeepError
from .runfolder import RunLock, holder
from .study import (
    StudySpec,
    _folder,
    _trunk_plan,
    check_existing,
    finished,
    load_spec,
    make_report,
    run_one,
    study_runs,
    trunk_owner,
)
from .trainer import write_json
from .untrusted import read_json, subfolder

POLL_SECONDS = 2.0   # how often a process with nothing ready looks again (a few stat and flock calls per run)


def run_id(arm: str, seed: int) -> str:
    """The id of a study's run: its folder relative to the study folder (ARM/seedS)."""
    return f"{arm}/seed{seed}"


def parse_run_id(spec: StudySpec, text: str) -> tuple:
    """(seed, Arm) of run id ``text`` of ``spec``; a DeepError naming the valid ids otherwise."""
    runs = {run_id(arm.name, seed): (seed, arm) for seed, arm in study_runs(spec)}
    if text not in runs:
        raise DeepError(f"--only {text!r} is not a run of study {spec.name}; runs are ARM/seedS, e.g. "
                        f"{', '.join(list(runs)[:3])}")
    return runs[text]


# ----------------------------------------------------------------------------- the loop of every process

def _state(spec: StudySpec, out: str, plan: dict, seed: int, arm, mine: set) -> tuple:
    """(state, detail) of one run: done, held (by another process: its lock's owner), waiting (for the trunk that a
    running run of its family is training) or ready. ``mine``: the run ids this process may take."""
    if finished(out, arm.name, seed):
        return "done", None
    owner = holder(_folder(out, arm.name, seed))
    if owner is not None:
        return "held", owner
    lead = trunk_owner(spec, plan, arm, seed)
    if lead is not None and not os.path.exists(os.path.join(_folder(out, arm.name, seed), "checkpoint.pt")):
        trunks = [os.path.join(_folder(out, m, seed), "trunk.pt") for m in plan[arm.name][1] if m != arm.name]
        lead_busy = holder(_folder(out, lead, seed)) is not None or run_id(lead, seed) in mine
        if not any(os.path.exists(t) for t in trunks) and not finished(out, lead, seed) and lead_busy:
            return "waiting", lead
    return "ready", None


def _take(out: str, arm: str, seed: int) -> RunLock | None:
    """The lock of run ``arm`` x ``seed`` in ``out``, or None when another process holds it (or took it first)."""
    folder = _folder(out, arm, seed)
    if holder(folder) is not None:
        return None
    subfolder(out, arm, os.path.basename(folder))  # never through a planted link: the lock would land outside out
    try:
        return RunLock(folder, f"python -m deep study (worker {os.getpid()})")
    except DeepError:
        if holder(folder) is not None:
            return None
        raise


def work(spec: StudySpec, out: str, only=None, data_dir: str = "data", device: str | None = None,
         quiet: bool = False, stream=None, runner=None, say=None, poll: float = POLL_SECONDS) -> list:
    """Train the runs of ``spec`` in ``out`` that are ready, one at a time, until every run (of ``only``, a list of
    run ids, if given) is finished; returns the ids this process trained. See the module doc; ``runner`` and the
    other arguments as in :func:`deep.study.run_study`, ``say(text)`` announces each run and each wait."""
    say = say or (lambda text: None)
    check_existing(spec, out)  # before the first run: every run already there must be this spec's
    plan = _trunk_plan(spec)
    runs = [(s, a) for s, a in study_runs(spec) if only is None or run_id(a.name, s) in only]
    mine = {run_id(a.name, s) for s, a in runs}
    taken, waited = [], None
    while True:
        states = {run_id(a.name, s): _state(spec, out, plan, s, a, mine) for s, a in runs}
        left = [i for i, (st, _) in states.items() if st != "done"]
        if not left:
            return taken
        for seed, arm in runs:
            if states[run_id(arm.name, seed)][0] != "ready":
                continue
            lock = _take(out, arm.name, seed)
            if lock is None:
                continue
            with lock:  # the trainer takes it over (same process) and gives it back here
                n = len(taken) + 1
                counts = f"run {n} of this process, {len(left)} of {len(runs)} left"
                if run_one(spec, out, seed, arm, plan, runner, data_dir=data_dir, device=device, quiet=quiet,
                           stream=stream,
                           say=lambda how, a=arm.name, s=seed, c=counts: say(f"{a} seed {s} ({how}; {c})")):
                    taken.append(run_id(arm.name, seed))
                    if not finished(out, arm.name, seed):  # taking it again would loop for ever
                        raise DeepError(f"{run_id(arm.name, seed)}: the run ended without its results and exports "
                                        f"in {_folder(out, arm.name, seed)}; see its log.jsonl")
            waited = None
            break
        else:
            why = sorted(f"{i} ({'held by ' + _who(d) if st == 'held' else f'waits for the trunk of {d}'})"
                         for i, (st, d) in states.items() if st in ("held", "waiting"))
            if why != waited:
                say(f"waiting for {len(why)} run(s): {', '.join(why[:4])}{' ...' if len(why) > 4 else ''}")
                waited = why
            time.sleep(poll)


def _who(info: dict) -> str:
    return f"process {info.get('pid', '?')}" + (f" on {info['host']}" if info.get("host") else "")


# ----------------------------------------------------------------------------- local workers

def local_devices(device: str | None, devices: list | None) -> list:
    """The devices of the workers: ``devices``, else ``device``, else every visible GPU, else the CPU."""
    if devices:
        return list(devices)
    if device:
        return [device]
    import torch
    return [f"cuda:{i}" for i in range(torch.cuda.device_count())] or ["cpu"]


def run_local(spec: StudySpec, out: str, workers: int | None = None, devices: list | None = None,
              device: str | None = None, data_dir: str = "data", quiet: bool = False, runner=None,
              poll: float = POLL_SECONDS) -> dict:
    """``workers`` processes (default: one per device) run :func:`work` on ``spec`` in ``out``, worker i on device
    ``i mod len(devices)`` with its share of this process's CPU threads; then the report (returned). A worker that
    dies leaves its run to the others; runs left unfinished when all have ended are one DeepError."""
    import multiprocessing

    import torch

    from .system import pick_device
    devs = local_devices(device, devices)
    for d in devs:
        pick_device(d)  # a device that is not here: one line now, not N failing workers
    n = workers or len(devs)
    threads = max(1, torch.get_num_threads() // n)
    say = _sayer(spec, quiet)
    if n == 1:
        work(spec, out, data_dir=data_dir, device=devs[0], quiet=quiet, runner=runner, say=say, poll=poll)
    else:
        say(f"{n} workers on {', '.join(devs)} ({threads} CPU thread(s) each)")
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter each: no forked CUDA or OpenMP state
        errors = ctx.Queue()
        procs = [ctx.Process(target=_worker, name=f"study-worker-{i}",
                             args=(i, spec, out, devs[i % len(devs)], threads, data_dir, quiet, runner, poll, errors))
                 for i in range(n)]
        try:
            for p in procs:
                p.start()
            for p in procs:
                p.join()
        except BaseException:  # Ctrl-C or SIGTERM: the workers stop too (their runs resume next time)
            for p in procs:
                if p.is_alive():
                    p.terminate()
            for p in procs:
                p.join()
            raise
        failures = []
        while not errors.empty():
            failures.append(errors.get())
        failures += [f"worker {i} was killed (signal {-p.exitcode})" for i, p in enumerate(procs) if p.exitcode < 0]
        left = [run_id(a.name, s) for s, a in study_runs(spec) if not finished(out, a.name, s)]
        if left:
            raise DeepError(f"{len(left)} run(s) unfinished ({', '.join(left[:3])}{' ...' if len(left) > 3 else ''})"
                            f": {'; '.join(failures) or 'the workers ended'}; run the study again to resume them")
        for line in failures:
            say(f"note: {line}; the other workers finished its runs")
    report = make_report(spec, out)
    say(f"report: {os.path.join(out, 'report.md')}")
    return report


def _sayer(spec: StudySpec, quiet: bool, who: str = ""):
    if quiet:
        return lambda text: None
    return lambda text: print(f"[study {spec.name}{who}] {text}", flush=True)


def _worker(i, spec, out, device, threads, data_dir, quiet, runner, poll, errors) -> None:
    """One local worker process (spawned): its threads, SIGTERM as Ctrl-C (the trainer then cleans up), the loop."""
    import signal

    import torch
    torch.set_num_threads(threads)
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))  # also for what runs on "the" current GPU (synchronize, caches)

    def stop(signum, frame):
        raise KeyboardInterrupt("terminated")
    signal.signal(signal.SIGTERM, stop)
    try:
        work(spec, out, data_dir=data_dir, device=device, quiet=quiet, runner=runner, poll=poll,
             say=_sayer(spec, quiet, f" worker {i}"))
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as e:  # one line now and for the parent's summary; the traceback too where it is a bug
        line = f"worker {i} failed: {(str(e).strip().splitlines() or [type(e).__name__])[0]}"
        errors.put(line)
        if not isinstance(e, DeepError):
            raise
        print(f"error: {line}", file=sys.stderr, flush=True)
        sys.exit(2)


# ----------------------------------------------------------------------------- SLURM through submitit

def chains(spec: StudySpec, ids: list | None = None) -> list:
    """The study's runs (of ``ids``, if given) grouped into chains, in :func:`deep.study.study_runs` order: per seed,
    one chain per trunk family (its owner first, then the arms that fork it) and one per run sharing no epochs."""
    plan = _trunk_plan(spec)
    groups: dict = {}
    for seed, arm in study_runs(spec):
        if ids is not None and run_id(arm.name, seed) not in ids:
            continue
        key = (seed, plan[arm.name][1][0]) if arm.name in plan else (seed, arm.name, "alone")
        groups.setdefault(key, []).append(run_id(arm.name, seed))
    return list(groups.values())


def job_batches(groups: list, per: str) -> list:
    """The job arrays to submit, each a list of jobs (a list of run ids): one array of the chains (``per`` chain),
    or (``per`` run) one of the chains' first runs and one of the forks, submitted to start after the first."""
    if per == "chain":
        return [groups]
    # afterany: a failed owner leaves its trunk to the fork, which then trains those epochs itself
    return [b for b in ([g[:1] for g in groups], [[i] for g in groups for i in g[1:]]) if b]


def spec_json(spec: StudySpec) -> dict:
    """``spec`` as the JSON that :func:`deep.study.load_spec` reads back (what the jobs load)."""
    arms = {}
    for a in spec.arms:
        arms[a.name] = ({"ensemble_of": a.ensemble_of, "size": a.size} if a.ensemble_of is not None else
                        {"config": a.config, "overrides": a.overrides, **({"seeds": list(a.seeds)} if a.seeds else {})})
    return {"name": spec.name, "seeds": list(spec.seeds), "baseline": spec.baseline, "rule": spec.rule,
            "description": spec.description, "arms": arms,
            **({"eval_every": spec.eval_every} if spec.eval_every is not None else {}),
            **({"contrasts": [list(p) for p in spec.contrasts]} if spec.contrasts else {})}


def parse_time(text: str) -> int:
    """Minutes of a --time value: MINUTES, HH:MM:SS or D-HH:MM:SS (SLURM's forms)."""
    try:
        days, _, clock = text.rpartition("-")
        parts = [int(p) for p in clock.split(":")]
        if len(parts) == 1 and not days:
            minutes = parts[0]
        elif len(parts) == 3:
            minutes = parts[0] * 60 + parts[1] + (parts[2] > 0)
        else:
            raise ValueError
        minutes += int(days or 0) * 24 * 60
    except ValueError:
        raise DeepError(f"--time {text!r}: give minutes or HH:MM:SS (or D-HH:MM:SS), e.g. --time 12:00:00") from None
    if minutes <= 0:
        raise DeepError(f"--time {text!r} must be positive")
    return minutes


def parse_slurm_args(pairs: list) -> dict:
    """{key: value} of the --slurm-arg KEY=VALUE pairs (submitit's slurm_KEY parameters); integers as int."""
    out = {}
    for pair in pairs or ():
        key, eq, value = pair.partition("=")
        if not eq or not key.strip():
            raise DeepError(f"--slurm-arg {pair!r}: give KEY=VALUE, e.g. --slurm-arg qos=high (submitit's slurm_KEY)")
        out[key.strip()] = int(value) if value.strip().lstrip("-").isdigit() else value
    return out


class StudyJob:
    """What one job runs: the runs ``ids`` of the study in spec.json, in order, then nothing (the report is built
    by ``--report-only`` or ``--wait``). With ``gpus`` > 1 each run trains under torchrun with that many processes.
    On a time limit or a preemption submitit calls :meth:`checkpoint`: the job is requeued and resumes its run from
    the last epoch's checkpoint (the runs are resumable)."""

    def __init__(self, spec_path: str, out: str, ids: list, data_dir: str, gpus: int = 1, poll: float = 30.0):
        self.spec_path, self.out, self.ids, self.data_dir, self.gpus, self.poll = \
            spec_path, out, list(ids), data_dir, gpus, poll

    def __call__(self) -> list:
        spec = load_spec(self.spec_path)
        if self.gpus <= 1:
            return work(spec, self.out, only=self.ids, data_dir=self.data_dir, poll=self.poll,
                        say=_sayer(spec, False, f" job {os.environ.get('SLURM_JOB_ID', os.getpid())}"))
        import subprocess
        for i in self.ids:
            if not finished(self.out, *_split(i)):
                # no flag here may abbreviate one of torchrun's: its parser matches prefixes among the script's
                # arguments too (--run would be taken for --run-path)
                subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                f"--nproc_per_node={self.gpus}", "-m", "deep", "study", self.spec_path, "--out",
                                self.out, "--data-dir", self.data_dir, "--only", i], check=True)
        return self.ids

    def checkpoint(self):
        return _submitit().helpers.DelayedSubmission(StudyJob(self.spec_path, self.out, self.ids, self.data_dir,
                                                           self.gpus, self.poll))


def _split(i: str) -> tuple:
    arm, _, seed = i.rpartition("/seed")
    return arm, int(seed)


def _submitit():
    """submitit (the optional extra ``.[cluster]``), imported under the process's own stdout: its logging handler
    keeps the sys.stdout of its import, and deep.cli's wrapper of it raises at exit where logging expects OSError."""
    stdout, sys.stdout = sys.stdout, sys.__stdout__ or sys.stdout
    try:
        import submitit
    except ModuleNotFoundError:
        raise DeepError("--launcher needs submitit: pip install -e '.[cluster]'") from None
    finally:
        sys.stdout = stdout
    return submitit


def _executor(folder: str, cluster: str, name: str, partition, gpus_per_run: int, minutes, array_parallelism,
              slurm_args: dict):
    submitit = _submitit()
    try:
        ex = submitit.AutoExecutor(folder=folder, cluster=cluster)
        params = {"name": f"study-{name}", "timeout_min": minutes or 7 * 24 * 60, "gpus_per_node": gpus_per_run,
                  "tasks_per_node": 1, **{f"slurm_{k}": v for k, v in slurm_args.items()}}
        if partition:
            params["slurm_partition"] = partition
        if array_parallelism:
            params["slurm_array_parallelism"] = array_parallelism
        ex.update_parameters(**params)
    except (NameError, ValueError, TypeError, RuntimeError) as e:
        raise DeepError(f"submitit ({cluster} cluster): {str(e).strip().splitlines()[0]}") from None
    return ex


def submit(spec: StudySpec, out: str, cluster: str = "slurm", per: str = "chain", partition: str | None = None,
           gpus_per_run: int = 1, minutes: int | None = None, array_parallelism: int | None = None,
           slurm_args: dict | None = None, data_dir: str = "data", wait: bool = False, quiet: bool = False,
           poll: float = 30.0) -> list:
    """Submit the unfinished runs of ``spec`` as job arrays (see the module doc); returns the submitit jobs. With
    ``wait``: wait for them and write the report. ``cluster`` "local" runs the same jobs on this machine
    (submitit's LocalExecutor)."""
    say = _sayer(spec, quiet)
    check_existing(spec, out)  # a run already there that is not this spec's is refused before any job
    folder = os.path.join(out, "slurm")
    ex = _executor(folder, cluster, spec.name, partition, gpus_per_run, minutes, array_parallelism,
                   slurm_args or {})  # first: a wrong parameter or no SLURM here writes nothing
    subfolder(out, "slurm")  # a link there would put the jobs' logs and records outside out
    spec_path = os.path.join(folder, "spec.json")
    text = spec_json(spec)
    if os.path.lexists(spec_path):
        try:
            same = read_json(spec_path) == json.loads(json.dumps(text))
        except (OSError, ValueError, DeepError):  # damaged, or a link: not this study's record
            same = False
        if not same:
            raise DeepError(f"{spec_path} holds another study spec than {spec.name}'s: give the same spec, or "
                            f"another --out")
    else:
        write_json(spec_path, text)
    record = _jobs_record(folder)
    states: dict = {}
    queued = {i for job in record if (states.setdefault(job["job_id"], _job_state(folder, job)).split() or
                                      ["UNKNOWN"])[0] in _QUEUED for i in job["runs"]}
    todo = [run_id(a.name, s) for s, a in study_runs(spec) if not finished(out, a.name, s)]
    again = [i for i in todo if i in queued]
    if again:  # a second submission would only wait for the first one's runs
        say(f"{len(again)} run(s) already in queued or running jobs (--status): not submitted again")
    todo = [i for i in todo if i not in queued]
    if not todo:
        say("every run is finished" if not again else "nothing to submit")
        if wait and not again:
            make_report(spec, out)
        elif wait:
            raise DeepError(f"--wait: {len(again)} run(s) belong to jobs of an earlier submission; wait for those "
                            f"(--status), then --report-only")
        return []
    batches = job_batches(chains(spec, set(todo)), per)
    jobs = []
    # a job may start in another folder than this one (sbatch --chdir, a requeue): absolute paths
    spec_path, out, data_dir = os.path.abspath(spec_path), os.path.abspath(out), os.path.abspath(data_dir)
    for batch in batches:
        if jobs and cluster == "slurm":
            ex.update_parameters(slurm_dependency="afterany:" + ":".join(sorted({j.job_id.split("_")[0]
                                                                                  for j in jobs})))
        with ex.batch():
            mine = [ex.submit(StudyJob(spec_path, out, ids, data_dir, gpus_per_run, poll)) for ids in batch]
        jobs += mine
        record += [{"job_id": j.job_id, "cluster": cluster, "runs": ids} for j, ids in zip(mine, batch)]
    write_json(os.path.join(folder, "jobs.json"), record)
    say(f"submitted {len(jobs)} job(s) for {len(todo)} run(s) (logs in {folder}); python -m deep study ... --status "
        f"lists them, --report-only writes the report when they are done")
    if wait:
        failed = []
        for j in jobs:
            try:
                j.result()
            except Exception as e:  # submitit's FailedJobError, UncompletedJobError: the job's log names the cause
                failed.append(f"job {j.job_id}: {str(e).strip().splitlines()[0] if str(e).strip() else e!r} "
                              f"(log {j.paths.stderr})")
        left = [i for i in todo if not finished(out, *_split(i))]
        if left:
            why = "; ".join(failed[:2]) or "see --status"
            raise DeepError(f"{len(left)} run(s) unfinished after the jobs ended ({why}); submit again to resume them")
        make_report(spec, out)
        say(f"report: {os.path.join(out, 'report.md')}")
    return jobs


def _jobs_record(folder: str) -> list:
    path = os.path.join(folder, "jobs.json")
    try:
        record = read_json(path)  # never through a link
        # an untrusted file: only well-formed entries (a job id is what sacct is asked about)
        return [r for r in record if isinstance(r, dict) and isinstance(r.get("runs"), list) and
                re.fullmatch(r"\d+(_\d+)?", str(r.get("job_id")))] if isinstance(record, list) else []
    except (OSError, ValueError, DeepError):
        return []


# ----------------------------------------------------------------------------- --status

_QUEUED = {"PENDING", "REQUEUED", "RUNNING", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED"}


def _job_state(folder: str, job: dict) -> str:
    """The scheduler's state of a recorded job (UNKNOWN where it cannot say: no sacct, ...)."""
    try:
        if job.get("cluster") == "local":
            pid = int(str(job["job_id"]).split("_")[0])
            return "RUNNING" if pid_alive(pid) else "FINISHED"
        return _submitit().SlurmJob(folder=folder, job_id=str(job["job_id"])).state
    except Exception:
        return "UNKNOWN"


def status(spec: StudySpec, out: str) -> list:
    """One (run id, state, detail) per run: done; running (its folder's lock held: by whom); queued (its job waits
    or runs another run of its chain first); failed (its last job ended and left it unfinished: the job's log);
    interrupted (a checkpoint, no job: runs again when resumed); todo."""
    folder = os.path.join(out, "slurm")
    last = {}
    for job in _jobs_record(folder):
        for i in job["runs"]:
            last[i] = job
    states: dict = {}
    rows = []
    for seed, arm in study_runs(spec):
        i, f = run_id(arm.name, seed), _folder(out, arm.name, seed)
        if finished(out, arm.name, seed):
            rows.append((i, "done", ""))
            continue
        owner = holder(f)
        if owner is not None:
            rows.append((i, "running", f"{_who(owner)} since {owner.get('started', '?')}"))
            continue
        job = last.get(i)
        if job is not None:
            state = states.setdefault(job["job_id"], _job_state(folder, job))
            if (state.split() or ["UNKNOWN"])[0] in _QUEUED:
                rows.append((i, "queued", f"job {job['job_id']} {state}"))
                continue
            if state != "UNKNOWN":
                rows.append((i, "failed", f"job {job['job_id']} {state}; log "
                             f"{os.path.join(folder, str(job['job_id']) + '_0_log.err')}"))
                continue
        if os.path.exists(os.path.join(f, "checkpoint.pt")):
            rows.append((i, "interrupted", "a checkpoint: the next study or job resumes it"))
        else:
            rows.append((i, "todo", f"job {job['job_id']}: state unknown" if job else ""))
    return rows


def render_status(rows: list) -> str:
    counts = {}
    for _, st, _ in rows:
        counts[st] = counts.get(st, 0) + 1
    lines = [f"{st:<12} {i}" + (f"  ({d})" if d else "") for i, st, d in rows]
    summary = f"{len(rows)} runs: " + ", ".join(f"{n} {st}" for st, n in counts.items())
    return "\n".join([*lines, summary])


# ----------------------------------------------------------------------------- command line

_SLURM_FLAGS = ("partition", "gpus_per_run", "time", "array_parallelism", "slurm_arg", "wait", "job_per")


def add_arguments(p) -> None:
    """The flags of ``python -m deep study`` that spread a study over processes, GPUs and SLURM jobs."""
    p.add_argument("--workers", type=int, default=None,
                   help="N worker processes on this machine taking the runs in dependency order (default with "
                        "--devices: one per device)")
    p.add_argument("--devices", nargs="+", default=None,
                   help="the workers' devices, worker i on the i-th (mod their number), e.g. cuda:0 cuda:1 "
                        "(default with --workers: every visible GPU, else the CPU with its threads split)")
    p.add_argument("--launcher", choices=("slurm", "submitit-local"), default=None,
                   help="submit the runs as SLURM jobs through submitit (pip install -e '.[cluster]'); "
                        "submitit-local runs the same jobs on this machine, to check a setup")
    p.add_argument("--job-per", choices=("chain", "run"), default=None,
                   help="one job per run chain (a seed's trunk owner and the arms forking it; default) or per run")
    p.add_argument("--partition", default=None, help="SLURM partition")
    p.add_argument("--gpus-per-run", type=int, default=None,
                   help="GPUs of each job (default 1; 0: CPU jobs); above 1 each run trains under torchrun with that "
                        "many processes")
    p.add_argument("--time", default=None, help="wall-clock limit of a job: MINUTES or HH:MM:SS (needed for slurm; "
                                                "a job that reaches it is requeued and resumes)")
    p.add_argument("--array-parallelism", type=int, default=None, help="at most this many jobs of an array at once")
    p.add_argument("--slurm-arg", action="append", default=None, metavar="KEY=VALUE",
                   help="any other submitit SLURM parameter (slurm_KEY), repeatable: --slurm-arg qos=high "
                        "--slurm-arg mem=64G --slurm-arg constraint=a100")
    p.add_argument("--wait", action="store_true", default=None,
                   help="with --launcher: wait for the jobs, then write the report (default: return after submitting)")
    p.add_argument("--status", action="store_true", help="list the runs done / running / queued / failed / todo, "
                                                         "from the folder and the scheduler")
    p.add_argument("--only", action="append", default=None, metavar="ARM/seedS",
                   help="train only this run of the study (repeatable), without the report (what a job runs under "
                        "torchrun)")


def _given(a, names) -> list:
    return ["--" + n.replace("_", "-") for n in names if getattr(a, n, None) is not None and
            getattr(a, n) is not False]  # (0 is given: --gpus-per-run 0)


def check_flags(a) -> None:
    """Refuse flag combinations that make no sense, in one line (DeepError, exit 2)."""
    slurm = _given(a, _SLURM_FLAGS)
    local = _given(a, ("workers", "devices", "device"))
    if slurm and not a.launcher:
        raise DeepError(f"{' '.join(slurm)}: only with --launcher slurm; add it, or drop them to run on this machine")
    if a.launcher and local:
        raise DeepError(f"{' '.join(local)}: only for runs on this machine; under --launcher each job gets its "
                        f"GPUs from the scheduler (--gpus-per-run)")
    if a.devices and a.device:
        raise DeepError("give either --device (one process) or --devices (one worker each), not both")
    for modal, others in (("report_only", ("workers", "devices", "launcher", "status", "only")),
                          ("status", ("workers", "devices", "launcher", "only")),
                          ("only", ("workers", "devices", "launcher"))):
        clash = _given(a, others) if getattr(a, modal) else []
        if clash:
            raise DeepError(f"--{modal.replace('_', '-')} cannot be combined with {' '.join(clash)}")
    for name, least in (("workers", 1), ("gpus_per_run", 0), ("array_parallelism", 1)):
        value = getattr(a, name)
        if value is not None and value < least:
            raise DeepError(f"--{name.replace('_', '-')} must be >= {least}, got {value}")
    if a.launcher == "slurm" and a.time is None:
        raise DeepError("--launcher slurm needs --time (a job's wall-clock limit, e.g. --time 24:00:00; a job that "
                        "reaches it is requeued and resumes its run)")


def study_command(a, spec: StudySpec) -> int:
    """``python -m deep study SPEC --out DIR [...]`` once the spec is loaded: the report, the status, some runs,
    local workers, SLURM jobs, or the study in this process (which shares the runs with other study processes)."""
    from .study import run_study, with_eval_every
    check_flags(a)
    if a.eval_every is not None and a.eval_every < 1:
        raise ConfigError(f"--eval-every must be >= 1 (epochs between test evaluations), got {a.eval_every}")
    spec = with_eval_every(spec, a.eval_every)
    if a.status:
        print(render_status(status(spec, a.out)))
        return 0
    if a.report_only:
        make_report(spec, a.out)
    elif a.only:
        runs = [parse_run_id(spec, i) for i in a.only]
        check_existing(spec, a.out)
        for seed, arm in runs:
            run_one(spec, a.out, seed, arm, data_dir=a.data_dir, device=a.device, quiet=a.quiet)
        return 0
    elif a.launcher:
        minutes = parse_time(a.time) if a.time else None
        gpus = 1 if a.gpus_per_run is None else a.gpus_per_run
        submit(spec, a.out, "slurm" if a.launcher == "slurm" else "local", a.job_per or "chain", a.partition, gpus,
               minutes, a.array_parallelism, parse_slurm_args(a.slurm_arg), a.data_dir, bool(a.wait), a.quiet)
        if not a.wait:
            return 0
    elif a.workers or a.devices:
        run_local(spec, a.out, a.workers, a.devices, a.device, a.data_dir, a.quiet)
    else:
        run_study(spec, a.out, a.data_dir, a.device, a.quiet)
    print(os.path.join(a.out, "report.md"))
    return 0
