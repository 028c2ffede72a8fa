"""--ray: the option, the scheduling over remote workers with a fake cluster (no Ray), and
real sweeps on a local Ray cluster with fake GPUs (the cells run on the CPU), compared
with a serial sweep of the same options; a worker process and a fork server killed
mid-row are survived."""

import concurrent.futures
import dataclasses
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from harness.core.errors import SpecError
from harness.plan.cluster import ray_target
from harness.plan.options import build_config
from harness.run.forkserver import JobOutcome, RunnerError
from harness.run.launch import Lane, Launched
from harness.run.remote import Lost, RemoteExecutor
from harness.run.sweep import Sweep

ROOT = Path(__file__).resolve().parent.parent
CPU = {"has_gpu": False}


# -- the option ------------------------------------------------------------------------

NO_RAY = importlib.util.find_spec("ray") is None


@pytest.mark.skipif(NO_RAY, reason="ray is not installed (pip install -e .[ray]); CI installs it")
def test_the_option_parses_to_a_target():
    assert ray_target({"lh_ray": "auto"}).address == "auto"
    assert ray_target({"ray": "ray://head:10001"}).address == "ray://head:10001"
    local = ray_target({"lh_ray": "local:3"})
    assert local.local and local.local_gpus == 3 and ray_target({"lh_ray": "local"}).local_gpus == 2


def test_what_the_option_refuses_is_named_with_or_without_ray():
    assert ray_target({}) is None and build_config({}, CPU).ray is None
    for values, why in (({"lh_ray": "local:0"}, "at least 1"), ({"lh_ray": "auto", "lh_gpus": "0,1"}, "--gpus"),
                        ({"lh_ray": "auto", "lh_world_size": "1,2"}, "--world-size above 1")):
        with pytest.raises(SpecError, match=why):
            build_config(values, CPU)


def test_without_ray_installed_the_option_is_a_one_line_error():
    hide = ("import importlib.util as u, sys; real = u.find_spec; "
            "u.find_spec = lambda n, *a: None if n == 'ray' else real(n, *a); "
            "from harness.cli import main; sys.exit(main(['run', '--ray', 'auto']))")
    p = subprocess.run([sys.executable, "-c", hide], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert "--ray needs the ray package" in p.stderr and "pip install -e .[ray]" in p.stderr


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed (pip install -e .[ray])")
def test_an_address_nobody_answers_on_is_a_one_line_error():
    p = subprocess.run([sys.executable, "-m", "harness", "run", "--ray", "127.0.0.1:1"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert "--ray 127.0.0.1:1: nothing answers at 127.0.0.1:1" in p.stderr


# -- the scheduling, with a fake cluster -----------------------------------------------

class _FakeWorker:
    """A remote worker answering from threads: cells from 128 tokens run out of memory;
    the cluster's ``script`` makes a cell's runs lose their worker or fail it."""

    def __init__(self, cluster, n):
        self.cluster, self.n, self.info, self._boot = cluster, n, None, None
        self.lane = Lane(self, None, lambda worker: {"ray_node": self.label.split(":")[0]})

    @property
    def label(self):
        return self.lane.label or f"worker{self.n}"

    def boot(self):
        if self._boot is None:
            self._boot = self.cluster.pool.submit(self._start)
        return self._boot

    def _start(self):
        if self.n in self.cluster.bad_boots:
            raise RuntimeError("its fork server did not start")
        return {"ready": {"mode": "fake"}, "label": f"node{self.n}:gpu0"}

    def booted(self, handle):
        self.info = handle.result()
        self.lane.label = self.info["label"]
        return self.info

    def start(self):
        return self.booted(self.boot())["ready"]

    def submit(self, cell, opts, timeout_s, log_path):
        return self.cluster.pool.submit(self._run, cell)

    def _run(self, cell):
        self.cluster.ran.append((self.label, cell.cell_id))
        script = self.cluster.script.get(cell.cell_id)
        then = script.pop(0) if script else None
        time.sleep(0.02)
        if then == "lost":
            raise Lost("ActorDiedError: the actor died unexpectedly")
        if then == "fail":
            raise RuntimeError("RunnerError: the worker server did not start")
        if then == "hang":  # a node that stopped answering without being declared dead
            time.sleep(1.5)
        status = "oom" if cell.seq_len >= 128 else "ok"
        return Launched({"status": status, "tokens_per_s": 100.0 if status == "ok" else None}, 0.5, "", 0)

    def finish(self, handle, log_path):
        launched = handle.result()
        Path(log_path).write_text("fake log\n")
        return dataclasses.replace(launched, log=str(log_path))

    def run_job(self, target, args, *, timeout_s, log_path):
        return JobOutcome("env", {"hostname": "fake-host"}, 0, None, False, 0.1, str(log_path))

    def kill(self):
        self.cluster.stopped.append(self.n)

    close = kill


class _FakeCluster:
    boot_timeout_s = 5.0
    grace_s = 60.0

    def __init__(self, gpus, script=None, bad_boots=()):
        self.gpus, self.script, self.bad_boots = gpus, dict(script or {}), set(bad_boots)
        self.pool = concurrent.futures.ThreadPoolExecutor(8)
        self.ran, self.stopped, self.made = [], [], 0

    def _new(self):
        self.made += 1
        return _FakeWorker(self, self.made - 1)

    def workers(self, logs_dir):
        return [self._new() for _ in range(self.gpus)]

    def replace(self, lost):
        return self._new()

    def wait(self, handles, timeout_s):
        return list(concurrent.futures.wait(handles, timeout_s, concurrent.futures.FIRST_COMPLETED).done)

    def describe(self):
        return {"ray": "fake", "gpus": self.gpus}

    def shutdown(self):
        self.pool.shutdown(wait=False)


def _sweep(tmp_path, cluster, lengths="64,128,256"):
    lines = []
    cfg = build_config({"lh_precision": "bf16,fp32", "lh_seq_len": lengths, "lh_grad_ckpt": "off",
                        "lh_run_dir": str(tmp_path / "run")}, CPU)
    return cfg, Sweep(cfg, CPU, out=lines.append, executor=RemoteExecutor(cluster)), lines


def test_rows_decide_on_the_driver_as_in_a_serial_sweep(tmp_path):
    cluster = _FakeCluster(2)
    cfg, sweep, lines = _sweep(tmp_path, cluster)
    with sweep:
        recs = sweep.run_jobs([(c, None, False) for c in cfg.cells])
    assert [r["cell_id"] for r in recs] == [c.cell_id for c in cfg.cells]
    by = {(r["precision"], r["seq_len"]): r for r in recs}
    for p in ("bf16", "fp32"):
        assert by[p, 64]["status"] == "ok" and by[p, 128]["status"] == "oom" and by[p, 128]["log"]
        assert by[p, 256]["pruned"] is True and by[p, 256]["pruned_by"] == by[p, 128]["cell_id"]
        assert "ray_node" not in by[p, 256] and by[p, 64]["ray_node"] in ("node0", "node1")
    assert sorted(c for _, c in cluster.ran) == sorted(c.cell_id for c in cfg.cells if c.seq_len < 256)
    assert (tmp_path / "run" / "logs" / "tiny-llama__bf16__s64__gc-off.log").read_text() == "fake log\n"
    assert len([ln for ln in lines if ln.startswith("[")]) == 6 and any("] node1:gpu0 " in ln for ln in lines)
    env = json.loads((tmp_path / "run" / "env.json").read_text())
    assert [w["label"] for w in env["workers"]] == ["node0:gpu0", "node1:gpu0"]
    t = json.loads((tmp_path / "run" / "run.json").read_text())["invocations"][-1]["throughput"]
    assert t["cells_run"] == 4 and t["requeued"] == 0 and t["cluster"] == {"ray": "fake", "gpus": 2}


def test_a_lost_worker_reruns_its_cell_and_the_row_waits_for_it(tmp_path):
    lost = "tiny-llama/bf16/s128/gc-off"
    cluster = _FakeCluster(2, script={lost: ["lost"]})
    cfg, sweep, lines = _sweep(tmp_path, cluster)
    with sweep:
        recs = sweep.run_jobs([(c, None, False) for c in cfg.cells])
    assert sorted(r["cell_id"] for r in recs) == sorted(c.cell_id for c in cfg.cells)  # each once
    by = {r["cell_id"]: r for r in recs}
    assert by[lost]["status"] == "oom" and by[lost]["ray_requeued"] == 1 and not by[lost].get("pruned")
    assert by["tiny-llama/bf16/s256/gc-off"]["pruned_by"] == lost  # decided after the rerun was recorded
    assert [c for _, c in cluster.ran].count(lost) == 2 and "tiny-llama/bf16/s256/gc-off" not in dict(cluster.ran)
    assert cluster.made == 3  # a new worker for the lost one
    assert any(f"was lost while running {lost} (ActorDiedError" in ln and "it runs again (1/2" in ln for ln in lines)
    assert sum(1 for r in sweep.store.records() if r["cell_id"] == lost) == 1


def test_a_cell_that_loses_its_worker_every_time_is_a_crash(tmp_path):
    lost = "tiny-llama/fp32/s64/gc-off"
    cluster = _FakeCluster(2, script={lost: ["lost"] * 5})
    cfg, sweep, lines = _sweep(tmp_path, cluster)
    with sweep:
        recs = sweep.run_jobs([(c, None, False) for c in cfg.cells])
    by = {r["cell_id"]: r for r in recs}
    assert len(recs) == 6 and by[lost]["status"] == "crash" and by[lost]["ray_requeued"] == 3
    assert "its worker was lost 3 times while running it" in by[lost]["error"]
    assert [c for _, c in cluster.ran].count(lost) == 3 and cluster.script[lost] == ["lost", "lost"]
    assert by["tiny-llama/fp32/s128/gc-off"]["status"] == "oom"  # a crash prunes nothing
    assert any("recorded as crash" in ln for ln in lines)


def test_a_worker_that_cannot_run_cells_leaves_and_the_others_go_on(tmp_path):
    failing = "tiny-llama/fp32/s64/gc-off"  # the first cell handed out
    cluster = _FakeCluster(2, script={failing: ["fail"]}, bad_boots={1})
    cfg, sweep, lines = _sweep(tmp_path, cluster, lengths="64,128")
    with sweep:
        with pytest.raises(RunnerError, match=r"no worker is usable any more; \d cell\(s\) not run"):
            sweep.run_jobs([(c, None, False) for c in cfg.cells])
    assert any("a worker did not start (RuntimeError: its fork server did not start)" in ln for ln in lines)
    recs = sweep.store.records()
    assert recs[0]["cell_id"] == failing and recs[0]["status"] == "crash" and "failed" in recs[0]["error"]


def test_a_cell_never_answered_for_counts_as_lost(tmp_path):
    hung = "tiny-llama/fp32/s64/gc-off"
    cluster = _FakeCluster(2, script={hung: ["hang"]})
    cluster.grace_s = 0.2
    lines = []
    cfg = build_config({"lh_precision": "fp32", "lh_seq_len": "64", "lh_grad_ckpt": "off", "lh_cell_timeout": 0.1,
                        "lh_run_dir": str(tmp_path / "run")}, CPU)
    with Sweep(cfg, CPU, out=lines.append, executor=RemoteExecutor(cluster)) as sweep:
        recs = sweep.run_jobs([(c, None, False) for c in cfg.cells])
    assert [(r["status"], r["ray_requeued"]) for r in recs] == [("ok", 1)]
    assert any("no answer within the cell's time limit + 0.2 s" in ln for ln in lines)


def test_run_ends_with_one_line_when_no_worker_is_left(tmp_path, monkeypatch, capsys):
    import harness.run
    from harness.cli import main

    class _Sweep:
        records, store = [{"cell_id": "a"}], type("S", (), {"dir": tmp_path})()
        open_store = close = lambda self: None

        def run_all(self):
            raise RunnerError("no worker is usable any more; 3 cell(s) not run (rerun with --resume)")

    monkeypatch.setattr(harness.run, "open_sweep", lambda *a, **k: _Sweep())
    assert main(["run", "--seq-len", "32"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lora-harness: error: no worker is usable any more" in err
    assert f"1 cells recorded in {tmp_path}" in err


def test_a_replacement_takes_over_and_nothing_runs_once_interrupted(tmp_path):
    cluster = _FakeCluster(1, script={"tiny-llama/bf16/s64/gc-off": ["lost"]})
    cfg, sweep, _ = _sweep(tmp_path, cluster, lengths="64")
    with sweep:
        recs = sweep.run_jobs([(c, None, False) for c in cfg.cells])
        by = {r["cell_id"]: r for r in recs}
        assert [r["status"] for r in recs] == ["ok", "ok"] and by["tiny-llama/bf16/s64/gc-off"]["ray_node"] == "node1"
        assert sweep.lane.label == "node1:gpu0"  # the main lane moved to the live worker
        sweep.stopping.set()
        assert sweep.run_jobs([(c, None, False) for c in build_config(
            {"lh_seq_len": "32", "lh_run_dir": str(tmp_path / "run")}, CPU).cells]) == []


# -- real sweeps on a local Ray cluster -------------------------------------------------

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason="ray is not installed (pip install -e .[ray]); CI installs it")
ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1",
           LORA_HARNESS_RLIMIT_AS_EXTRA=str(256 * 1024 ** 2))  # a real OOM at 16k tokens, as in test_pool.py
CELLS = ("--precision", "fp32,bf16", "--seq-len", "64,16384,32768", "--grad-ckpt", "off", "--steps", "1",
         "--warmup-steps", "0")


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines() if line.strip()]


def _read(pid, what):
    try:
        return Path(f"/proc/{pid}/{what}").read_bytes()
    except OSError:
        return b""


def _ppid(pid):
    stat = _read(pid, "stat").decode(errors="replace")
    return int(stat.rsplit(")", 1)[1].split()[1]) if stat else None


class Killer(threading.Thread):
    """SIGKILLs, once each, the Ray worker process running the fp32 16k cell (the fork
    server's parent) and the fork server running the bf16 16k cell: found by the cell's
    log (its process's stdout) among the fork servers carrying this run's mark."""

    TARGETS = {"fp32__s16384": "worker process", "bf16__s16384": "fork server"}

    def __init__(self, mark):
        super().__init__(daemon=True)
        self.mark, self.killed, self.stop = mark.encode(), {}, threading.Event()

    def run(self):
        while not self.stop.is_set() and len(self.killed) < len(self.TARGETS):
            pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
            servers = [p for p in pids if b"harness.cell.server" in _read(p, "cmdline")
                       and self.mark in _read(p, "environ")]
            for child in (c for c in pids if _ppid(c) in servers):
                try:
                    log = os.readlink(f"/proc/{child}/fd/1")
                except OSError:
                    continue
                for key, what in self.TARGETS.items():
                    if key in log and key not in self.killed:
                        server = _ppid(child)
                        try:
                            os.kill(_ppid(server) if what == "worker process" else server, signal.SIGKILL)
                            self.killed[key] = what
                        except (OSError, TypeError):
                            pass
            time.sleep(0.01)


def _free_port():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """An existing cluster, as on real nodes: `ray start --head` with two fake GPUs (ended
    with it: --block stops what it started on SIGTERM). Its processes carry a mark, so the
    killer finds this cluster's fork servers and nothing else."""
    base = tmp_path_factory.mktemp("cluster")
    port = _free_port()
    env = dict(ENV, RAY_AUTH_MODE="disabled", LORA_TEST_RAY_MARK=str(base))
    log = open(base / "ray-start.log", "w")
    head = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--port",
                             str(port), "--num-gpus", "2", "--num-cpus", "3", "--include-dashboard", "false",
                             "--disable-usage-stats", "--object-store-memory", str(100 * 1024 ** 2)],
                            cwd=base, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 90
    while "Ray runtime started" not in (base / "ray-start.log").read_text() and head.poll() is None:
        assert time.monotonic() < deadline, (base / "ray-start.log").read_text()[-2000:]
        time.sleep(0.2)
    assert head.poll() is None, (base / "ray-start.log").read_text()[-2000:]
    yield f"127.0.0.1:{port}", f"LORA_TEST_RAY_MARK={base}"
    head.send_signal(signal.SIGTERM)
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        head.kill()
    log.close()


def _cli_run(run_dir, *extra, env=ENV):
    return subprocess.Popen([sys.executable, "-m", "harness", "run", *extra, *CELLS, "--run-dir", str(run_dir)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def serial_started(tmp_path_factory):
    """The serial sweep, started first: it runs while the cluster starts."""
    run_dir = tmp_path_factory.mktemp("serial") / "run"
    return _cli_run(run_dir), run_dir, time.monotonic()


@pytest.fixture(scope="module")
def serial_and_ray(serial_started, ray_cluster, tmp_path_factory):
    """The same sweep serially and on the cluster (``--ray ADDRESS``), side by side; the Ray
    one loses a worker process and a fork server mid-row."""
    (serial, serial_dir, t0), (address, mark) = serial_started, ray_cluster
    ray_dir = tmp_path_factory.mktemp("ray") / "run"
    killer = Killer(mark)
    killer.start()
    ray = _cli_run(ray_dir, "--ray", address, env=dict(ENV, RAY_AUTH_MODE="disabled"))
    outs = {"ray": ray.communicate(timeout=240)[0], "serial": serial.communicate(timeout=240)[0]}
    killer.stop.set()
    runs = {"ray": (ray.returncode, outs["ray"], ray_dir), "serial": (serial.returncode, outs["serial"], serial_dir)}
    return runs, killer.killed, time.monotonic() - t0, mark


@pytest.mark.slow
@needs_ray
def test_ray_records_the_serial_sweeps_cells_and_prunes_alike(serial_and_ray):
    runs, _, _, _ = serial_and_ray
    (code, out, ray_dir), (scode, sout, serial_dir) = runs["ray"], runs["serial"]
    assert code == 0 and scode == 0, out[-3000:] + sout[-2000:]
    ray_recs, serial_recs = _records(ray_dir), _records(serial_dir)
    pick = ("cell_id", "status", "pruned", "pruned_by")
    assert sorted(tuple(r.get(k) for k in pick) for r in ray_recs) == \
        sorted(tuple(r.get(k) for k in pick) for r in serial_recs)
    assert {r["cell_id"]: r["status"] for r in ray_recs}["tiny-llama/fp32/s16384/gc-off"] == "oom"
    assert [r["cell_id"] for r in ray_recs if r.get("pruned")] == \
        ["tiny-llama/fp32/s32768/gc-off", "tiny-llama/bf16/s32768/gc-off"]
    for r in ray_recs:
        if r.get("pruned"):
            assert "ray_node" not in r and "gpu_index" not in r and r["wall_time_s"] == 0.0
            continue
        assert r["ray_node"] == r["hostname"] and r["ray_node_ip"] and r["ray_gpu_id"] in ("0", "1")
        assert r["gpu_index"] == int(r["ray_gpu_id"]) and r["gpu_uuid"] == f"FAKE-GPU-{r['ray_gpu_id']}"
        assert r["cuda_visible_devices"] == r["ray_gpu_id"] and r["device"] == "cpu"  # pinned, cells on the CPU
        assert (ray_dir / r["log"]).read_text().startswith("address space capped")  # shipped back
    assert re.search(r"\[\d/6\] \S+:gpu[01] tiny-llama/", out) and "6 cells: 2 ok, 4 oom" in out
    from harness.report.agree import agreement, parse_tolerances
    from harness.report.load import load_run_set

    # speed on a shared 2-core host is not comparable; the cells and their memory are
    res = agreement(load_run_set([serial_dir]).records, load_run_set([ray_dir]).records,
                    parse_tolerances(["tokens_per_s:1000%"]))
    assert {r.cell_id for r in res} == {"tiny-llama/fp32/s64/gc-off", "tiny-llama/bf16/s64/gc-off"}
    assert {r.verdict for r in res if r.metric == "memory_bytes"} == {"agree"}


@pytest.mark.slow
@needs_ray
def test_a_killed_worker_process_and_fork_server_are_survived(serial_and_ray):
    runs, killed, took, mark = serial_and_ray
    code, out, ray_dir = runs["ray"]
    assert killed == {"fp32__s16384": "worker process", "bf16__s16384": "fork server"}, out[-3000:]
    recs = _records(ray_dir)
    ids = [r["cell_id"] for r in recs]
    assert len(ids) == 6 and len(set(ids)) == 6  # every cell recorded once
    by = {r["cell_id"]: r for r in recs}
    for p in ("fp32", "bf16"):
        assert by[f"tiny-llama/{p}/s16384/gc-off"]["ray_requeued"] == 1
        assert by[f"tiny-llama/{p}/s16384/gc-off"]["status"] == "oom"  # the rerun's own result
    assert re.search(r"was lost while running tiny-llama/fp32/s16384/gc-off \(ActorDiedError", out), out[-3000:]
    assert "was lost while running tiny-llama/bf16/s16384/gc-off (the fork server on" in out
    t = json.loads((ray_dir / "run.json").read_text())["invocations"][-1]["throughput"]
    assert t["requeued"] == 2 and t["cluster"]["gpus"] == 2
    # replacements join when they are ready: before the last cell or, on a slow host, not at all
    assert 2 <= len(json.loads((ray_dir / "env.json").read_text())["workers"]) <= 4

    def left():  # fork servers and cells of this cluster still running
        return [p for p in os.listdir("/proc") if p.isdigit() and mark.encode() in _read(p, "environ")
                and b"harness.cell" in _read(p, "cmdline")]

    deadline = time.monotonic() + 30  # a server stopped while still importing leaves once it reads its input
    while left() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left()  # nothing left behind on the cluster
    print(f"serial and Ray sweeps side by side: {took:.0f} s")


@pytest.mark.slow
@needs_ray
def test_pytest_suites_with_ray(tmp_path):
    run_dir = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "pytest", "suites/test_matrix.py", "-p", "no:cacheprovider",
                        "--ray", "local:2", "--precision", "bf16,fp32", "--seq-len", "64", "--grad-ckpt", "off",
                        "--steps", "1", "--warmup-steps", "0", "--run-dir", str(run_dir)],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    assert "2 passed" in p.stdout and "lora-harness results" in p.stdout
    assert re.search(r"\[\d/2\] \S+:gpu[01] tiny-llama/bf16/s64/gc-off: ok", p.stdout)
    recs = _records(run_dir)
    assert len(recs) == 2 and all(r["ray_node"] and r["status"] == "ok" for r in recs)
    q = subprocess.run([sys.executable, "-m", "harness", "run", "--ray", "auto", "--gpus", "0"], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert q.returncode == 2 and q.stderr.count("\n") == 1 and "give one or the other" in q.stderr
