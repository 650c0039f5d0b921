"""A real Ray cluster on this machine, driven the way a user drives a cloud cluster.

``ray start --block`` nodes on loopback addresses (searchd/distributed/loopback.py), with token
authentication (``RAY_AUTH_MODE=token``, the cluster's own token file) and ports below Ray's
worker range. One cluster and one search serve the whole module, in the order a user meets
them:

1. the cluster is a head node alone (1 CPU, 1 logical GPU); the search goes in with
   ``ray job submit --working-dir .`` and starts one evaluator actor per GPU: one, there.
   Its run directory is in an S3 bucket (moto's S3 server on 127.0.0.1), as a real cluster
   needs (it must outlive the head node);
2. a second node joins with ``ray start --address`` while the search runs, and the pool grows
   onto it (``node`` column: generation 0 on the head only, later ones on both nodes);
3. once the new node has scored candidates, ``ray job stop`` stops the job (SIGINT, through
   RAY_JOB_STOP_SIGNAL in the job's runtime env), and ``--resume`` of the same URI finishes
   it: every evaluation stored exactly once, a complete run directory;
4. the thin Tune trials ran on the head node (the Ray state API's actor records).

The configuration is the quickstart made small (6 candidates x 24 generations of 300
samples), so the module's time goes mostly to what any cluster job costs: job and driver
start-up, actors, and the final held-out re-scoring. The cluster is torn down by ending its
own processes only (never ``ray stop``, which would end every Ray process on the machine).
Every wait is bounded by the module's time budget (``BUDGET_S``); a wait that runs out fails
with the job's log, no speed is asserted.
"""

from __future__ import annotations

import collections
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from searchd.distributed.loopback import LoopbackCluster, marked_pids

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.ray, pytest.mark.slow]

BUDGET_S = 900.0  # the whole module, cluster start and teardown included
GENERATIONS = 24
POPULATION = 6
# The quickstart made small; enough generations that the second node joins and loads its
# actor before the search ends (the job is stopped as soon as it has). The pool is sized from
# the cluster (num_workers=null) as on a GPU cluster: one actor per GPU (each node advertises
# one logical GPU; the actors compute on the CPU, model.device=cpu), 0.9 CPU each.
OVERRIDES = [
    f"search.evolution.population_num={POPULATION}",
    "search.evolution.select_num=3",
    "search.evolution.mutation_num=3",
    "search.evolution.crossover_num=2",
    f"search.evolution.generations={GENERATIONS}",
    "samples.per_candidate=300",
    "samples.heldout=300",
    "metric.reference=exact:1000",
    "workers.num_workers=null",
    "workers.num_gpus_per_worker=1",
    "workers.cpus_per_worker=0.9",
    "report.grid_samples=16",
]
# Ray's default stop is SIGTERM then SIGKILL after 3 s; Tune stops cleanly on SIGINT only.
JOB_ENV = {"RAY_JOB_STOP_SIGNAL": "SIGINT", "RAY_JOB_STOP_WAIT_TIME_S": "60"}
# Dummy credentials for moto; no credential files or instance metadata are consulted.
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}
BUCKET = "searchd-cluster"


class Budget:
    """What is left of the module's time budget."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self, cap: float | None = None) -> float:
        left = max(1.0, self.end - time.monotonic())
        return left if cap is None else min(left, cap)


BUDGET = Budget(BUDGET_S)  # restarted when the cluster starts (see the fixture)


def search_command(run_dir: Path | str | None = None, resume: Path | str | None = None
                   ) -> list[str]:
    if resume is not None:
        return [sys.executable, "-m", "searchd.search", "--resume", str(resume)]
    sets = [a for o in OVERRIDES for a in ("--set", o)]
    return [sys.executable, "-m", "searchd.search", "--config", "configs/quickstart.yaml",
            *sets, "--run-dir", str(run_dir)]


def read_rows(run_dir: Path | str) -> list[dict[str, Any]]:
    from searchd.storage import RunDir, table_to_rows

    return table_to_rows(RunDir(str(run_dir)).read_evaluations(move_corrupt=False))


def parts(run_dir: Path | str) -> list[str]:
    from searchd.storage import RunDir

    run = RunDir(str(run_dir))
    return sorted(p.rsplit("/", 1)[-1] for p in run.list_parts()) if run.exists() else []


def submit(cluster: LoopbackCluster, command: list[str]) -> str:
    return cluster.submit(command, working_dir=ROOT, env_vars=dict(JOB_ENV, **AWS_ENV))


def wait_for(cluster: LoopbackCluster, job: str, ready: Any, what: str) -> None:
    """Poll ``ready()`` until true; fail with the job's log if the job ends first or the
    budget runs out."""
    deadline = time.monotonic() + BUDGET.left(420)
    while not ready():
        status = cluster.job(job)["status"]
        assert status not in ("SUCCEEDED", "FAILED", "STOPPED"), (
            f"job {status} before {what}:\n" + cluster.job_logs(job)[-4000:])
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def cluster() -> Iterator[LoopbackCluster]:
    """One node (the head) of 1 CPU and 1 logical GPU; ``search`` adds the second, alike."""
    BUDGET.end = time.monotonic() + BUDGET_S
    c = LoopbackCluster(nodes=1, cpus_per_node=1, gpus_per_node=1,
                        startup_timeout_s=BUDGET.left(240))
    try:
        c.start()
        yield c
    finally:
        c.shutdown()
        # Teardown ended this cluster's processes and no one else's: none is left.
        assert marked_pids(c.marker) == [], c.leftover_commands


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 (a free port) with one bucket; its host:port."""
    moto_server = pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    saved = {k: os.environ.get(k) for k in AWS_ENV}
    os.environ.update(AWS_ENV)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        _, port = server.get_host_and_port()
        endpoint = f"127.0.0.1:{port}"
        boto3.client("s3", endpoint_url=f"http://{endpoint}", region_name="us-east-1"
                     ).create_bucket(Bucket=BUCKET)
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def node_rows(run_uri: str, node_ids: list[str]) -> list[tuple[int, str | None]]:
    """(generation, Ray node id) of every stored evaluation."""
    return [(r["generation"], ray_node_of(r["node"], node_ids)) for r in read_rows(run_uri)]


@pytest.fixture(scope="module")
def search(cluster: LoopbackCluster, s3_endpoint: str) -> dict[str, Any]:
    """The module's search, from submission to the end of its resumed job (see the module's
    docstring); what each step left, for the tests to check."""
    from searchd.storage import RunDir

    run_uri = (f"s3://{BUCKET}/runs/grown?region=us-east-1&endpoint_override={s3_endpoint}"
               "&scheme=http")
    head = [n["node_id"] for n in cluster.nodes()]
    assert len(head) == 1
    t0 = time.monotonic()
    marks: dict[str, float] = {}  # seconds since submission, printed (pytest -s)
    job = submit(cluster, search_command(run_uri))
    wait_for(cluster, job, lambda: "1 evaluator(s) ready" in cluster.job_logs(job),
             "the evaluator pool on the head")
    marks["pool on the head"] = time.monotonic() - t0
    cluster.add_node()
    marks["second node alive"] = time.monotonic() - t0
    node_ids = [n["node_id"] for n in cluster.nodes()]
    assert len(node_ids) == 2

    # Stop the job once the pool has grown and the new node has scored a generation.
    seen = {"parts": 0, "grown": False}

    def grown() -> bool:
        n = len(parts(run_uri))
        if n != seen["parts"]:
            seen["parts"] = n
            seen["grown"] = any(node not in (None, head[0])
                                for _, node in node_rows(run_uri, node_ids))
        return seen["grown"]

    wait_for(cluster, job, grown, "evaluations on the node that joined")
    marks[f"grown (generations stored: {seen['parts']})"] = time.monotonic() - t0
    stop = cluster.stop_job(job, timeout=BUDGET.left(180))
    marks["stopped"] = time.monotonic() - t0
    stopped = {"stop": stop, "status": cluster.job(job)["status"],
               "log": cluster.job_logs(job), "parts": parts(run_uri),
               "best": RunDir(run_uri).exists("best.json")}
    resumed = submit(cluster, search_command(resume=run_uri))
    status = cluster.wait_job(resumed, timeout_s=BUDGET.left(420))
    marks["resumed job ended"] = time.monotonic() - t0
    print("loopback search:", ", ".join(f"{k} {v:.0f} s" for k, v in marks.items()))
    return {"uri": run_uri, "head": head[0], "nodes": node_ids, "job": job,
            "stopped": stopped, "status": status, "log": cluster.job_logs(resumed)}


def test_pool_grows_onto_a_node_that_joins_mid_search(search: dict[str, Any]) -> None:
    """Both nodes share this machine's host name, so the ``node`` column must name the Ray
    node (its id) for the placement to show."""
    node_ids, head = search["nodes"], search["head"]
    rows = read_rows(search["uri"])
    values = sorted({r["node"] for r in rows})
    named = {v: ray_node_of(v, node_ids) for v in values}
    assert all(named.values()), (
        f"node column values {values} do not name Ray nodes {node_ids}: record the actor's "
        "Ray node id (ray.get_runtime_context().get_node_id()) in each evaluation"
    )
    # The search started on the head alone: generation 0 was scored there only.
    assert {named[r["node"]] for r in rows if r["generation"] == 0} == {head}
    # The running job's pool grew onto the new node (before the stop) ...
    stopped_log = search["stopped"]["log"]
    assert "evaluator pool grew to 2 actor(s)" in stopped_log, stopped_log[-4000:]
    assert set(named.values()) == set(node_ids), f"evaluations only on {set(named.values())}"
    # ... and the resumed job used both nodes from its start.
    last = max(r["generation"] for r in rows)
    assert {named[r["node"]] for r in rows if r["generation"] == last} == set(node_ids)
    per_worker = collections.defaultdict(set)
    for r in rows:
        per_worker[r["worker"]].add(named[r["node"]])
    assert all(len(n) == 1 for n in per_worker.values()), dict(per_worker)


def test_tune_trials_run_on_the_head_node(cluster: LoopbackCluster,
                                          search: dict[str, Any]) -> None:
    """The trials are pinned to the head (``node:__internal_head__``): Tune's experiment
    directory is the driver's, and the trials take no slot of an evaluator node."""
    job_id = cluster.job(search["job"])["job_id"]
    got = cluster._request("GET", "/api/v0/actors?limit=1000&detail=true")
    actors = [a for a in got["data"]["result"]["result"] if a.get("job_id") == job_id]
    by_class = collections.defaultdict(set)
    for a in actors:
        by_class[a["class_name"]].add(a["node_id"])
    trials = {c: n for c, n in by_class.items() if "ImplicitFunc" in c}
    assert trials, f"no Tune trial actor among {dict(by_class)}"
    assert set().union(*trials.values()) == {search["head"]}, dict(by_class)
    # ... while the evaluator actors were on both nodes.
    assert by_class["EvaluatorActor"] == set(search["nodes"]), dict(by_class)


def test_stopped_job_resumes_with_every_evaluation_once(search: dict[str, Any]) -> None:
    from searchd.storage import RunDir

    run, stopped = RunDir(search["uri"]), search["stopped"]
    assert stopped["stop"].returncode == 0, stopped["stop"].stdout + stopped["stop"].stderr
    assert stopped["status"] == "STOPPED"
    assert len(stopped["parts"]) < GENERATIONS, "the job finished before it was stopped"
    assert not stopped["best"]
    # SIGINT let the search end cleanly: it says how to resume.
    assert "--resume" in stopped["log"], stopped["log"][-4000:]

    # The stopped job's files are kept as they were; the resumed job added the rest.
    log = search["log"]
    assert set(stopped["parts"]) <= set(parts(search["uri"])), log[-4000:]
    rows = read_rows(search["uri"])
    # The race (search.racing, on by default) re-scores the top 8 on a fresh seed block,
    # paid from the budget: rows of their own, candidates the search scored.
    race = [r for r in rows if r["trial_id"].startswith("race/")]
    rows = [r for r in rows if not r["trial_id"].startswith("race/")]
    ids = [r["candidate_id"] for r in rows]
    assert len(race) == 8 and {r["candidate_id"] for r in race} <= set(ids)
    assert len(ids) + len(race) == GENERATIONS * POPULATION, log[-4000:]
    assert len(set(ids)) == len(ids), [i for i, n in collections.Counter(ids).items() if n > 1]
    counts = collections.Counter(r["generation"] for r in rows)
    assert all(counts[g] == POPULATION for g in range(len(counts) - 1)), counts
    assert all(r["status"] == "ok" for r in rows)
    # It started from what the stopped job stored (one part per generation).
    assert f"resuming with {len(stopped['parts']) * POPULATION} stored evaluations" in log, (
        log[-4000:])
    # The resumed job ended well and left a complete run directory.
    assert search["status"] == "SUCCEEDED", log[-6000:]
    for name in ("config.yaml", "run.json", "best.json"):
        assert run.exists(name), name
    assert any(name.endswith(".png") for name in run.listdir("report"))
    best = run.read_json("best.json")
    assert best["search"]["evaluations"] == GENERATIONS * POPULATION
    # The winner is the race's (lowest mean over the search block and the fresh one), one of
    # the raced candidates; its search value is its row's.
    assert best["schedule"]["id"] == best["racing"]["winner"]
    assert best["racing"]["winner"] in {r["candidate_id"] for r in race}
    winner = next(r for r in rows if r["candidate_id"] == best["racing"]["winner"])
    assert best["search"]["value"] == winner["value"]


def test_a_job_submit_without_the_token_is_refused(cluster: LoopbackCluster,
                                                   tmp_path: Path) -> None:
    """Token authentication is on: ``ray job submit`` with no token, or another one, is
    refused and no job is made; the dashboard's HTTP API answers 401 without the header."""
    import subprocess
    import urllib.error
    import urllib.request

    wrong = tmp_path / "wrong_token"
    wrong.write_text("0" * 64)
    (tmp_path / "job").mkdir()
    clients = {
        "no token file": {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(tmp_path / "none")},
        "another token": {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(wrong)},
        "auth mode off": {},
    }
    for what, extra in clients.items():
        env = {k: v for k, v in cluster.env.items()
               if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN")}
        env.update(extra, HOME=str(tmp_path))  # no ~/.ray/auth_token to fall back on
        job_id = f"refused-{what.replace(' ', '-')}"
        done = subprocess.run(
            [sys.executable, "-m", "ray.scripts.scripts", "job", "submit", "--address",
             cluster.dashboard_url, "--submission-id", job_id, "--no-wait", "--working-dir",
             str(tmp_path / "job"), "--", "python", "-c", "print(1)"],
            env=env, capture_output=True, text=True, timeout=120)
        out = (done.stdout + done.stderr).lower()
        assert done.returncode != 0, (what, out[-2000:])
        assert "401" in out or "unauthorized" in out or "token" in out, (what, out[-2000:])
        with pytest.raises(urllib.error.HTTPError):  # the authorized API knows no such job
            cluster.job(job_id)
    req = urllib.request.Request(cluster.dashboard_url + "/api/jobs/")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code in (401, 403)


def ray_node_of(value: str, node_ids: list[str]) -> str | None:
    """The Ray node id that a ``node`` column value names: the id itself, a prefix of it of 8+
    hex digits, or a value containing either (``host/<id>``)."""
    for token in [value, *value.replace(":", "/").split("/")]:
        token = token.strip()
        if len(token) < 8:
            continue
        hits = [n for n in node_ids if n.startswith(token) or token in n or n in token]
        if len(hits) == 1:
            return hits[0]
    return None
