"""The production instance, for real: Dagster's run, event-log and schedule storage in a PostgreSQL server
started here, runs going through the QueuedRunCoordinator of deploy/k8s/dagster.yaml, and the daemon
launching them. The new-inputs sensor registers a tar shard of photos, the automation sensor builds
the collection assets after them; the test then reads the stored runs, materializations and check
results back, and checks from the runs' own start and end times that the queue's limit held.

PostgreSQL comes from Debian (postgresql-15; .ci/run installs it). initdb refuses to run as root, so
as root the server runs as the `postgres` user the package creates."""

from __future__ import annotations

import io
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "deploy" / "k8s"
PASSWORD = "lineup-test-pw"
MAX_CONCURRENT_RUNS = 1  # two cores: one run at a time, so any overlap in the stored runs is a breach


def _pg_bin() -> Path | None:
    for d in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (d / "initdb").exists():
            return d
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_server_user(cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd
    import pwd

    try:
        pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("running as root and there is no `postgres` user to run the server as (apt-get install postgresql-15)")
    return ["runuser", "-u", "postgres", "--", *cmd]


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server in a temporary folder, password auth over TCP, database `dagster`."""
    pg = _pg_bin()
    if pg is None:
        pytest.skip("PostgreSQL is not installed (apt-get install -y postgresql-15; .ci/run does it)")
    root = Path(tempfile.mkdtemp(prefix="lineup-pg-"))
    root.chmod(0o755)
    data, pwfile = root / "data", root / "pw"
    pwfile.write_text(PASSWORD)
    pwfile.chmod(0o644)
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    port = _free_port()

    def _interrupt(*_):  # a `timeout` (SIGTERM) still runs the teardown below: no server left behind
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _interrupt)
    subprocess.run(_as_server_user([str(pg / "initdb"), "-D", str(data), "-U", "dagster", "--pwfile", str(pwfile),
                                    "--auth-host=scram-sha-256", "--auth-local=trust", "-E", "UTF8"]),
                   check=True, capture_output=True, timeout=120)
    subprocess.run(_as_server_user([str(pg / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "-t", "60",
                                    "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c max_connections=200",
                                    "start"]), check=True, capture_output=True, timeout=120)
    try:
        import psycopg2

        con = psycopg2.connect(host="127.0.0.1", port=port, user="dagster", password=PASSWORD, dbname="postgres")
        con.autocommit = True
        con.cursor().execute("CREATE DATABASE dagster")
        con.close()
        yield {"host": "127.0.0.1", "port": port}
    finally:
        subprocess.run(_as_server_user([str(pg / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]),
                       capture_output=True, timeout=120, check=False)
        shutil.rmtree(root, ignore_errors=True)
        signal.signal(signal.SIGTERM, previous)


def instance_yaml(host: str, port: int) -> dict:
    """deploy/k8s/dagster.yaml with the database here and runs launched as local processes (no cluster):
    the storage, the queue and its tag limits are the production file's own."""
    cfg = yaml.safe_load((K8S / "dagster.yaml").read_text())
    cfg["storage"]["postgres"]["postgres_db"].update(hostname=host, port=port)
    cfg.pop("run_launcher")  # the default: a process per run on this machine
    cfg.pop("run_monitoring", None)
    cfg.pop("run_retries", None)
    cfg["concurrency"]["runs"]["max_concurrent_runs"] = MAX_CONCURRENT_RUNS
    cfg["concurrency"]["pools"]["default_limit"] = 1
    return cfg


def _photos(n: int) -> list[bytes]:
    shared = Path(os.environ.get("LINEUP_SHARED_FACES", REPO.parent.parent / "shared" / "data" / "faces"))
    if not shared.is_dir():
        shared = REPO.parent / "shared" / "data" / "faces"
    files = sorted(p for p in shared.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:n]
    if len(files) == n:
        return [p.read_bytes() for p in files]
    from PIL import Image  # no shared photos here: plain images (no face; they still go through every stage)

    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.new("RGB", (160, 120), (40 * i % 255, 90, 150)).save(buf, format="JPEG")
        out.append(buf.getvalue())
    return out


def _write_shard(path: Path, photos: list[bytes], offset: int) -> None:
    with tarfile.open(path, "w") as tar:
        for i, data in enumerate(photos):
            info = tarfile.TarInfo(f"{offset + i:06d}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _wait(predicate, timeout: float, what: str, daemon: subprocess.Popen, log: Path, instance):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if daemon.poll() is not None:
            pytest.fail(f"the daemon exited ({daemon.returncode}) while waiting for {what}:\n{log.read_text()[-3000:]}")
        got = predicate()
        if got:
            return got
        time.sleep(2)
    runs = [(r.job_name, r.tags.get("dagster/partition"), r.status.value) for r in instance.get_runs()]
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}; runs: {runs}; daemon log:\n{log.read_text()[-3000:]}")


def _stop_processes_naming(marker: str) -> None:
    """Kill the processes whose command line holds ``marker`` (the test's instance folder): the code server that
    the daemon starts is not in the daemon's process group: one was found still running after a whole CI run (not
    reproduced with this test alone), and a leftover server holds memory and a socket on a 2-core machine."""
    for d in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmd and int(d.name) != os.getpid():
            try:
                os.kill(int(d.name), signal.SIGKILL)
            except OSError:
                pass


def test_daemon_runs_the_graph_on_postgres(postgres, tmp_path, monkeypatch):
    pytest.importorskip("dagster_postgres", reason="pip install -e '.[k8s]'")
    import psycopg2
    from dagster import AssetKey, DagsterInstance, DagsterRunStatus, RunsFilter

    dagster_home, home, inputs = tmp_path / "dagster", tmp_path / "home", tmp_path / "input"
    for d in (dagster_home, home, inputs):
        d.mkdir()
    (dagster_home / "dagster.yaml").write_text(yaml.safe_dump(instance_yaml(**postgres)))
    # one shard: one ingest run, then the automation sensor's runs (on 2 shared cores every run process
    # costs a minute of imports; the queue check needs two runs, and the automation adds them)
    _write_shard(inputs / "a.tar", _photos(4), 0)
    env = {**os.environ, "DAGSTER_HOME": str(dagster_home), "DAGSTER_PG_PASSWORD": PASSWORD,
           "LINEUP_HOME": str(home), "LINEUP_INPUT": str(inputs), "LINEUP_ENGINE_WORKERS": "1",
           "LINEUP_DEPLOYMENT": "local", "DAGSTER_TELEMETRY_DISABLED": "1", "PYTHONPATH": str(REPO)}
    monkeypatch.setenv("DAGSTER_PG_PASSWORD", PASSWORD)  # this process reads the same instance
    bindir = Path(sys.executable).parent
    started = time.monotonic()
    # the new-inputs sensor is off by default: an operator turns it on, as in the UI
    on = subprocess.run([str(bindir / "dagster"), "sensor", "start", "new_inputs_sensor", "-w", "workspace.yaml"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert on.returncode == 0, on.stderr[-3000:]
    log = tmp_path / "daemon.log"
    with open(log, "w") as fh:
        daemon = subprocess.Popen([str(bindir / "dagster-daemon"), "run", "-w", "workspace.yaml"], cwd=REPO, env=env,
                                  stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        instance = DagsterInstance.from_config(str(dagster_home))
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        done = {DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED}

        def ingest_done():
            runs = instance.get_runs(RunsFilter(job_name="ingest_job"))
            return len(runs) == 1 and all(r.status in done for r in runs) and runs

        ingest_runs = _wait(ingest_done, 300, "the ingest run the sensor requests", daemon, log, instance)

        def automation_done():
            # the identities built by an automation run, and no run in flight (queued ones may wait: the
            # trainers and scores after them add minutes and nothing to what is checked here)
            if instance.get_latest_materialization_event(AssetKey("identities")) is None:
                return None
            running = instance.get_runs(RunsFilter(statuses=[DagsterRunStatus.STARTING, DagsterRunStatus.STARTED]))
            auto = [r for r in instance.get_runs() if r.job_name != "ingest_job"]
            return not running and auto

        auto_runs = _wait(automation_done, 300, "the automation sensor's runs of the collection assets", daemon, log, instance)
    finally:
        os.killpg(daemon.pid, signal.SIGTERM)
        try:
            daemon.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(daemon.pid, signal.SIGKILL)
        _stop_processes_naming(str(dagster_home))
    wall = time.monotonic() - started
    auto_runs = [r for r in instance.get_runs() if r.job_name != "ingest_job"]  # as the daemon left them

    assert all(r.status == DagsterRunStatus.SUCCESS for r in ingest_runs), [(r.run_id, r.status) for r in ingest_runs]
    assert {r.tags.get("dagster/partition") for r in ingest_runs} == set(instance.get_dynamic_partitions("input_partitions"))
    assert any(r.status == DagsterRunStatus.SUCCESS for r in auto_runs), [(r.job_name, r.status) for r in auto_runs]

    # what the instance says, against the database's own tables
    con = psycopg2.connect(host=postgres["host"], port=postgres["port"], user="dagster", password=PASSWORD, dbname="dagster")
    cur = con.cursor()
    cur.execute("SELECT count(*) FROM runs")
    assert cur.fetchone()[0] == len(instance.get_runs()) == len(ingest_runs) + len(auto_runs)
    cur.execute("SELECT count(*) FROM event_logs WHERE dagster_event_type = 'ASSET_MATERIALIZATION'")
    n_materializations = cur.fetchone()[0]
    cur.execute("SELECT count(*) FROM asset_check_executions WHERE execution_status IN ('SUCCEEDED', 'FAILED')")
    n_check_results = cur.fetchone()[0]
    # every run went through the queue (the QueuedRunCoordinator's event), none launched past it
    cur.execute("SELECT count(DISTINCT run_id) FROM event_logs WHERE dagster_event_type = 'PIPELINE_ENQUEUED'")
    n_enqueued = cur.fetchone()[0]
    cur.execute("SELECT count(*) FROM instigators")  # schedule storage: the sensors' state
    n_instigators = cur.fetchone()[0]
    con.close()

    partitions = sorted(instance.get_dynamic_partitions("input_partitions"))
    for asset in ("images", "faces"):
        got = instance.get_materialized_partitions(AssetKey(asset))
        assert sorted(got) == partitions, (asset, got)
    assert len(partitions) == 1
    assert n_materializations >= 2 * len(partitions) + 1  # images + faces per partition, and a collection asset
    assert instance.get_latest_materialization_event(AssetKey("identities")) is not None
    assert n_check_results >= len(partitions)  # every partition's checks, at least one each
    assert n_instigators >= 2  # the sensor turned on here and the automation sensor's ticks

    assert n_enqueued == len(ingest_runs) + len(auto_runs)
    # the queue's limit, from the runs' own start and end times
    spans = sorted((rec.start_time, rec.end_time) for rec in instance.get_run_records() if rec.start_time)
    assert len(spans) >= 2  # a run the daemon started just before it was stopped has no end: it comes last
    for (s1, e1), (s2, _e2) in itertools.pairwise(spans):
        assert e1 is not None and s2 >= e1 - 0.5, f"two runs overlapped with max_concurrent_runs={MAX_CONCURRENT_RUNS}"
    print(f"\npostgres instance: {len(ingest_runs)} ingest + {len(auto_runs)} automation runs, "
          f"{n_materializations} materializations, {n_check_results} check results in {wall:.0f} s")
