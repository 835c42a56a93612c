"""The Kubernetes deployment (deploy/k8s/) validates without a cluster: the instance config against
Dagster's schemas (Postgres storage, the K8sRunLauncher, the run queue), the Helm values against the
instance they must render, and the definitions loaded as the code server loads them there."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "deploy" / "k8s"


def _instance() -> dict:
    return yaml.safe_load((K8S / "dagster.yaml").read_text())


def _env() -> dict:
    out = {}
    for line in (K8S / "lineup.env").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            k, v = line.split("=", 1)
            out[k] = v
    return out


def test_instance_config_validates():
    from dagster._config import validate_config
    from dagster._core.instance.config import dagster_instance_config_schema
    from dagster._core.run_coordinator import QueuedRunCoordinator

    cfg = _instance()
    assert validate_config(dagster_instance_config_schema(), cfg).success
    assert validate_config(QueuedRunCoordinator.config_type(), cfg["run_coordinator"]["config"]).success
    broken = {**cfg["run_coordinator"]["config"], "max_concurrent_run": 64}  # a typo must not pass
    assert not validate_config(QueuedRunCoordinator.config_type(), broken).success
    assert cfg["run_launcher"]["class"] == "K8sRunLauncher" and "postgres" in cfg["storage"]


def test_k8s_classes_accept_their_config():
    pytest.importorskip("dagster_k8s", reason="pip install -e '.[k8s]'")
    pytest.importorskip("dagster_postgres", reason="pip install -e '.[k8s]'")
    from dagster._config import validate_config
    from dagster_k8s import K8sRunLauncher
    from dagster_postgres import DagsterPostgresStorage

    cfg = _instance()
    assert validate_config(K8sRunLauncher.config_type(), cfg["run_launcher"]["config"]).success
    assert not validate_config(K8sRunLauncher.config_type(), {**cfg["run_launcher"]["config"], "env_secret": []}).success
    assert validate_config(DagsterPostgresStorage.config_type(), cfg["storage"]["postgres"]).success


def test_helm_values_render_this_instance():
    values = yaml.safe_load((K8S / "values.yaml").read_text())
    cfg = _instance()
    queue = values["dagsterDaemon"]["runCoordinator"]["config"]["queuedRunCoordinator"]
    want = cfg["run_coordinator"]["config"]
    assert queue["maxConcurrentRuns"] == want["max_concurrent_runs"]
    assert queue["tagConcurrencyLimits"] == want["tag_concurrency_limits"]
    launcher = values["runLauncher"]["config"]["k8sRunLauncher"]
    rl = cfg["run_launcher"]["config"]
    assert launcher["jobNamespace"] == rl["job_namespace"]
    assert [c["name"] for c in launcher["envConfigMaps"]] == rl["env_config_maps"]
    assert [s["name"] for s in launcher["envSecrets"]] == rl["env_secrets"]
    assert launcher["volumes"][0]["persistentVolumeClaim"]["claimName"] == rl["volumes"][0]["persistent_volume_claim"]["claim_name"]
    assert cfg["concurrency"]["pools"]["default_limit"] >= 1
    code = values["dagster-user-deployments"]["deployments"][0]
    assert code["dagsterApiGrpcArgs"] == ["-m", "assets.definitions"]
    assert _env()["LINEUP_TRAINER_IMAGE"].startswith(code["image"]["repository"])
    assert _env()["LINEUP_HOME"] == code["volumeMounts"][0]["mountPath"] == rl["volume_mounts"][0]["mount_path"]


def test_definitions_load_with_the_k8s_configuration():
    """The code server's view: LINEUP_DEPLOYMENT=k8s and the ConfigMap's environment."""
    pytest.importorskip("dagster_k8s", reason="pip install -e '.[k8s]'")
    probe = r"""
import json
import dagster as dg
from assets.definitions import defs
dg.Definitions.validate_loadable(defs)
client = defs.resources["trainer_client"]
graph = defs.resolve_asset_graph()
trainers = ["dpo_lora", "identity_adapter", "social_reward_model"]
print(json.dumps({
    "client": [c.__name__ for c in type(client).__mro__],
    "image": client.image, "namespace": client.namespace, "spec": client.pod_spec,
    "pools": {t: sorted(graph.get(dg.AssetKey(t)).pools or []) for t in trainers},
    "partitioned": sorted(k.to_user_string() for k in graph.get_all_asset_keys() if graph.get(k).partitions_def),
}))
"""
    env = {**os.environ, **_env(), "LINEUP_INPUT": ""}
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert "PipesK8sClient" in got["client"]
    assert got["image"] == _env()["LINEUP_TRAINER_IMAGE"] and got["namespace"] == "lineup"
    assert got["spec"]["node_selector"] == json.loads(_env()["LINEUP_GPU_NODE_SELECTOR"])
    container = got["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert got["spec"]["volumes"][0]["persistent_volume_claim"]["claim_name"] == "lineup-home"
    assert all(p == ["gpu"] for p in got["pools"].values()), got["pools"]
    assert got["partitioned"] == ["face_expressions", "faces", "images"]
