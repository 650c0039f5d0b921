"""The fault and load campaign's long cases: each run for real, compared with an
uninterrupted run of the same seed, one result row per case.

    python benchmarks/reliability.py [--cases 1,1b,2,3,4,5,6,7] [--out FILE.json]
        [--long-candidates 20000]

Cases (the numbering of the campaign; benchmarks/results/reliability.md has the table):

1. evaluator actors SIGKILLed by pid mid-evaluation, three times in one Ray run (the driver
   ``python -m searchd.search``, 2 actors), one kill per generation; the rows compared with
   an uninterrupted Ray run; ``1b``: the same, the kills 8 s apart whatever the generation
   (so that several land within one chunk's life);
2. a worker node lost mid-search on a loopback cluster (``searchd.distributed.loopback``: the
   head and a worker node on 127.0.0.x, one evaluator actor each; the worker's raylet
   SIGKILLed), then a new node started; compared with an uninterrupted run on the cluster;
   run it under ``flock /tmp/searchd-cluster.lock``;
3. the driver SIGKILLed during the anchors (GITS, LD3) and during the held-out phase, then
   resumed (``tests/faults/test_fault_driver_phases.py`` with ``SEARCHD_LONG_FAULTS=1``);
4. a full disk for real: the run directory on a tmpfs of a few hundred KiB, mounted in a
   private mount namespace (``unshare -rm``: no root needed where user namespaces are
   allowed); the search fails, the tmpfs is grown (``mount -o remount,size=``), ``--resume``;
5. S3 down and back: a search whose run directory is on moto (127.0.0.1), the server
   stopped for 60 s (longer than a generation here) once the first part is stored, then
   started again on the same port;
   and an outage longer than ``SEARCHD_STORAGE_RETRY_S``, then ``--resume``;
6. 10,000 more fuzzed configurations (``tests/faults/test_fault_fuzz_configs.py``, seeds 1-4);
7. a long run: ``--long-candidates`` candidates of a random search at 16 samples each on the
   local engine, RSS of the driver sampled every second, Parquet parts counted, then the
   report's and a (finished) resume's wall time.

Each case prints one JSON line and the whole list goes to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "tests" / "faults"), str(REPO / "tests")]

from campaign import TINY, compare, row_key, rows  # noqa: E402

PY = sys.executable


def env(**extra: str) -> dict[str, str]:
    e = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", **extra)
    e.pop("SEARCHD_FAULT", None)
    e.pop("RAY_ADDRESS", None)
    return e


def search(args: list[str], *, extra_env: dict[str, str] | None = None,
           timeout: float = 1800) -> tuple[int, str, float]:
    """``python -m searchd.search args`` to its end; (exit status, stderr, seconds)."""
    t0 = time.monotonic()
    p = subprocess.run([PY, "-m", "searchd.search", *args], cwd=REPO, env=env(**(extra_env or {})),
                       capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stderr, time.monotonic() - t0


def row(case: str, done: str, expected: str, happened: str, diff: dict[str, Any] | None,
        ok: bool, command: str, **details: Any) -> dict[str, Any]:
    out = {"case": case, "done": done, "expected": expected, "happened": happened,
           "lost": None if diff is None else len(diff["lost"]),
           "duplicated": None if diff is None else len(diff["duplicated"]),
           "differ": None if diff is None else len(diff["differ"]),
           "best_equal": None if diff is None else diff["best_equal"],
           "ok": ok, "command": command, **details}
    print(json.dumps(out), flush=True)
    return out


# Processes ---------------------------------------------------------------------------------
def proc_table() -> list[tuple[int, int, str]]:
    """(pid, session id, command line) of every live process."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
            cmd = Path(f"/proc/{name}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] in ("Z", "X"):
            continue
        out.append((int(name), int(fields[3]), cmd.strip()))
    return out


def kill_session(sid: int) -> None:
    """SIGKILL the process group ``sid`` and every process left in session ``sid``."""
    try:
        os.killpg(sid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for _ in range(300):
        left = [p for p, s, _ in proc_table() if s == sid]
        if not left:
            return
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


# Case 1 -------------------------------------------------------------------------------------
ACTOR_ARGS = [*TINY, "--set", "search.evolution.generations=6",
              "--set", "samples.per_candidate=4000", "--set", "workers.num_workers=2",
              "--quiet"]


def ray_driver(args: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    tmp = tempfile.mkdtemp(prefix="sdr-", dir="/tmp")
    e = env(TMPDIR=tmp, RAY_TMPDIR=tmp)
    out = open(log, "w")
    p = subprocess.Popen([PY, "-m", "searchd.search", *args], cwd=REPO, env=e, stdout=out,
                         stderr=subprocess.STDOUT, start_new_session=True)
    return p, tmp


def actor_reference(work: Path) -> tuple[Path, int]:
    """The uninterrupted Ray run cases 1 and 1b are compared with (made once)."""
    ref = work / "actors-ref"
    if not (ref / "best.json").exists():
        p, tmp = ray_driver([*ACTOR_ARGS, "--run-dir", str(ref)], work / "actors-ref.log")
        rc = p.wait()
        kill_session(p.pid)
        shutil.rmtree(tmp, ignore_errors=True)
        (work / "actors-ref.rc").write_text(str(rc))
    return ref, int((work / "actors-ref.rc").read_text())


def case_actor_kills(work: Path, kills: int = 3, gap_s: float | None = None
                     ) -> dict[str, Any]:
    """``kills`` SIGKILLs of a busy evaluator actor: one per generation (``gap_s`` None: a
    kill once a new part is stored), or one every ``gap_s`` seconds regardless of the
    generation (each kill waits for a busy actor that is not a previous victim), which puts
    them within one chunk's life (case 1b)."""
    ref, rc_ref = actor_reference(work)
    name = "actors-run" if gap_s is None else "actors-close"
    run = work / name
    p, tmp = ray_driver([*ACTOR_ARGS, "--run-dir", str(run)], work / f"{name}.log")
    killed: list[tuple[float, int, int]] = []  # (seconds since start, pid, parts stored)
    last_parts = 0  # one kill per generation: each in a generation of its own
    t0 = time.monotonic()
    last_kill = -math.inf
    while p.poll() is None and len(killed) < kills:
        folder = run / "evaluations"
        parts = len(list(folder.glob("part-*.parquet"))) if folder.is_dir() else 0
        busy = [pid for pid, sid, cmd in proc_table()
                if sid == p.pid and cmd.startswith("ray::EvaluatorActor.evaluate")
                and pid not in {k[1] for k in killed}]
        due = parts > last_parts if gap_s is None else time.monotonic() - last_kill >= gap_s
        if busy and due:
            os.kill(busy[0], signal.SIGKILL)
            last_kill = time.monotonic()
            killed.append((round(last_kill - t0, 1), busy[0], parts))
            last_parts = parts
        time.sleep(0.05)
    rc = p.wait()
    kill_session(p.pid)
    shutil.rmtree(tmp, ignore_errors=True)
    log = (work / f"{name}.log").read_text()
    diff = compare(run, ref) if rc == 0 and rc_ref == 0 else None
    failed = [r["candidate_id"] for r in rows(run) if r["status"] != "ok"] if diff else None
    ok = bool(diff and not diff["lost"] and not diff["duplicated"] and not diff["differ"]
              and not diff["extra"] and diff["best_equal"] and len(killed) == kills
              and not failed)
    ray_lines = [ln for ln in log.splitlines() if "A worker died or was killed" in ln]
    if gap_s is None:
        title, done = ("1 actor SIGKILLed mid-evaluation",
                       f"{len(killed)} SIGKILLs of an evaluator actor (by pid, while its process "
                       "title was ray::EvaluatorActor.evaluate), one in each of generations 1-3 "
                       "of a 6-generation search on 2 actors")
    else:
        title, done = ("1b kills within one chunk's life",
                       f"{len(killed)} SIGKILLs of a busy evaluator actor {gap_s:g} s apart "
                       "regardless of the generation (each of a process not killed before), "
                       "in a 6-generation search on 2 actors")
    return row(title, done,
               "the pool replaces it, every candidate stored once, none failed, result equal "
               "to an uninterrupted Ray run",
               f"exit {rc} (reference {rc_ref}); {diff['rows'] if diff else '?'} rows, "
               f"{len(failed) if failed is not None else '?'} failed; kills (s, pid, parts "
               f"stored) {killed}; Ray's 'A worker died' lines on the console: "
               f"{len(ray_lines)}", diff, ok,
               "python -m searchd.search " + " ".join(ACTOR_ARGS)
               + " --run-dir RUN  # kill -9 <busy actor pid> x3"
               + ("" if gap_s is None else f", {gap_s:g} s apart"),
               killed=killed, log_tail=log[-600:])


# Case 2 -------------------------------------------------------------------------------------
# The quickstart made small, on a loopback cluster of two nodes (1 CPU, 1 logical GPU each):
# one evaluator actor per GPU, so one on each node (as tests/test_cluster_loopback.py).
NODE_GENERATIONS = 100
NODE_ARGS = [*TINY, "--set", f"search.evolution.generations={NODE_GENERATIONS}",
             "--set", "samples.per_candidate=300", "--set", "workers.num_workers=null",
             "--set", "workers.num_gpus_per_worker=1", "--set", "workers.cpus_per_worker=0.9",
             "--quiet"]


def evaluator_on(cluster: Any, node_id: str) -> bool:
    """Whether an EvaluatorActor is alive on the node ``node_id`` (the state API)."""
    try:
        got = cluster._request("GET", "/api/v0/actors?limit=1000&detail=true", timeout=10)
    except OSError:
        return False
    return any(a.get("class_name") == "EvaluatorActor" and a.get("node_id") == node_id
               and a.get("state") == "ALIVE" for a in got["data"]["result"]["result"])


def case_node_lost(work: Path) -> dict[str, Any]:
    """A worker node lost mid-search (its raylet SIGKILLed), then a new node started: the
    search goes on with the head's actor, and the pool's lost actor comes back on the new
    node. Compared with an uninterrupted run of the same seed on the same cluster."""
    from searchd.distributed.loopback import LoopbackCluster

    def submit(c: LoopbackCluster, run: Path) -> str:
        return c.submit([PY, "-m", "searchd.search", *NODE_ARGS, "--run-dir", str(run)],
                        working_dir=REPO)

    def n_parts(run: Path) -> int:
        folder = run / "evaluations"
        return len(list(folder.glob("part-*.parquet"))) if folder.is_dir() else 0

    ref, run = work / "node-ref", work / "node-run"
    marks: dict[str, Any] = {}
    t0 = time.monotonic()
    with LoopbackCluster(nodes=2, cpus_per_node=1, gpus_per_node=1) as c:
        ids = {n["node_ip"]: n["node_id"] for n in c.nodes()}
        marks["cluster up"] = round(time.monotonic() - t0)
        ref_job = submit(c, ref)
        ref_status = c.wait_job(ref_job, timeout_s=1800)
        marks["reference done"] = round(time.monotonic() - t0)
        job = submit(c, run)
        t1 = time.monotonic()
        while n_parts(run) < 2 and c.job(job)["status"] not in ("SUCCEEDED", "FAILED"):
            time.sleep(0.2)
        lost_at = n_parts(run)
        t_kill = round(time.monotonic() - t1)
        raylet = c.lose_node(c.node_ip(1))
        marks["raylet SIGKILLed"] = (t_kill, f"pid {raylet}", f"{lost_at} parts stored")
        marks["node counted dead"] = round(time.monotonic() - t1)
        # Two more generations on the head's actor alone, then a new node.
        while n_parts(run) < lost_at + 3 and c.job(job)["status"] == "RUNNING":
            time.sleep(0.2)
        back_at = n_parts(run)
        new_ip = c.add_node()
        ids.update({n["node_ip"]: n["node_id"] for n in c.nodes()})
        marks["new node alive"] = (round(time.monotonic() - t1), f"{back_at} parts stored")
        while c.job(job)["status"] == "RUNNING":
            if evaluator_on(c, ids[new_ip]):
                marks["an evaluator actor alive on the new node"] = (
                    round(time.monotonic() - t1), f"{n_parts(run)} parts stored")
                break
            time.sleep(1.0)
        status = c.wait_job(job, timeout_s=1800)
        marks["job ended"] = round(time.monotonic() - t1)
        log = c.job_logs(job)
    diff = compare(run, ref) if status == ref_status == "SUCCEEDED" else None
    stored = rows(run) if (run / "evaluations").is_dir() else []
    by_id = {v[:12]: k for k, v in ids.items()}
    where: dict[int, set[str]] = {}
    for r in stored:
        where.setdefault(int(r["generation"]), set()).add(
            by_id.get(str(r["node"]).rsplit("/", 1)[-1], str(r["node"])))
    phases = {"before the loss": sorted(set().union(*[where.get(g, set())
                                                       for g in range(lost_at)])),
              "after the loss, before the new node": sorted(set().union(
                  *[where.get(g, set()) for g in range(lost_at + 1, back_at)])),
              "last 3 generations": sorted(set().union(
                  *[where.get(g, set()) for g in range(NODE_GENERATIONS - 3,
                                                        NODE_GENERATIONS)]))}
    failed = [r["candidate_id"] for r in stored if r["status"] != "ok"]
    head, lost, new = c.node_ip(0), c.node_ip(1), new_ip
    back = min((g for g, v in where.items() if new in v), default=None)
    marks["first generation scored on the new node too"] = back
    ok = bool(diff and not diff["lost"] and not diff["duplicated"] and not diff["differ"]
              and not diff["extra"] and diff["best_equal"] and not failed
              and phases["before the loss"] == sorted({head, lost})
              and phases["after the loss, before the new node"] == [head]
              and new in phases["last 3 generations"])
    ray_lines = [ln for ln in log.splitlines() if "A worker died or was killed" in ln]
    return row("2 worker node lost", "loopback cluster (head 127.0.0.2 + worker 127.0.0.3, 1 "
               "CPU and 1 logical GPU each, one evaluator actor per node); the worker node's "
               "raylet SIGKILLed once 2 generations were stored; after 3 more a new node "
               f"({new}) started; {NODE_GENERATIONS} generations x 6 x 300 samples",
               "the search goes on with the head's actor; the pool grows again on the new "
               "node; every candidate stored once; result = uninterrupted run",
               f"job {status} (reference {ref_status}); {len(stored)} rows, {len(failed)} "
               f"failed; nodes per phase {phases}; times {marks}; Ray's 'A worker died' "
               f"lines in the job log: {len(ray_lines)}", diff, ok,
               "python benchmarks/reliability.py --cases 2  # ray job submit ... python -m "
               "searchd.search " + " ".join(NODE_ARGS) + " --run-dir RUN; SIGKILL of the "
               "worker node's raylet; ray start --address (a new node)",
               log_tail=log[-1500:], generations_by_node={g: sorted(v)
                                                           for g, v in sorted(where.items())})


# Case 3 -------------------------------------------------------------------------------------
def case_driver_phases() -> dict[str, Any]:
    cmd = [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           "tests/faults/test_fault_driver_phases.py"]
    t0 = time.monotonic()
    p = subprocess.run(cmd, cwd=REPO, env=env(SEARCHD_LONG_FAULTS="1"), capture_output=True,
                       text=True)
    wall = time.monotonic() - t0
    last = p.stdout.strip().splitlines()[-1] if p.stdout.strip() else p.stderr[-300:]
    return row("3 driver SIGKILLed during anchors / held-out",
               "python -m searchd.search --engine local SIGKILLed (SEARCHD_FAULT="
               "during_anchors, during_heldout), then --resume",
               "reference.npz and every stored row reused, best.json equal to an uninterrupted "
               "run's", f"{last} ({wall:.0f} s)", None, p.returncode == 0,
               "SEARCHD_LONG_FAULTS=1 python -m pytest tests/faults/test_fault_driver_phases.py")


# Case 4 -------------------------------------------------------------------------------------
def case_tmpfs(work: Path, size_k: int = 184) -> dict[str, Any]:
    """A real full disk: a tmpfs of ``size_k`` KiB in a private mount namespace."""
    if shutil.which("unshare") is None:
        return row("4 full disk (tmpfs)", "-", "-", "unshare not found: not run", None, False,
                   "-")
    ref = work / "tmpfs-ref"
    rc_ref, _, _ = search([*TINY, "--engine", "local", "--quiet", "--run-dir", str(ref)])
    mnt, keep = work / "tmpfs", work / "tmpfs-copy"
    mnt.mkdir()
    tiny = " ".join(f"'{a}'" for a in TINY)
    script = f"""
set -u
mount -t tmpfs -o size={size_k}k searchd-full {mnt} || exit 99
cd {REPO}
{PY} -m searchd.search {tiny} --engine local --quiet --run-dir {mnt}/run 2> {work}/tmpfs-1.err
echo "first: $?" > {work}/tmpfs-status
ls -la {mnt}/run {mnt}/run/evaluations > {work}/tmpfs-ls.txt 2>&1
df -k {mnt} >> {work}/tmpfs-ls.txt
mount -o remount,size=16m {mnt}
{PY} -m searchd.search --resume {mnt}/run --engine local --quiet 2> {work}/tmpfs-2.err
echo "resume: $?" >> {work}/tmpfs-status
cp -a {mnt}/run {keep}
"""
    p = subprocess.run(["unshare", "-rm", "bash", "-c", script], env=env(), text=True,
                       capture_output=True)
    if p.returncode == 99 or not (work / "tmpfs-status").exists():
        return row("4 full disk (tmpfs)", "-", "-",
                   f"could not mount a tmpfs without root: {p.stderr.strip()[-200:]}", None,
                   False, "-")
    status = (work / "tmpfs-status").read_text()
    err1 = (work / "tmpfs-1.err").read_text().strip()
    err2 = (work / "tmpfs-2.err").read_text().strip()
    diff = compare(keep, ref) if rc_ref == 0 and (keep / "best.json").exists() else None
    one_line = len(err1.splitlines()) == 1 and "No space left on device" in err1
    ok = bool(one_line and "first: 1" in status and "resume: 0" in status and diff
              and not diff["lost"] and not diff["duplicated"] and not diff["differ"]
              and diff["best_equal"] and not diff["temporaries"])
    return row("4 full disk (real tmpfs)",
               f"run directory on a {size_k} KiB tmpfs (unshare -rm; mount -t tmpfs), search "
               "until the disk is full; remount at 16 MiB; --resume",
               "one line naming the file and ENOSPC, no half-written file, resume finishes "
               "with nothing lost", f"{status.strip()}; first stderr: {err1[:300]!r}; "
               f"resume stderr: {err2[:200]!r}", diff, ok,
               "unshare -rm bash -c 'mount -t tmpfs -o size=184k ...; python -m searchd.search "
               "... --run-dir MNT/run; mount -o remount,size=16m MNT; python -m searchd.search "
               "--resume MNT/run'", listing=(work / "tmpfs-ls.txt").read_text()[-1500:])


# Case 5 -------------------------------------------------------------------------------------
def case_s3(work: Path, outage_s: float = 60.0) -> list[dict[str, Any]]:
    from s3_outage import Store

    store = Store()
    ref = work / "s3-ref"
    rc_ref, _, _ = search([*TINY, "--engine", "local", "--quiet", "--run-dir", str(ref)])
    out = []
    for name, limit, expect_rc in (("back", "120", 0), ("gone", "5", 1)):
        key = f"runs/{name}"
        args = [*TINY, "--engine", "local", "--run-dir", store.uri(key)]
        e = env(SEARCHD_STORAGE_RETRY_S=limit, **store_env())
        p = subprocess.Popen([PY, "-m", "searchd.search", *args], cwd=REPO, env=e,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        t_out = None
        while p.poll() is None:
            if any("/evaluations/part-" in k for k in store.keys(f"{key}/")):
                t0 = time.monotonic()
                back = store.outage(outage_s)
                back.join()
                t_out = time.monotonic() - t0
                break
            time.sleep(0.2)
        stdout, stderr = p.communicate()
        rc = p.returncode
        resumed = None
        if rc != 0:
            rc2, err2, _ = search(["--resume", store.uri(key), "--engine", "local", "--quiet"],
                                  extra_env=store_env())
            resumed = (rc2, err2.strip()[-300:])
        local = work / f"s3-{name}"
        download(store, key, local)
        diff = compare(local, ref) if rc_ref == 0 and (local / "best.json").exists() else None
        warnings = [ln for ln in stderr.splitlines() if "retrying in" in ln]
        errors = [ln for ln in stderr.splitlines() if ln.startswith("python -m searchd.search")]
        ok = bool(rc == expect_rc and diff and not diff["lost"] and not diff["duplicated"]
                  and not diff["differ"] and diff["best_equal"]
                  and (warnings if name == "back" else len(errors) == 1))
        out.append(row(
            f"5 S3 down {t_out or 0:.0f} s, limit {limit} s",
            f"moto stopped for {outage_s:.0f} s after the first part, started again on its "
            f"port; SEARCHD_STORAGE_RETRY_S={limit}" + ("; then --resume" if rc else ""),
            "retries with a warning, finishes, rows complete" if name == "back" else
            "one line, exit 1; --resume finishes with nothing lost",
            f"exit {rc}; {len(warnings)} retry warning(s), e.g. {warnings[:1]}; "
            f"errors {errors}; resume {resumed}", diff, ok,
            f"SEARCHD_STORAGE_RETRY_S={limit} python -m searchd.search ... --run-dir "
            f"'s3://BUCKET/{key}?endpoint_override=...'"))
    store.stop()
    return out


def store_env() -> dict[str, str]:
    from s3_outage import AWS_ENV

    return dict(AWS_ENV)


def download(store: Any, key: str, into: Path) -> None:
    for k in store.keys(f"{key}/"):
        if k.endswith("/"):  # a directory marker
            continue
        dest = into / k[len(key) + 1:]
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(store.client.get_object(Bucket="searchd-faults", Key=k)["Body"].read())


# Case 6 -------------------------------------------------------------------------------------
def case_fuzz(seeds: tuple[int, ...] = (1, 2, 3, 4), n: int = 2500) -> dict[str, Any]:
    results = []
    t0 = time.monotonic()
    for seed in seeds:
        p = subprocess.run([PY, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
                            "tests/faults/test_fault_fuzz_configs.py", "-k", "one_line"],
                           cwd=REPO, env=env(SEARCHD_FUZZ_SEED=str(seed),
                                             SEARCHD_FUZZ_CASES=str(n)),
                           capture_output=True, text=True)
        counts = [ln for ln in p.stdout.splitlines() if ln.startswith("fuzzed")]
        results.append((seed, p.returncode, p.stdout.strip().splitlines()[-1], counts))
    ok = all(rc == 0 for _, rc, _ in results)
    return row("6 fuzzed configurations", f"{len(seeds) * n} more cases (seeds {seeds})",
               "each validates or exit 2 with one line; no traceback; nothing created",
               f"{results} ({time.monotonic() - t0:.0f} s)", None, ok,
               "SEARCHD_FUZZ_SEED=s SEARCHD_FUZZ_CASES=2500 python -m pytest "
               "tests/faults/test_fault_fuzz_configs.py -k one_line")


# Case 7 -------------------------------------------------------------------------------------
def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def case_long(work: Path, candidates: int) -> dict[str, Any]:
    run = work / "long"
    batch = 500
    args = ["--config", "configs/quickstart.yaml", "--set", "search.algorithm=random",
            "--set", f"search.budget={candidates}", "--set", f"search.candidates_per_trial={batch}",
            "--set", "samples.per_candidate=16", "--set", "samples.heldout=200",
            "--set", "metric.reference=exact:500",
            "--set", "report.plots=false", "--engine", "local", "--quiet",
            "--run-dir", str(run)]
    def children_cpu() -> float:
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        return ru.ru_utime + ru.ru_stime

    c0, t0 = children_cpu(), time.monotonic()
    p = subprocess.Popen([PY, "-m", "searchd.search", *args], cwd=REPO, env=env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    samples: list[tuple[float, int | None, int]] = []
    while p.poll() is None:
        # Part files on disk (during a compaction: the new part and those it merged).
        parts = sum(1 for f in (run / "evaluations").glob("part-*.parquet")) \
            if (run / "evaluations").is_dir() else 0
        samples.append((time.monotonic() - t0, rss_kib(p.pid), parts))
        time.sleep(1.0)
    stdout, stderr = p.communicate()
    wall, search_cpu = time.monotonic() - t0, children_cpu() - c0
    c1, t1 = children_cpu(), time.monotonic()
    rep = subprocess.run([PY, "-m", "searchd.report", str(run)], cwd=REPO, env=env(),
                         capture_output=True, text=True)
    report_s, report_cpu = time.monotonic() - t1, children_cpu() - c1
    c2 = children_cpu()
    rc_resume, err_resume, resume_s = search(["--resume", str(run), "--engine", "local",
                                              "--quiet"])
    resume_cpu = children_cpu() - c2
    from searchd.storage import RunDir

    stored = rows(run) if (run / "evaluations").is_dir() else []
    ids = [row_key(r) for r in stored]  # a race's re-scoring of a candidate is its own row
    rss = [r for _, r, _ in samples if r]
    parts_max = max((n for _, _, n in samples), default=0)
    n_parts = len(RunDir(str(run)).list_parts())
    tenth = max(1, len(rss) // 10)
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    return row("7 long run", f"random search, {candidates} candidates x 16 samples, local engine",
               "RSS bounded, part count stated, report and resume < 10 s",
               f"exit {p.returncode} in {wall:.0f} s wall, {search_cpu:.0f} s CPU; "
               f"{len(stored)} rows ({len(ids) - len(set(ids))} duplicated); driver RSS "
               f"first-10% max {max(rss[:tenth], default=0) / 1024:.0f} MiB, last-10% max "
               f"{max(rss[-tenth:], default=0) / 1024:.0f} MiB, overall max "
               f"{max(rss, default=0) / 1024:.0f} MiB; parts: at most {parts_max} on disk, "
               f"{n_parts} at the end; report {report_s:.1f} s wall, {report_cpu:.1f} s CPU "
               f"(exit {rep.returncode}); finished-run resume {resume_s:.1f} s wall, "
               f"{resume_cpu:.1f} s CPU (exit {rc_resume}); load average {load}",
               None, p.returncode == 0 and rep.returncode == 0 and rc_resume == 0,
               "python -m searchd.search " + " ".join(args[:-2]),
               rss_series=[(round(t), r) for t, r, _ in samples[:: max(1, len(samples) // 40)]],
               parts_series=[(round(t), n) for t, _, n in samples[:: max(1, len(samples) // 40)]],
               stderr=stderr[-500:], resume_err=err_resume[-300:])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="1,3,4,5,6,7")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "reliability.json"))
    ap.add_argument("--long-candidates", type=int, default=20000)
    a = ap.parse_args()
    cases = {c.strip() for c in a.cases.split(",")}
    work = Path(tempfile.mkdtemp(prefix="searchd-reliability-"))
    out: list[dict[str, Any]] = []
    try:
        if "4" in cases:
            out.append(case_tmpfs(work))
        if "5" in cases:
            out += case_s3(work)
        if "1" in cases:
            out.append(case_actor_kills(work))
        if "1b" in cases:
            out.append(case_actor_kills(work, gap_s=8.0))
        if "2" in cases:
            out.append(case_node_lost(work))
        if "3" in cases:
            out.append(case_driver_phases())
        if "6" in cases:
            out.append(case_fuzz())
        if "7" in cases:
            out.append(case_long(work, a.long_candidates))
    finally:
        old = json.loads(Path(a.out).read_text()) if Path(a.out).exists() else []
        done = {r["case"] for r in out}
        merged = [r for r in old if r["case"] not in done] + out
        Path(a.out).write_text(json.dumps(merged, indent=1) + "\n")
        print(f"work directory: {work}")
    return 0 if all(r["ok"] for r in out) else 1


if __name__ == "__main__":
    sys.exit(main())
