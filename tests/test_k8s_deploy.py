"""The Kubernetes deployment (deploy/k8s/) validates without a cluster: the instance config against
Dagster's schemas (Postgres storage, the K8sRunLauncher, the run queue), the Helm values against the
instance they must render, and the definitions loaded as the code server loads them there."""

import json
import os
import re
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


def _values() -> dict:
    return yaml.safe_load((K8S / "values.yaml").read_text())


def test_helm_values_render_this_instance():
    values = _values()
    cfg = _instance()
    # the run limits: Dagster refuses them in run_coordinator once the instance has `concurrency`, so both
    # files keep them under concurrency.runs (the chart merges additionalInstanceConfig into the instance)
    queue = values["dagsterDaemon"]["runCoordinator"]["config"]["queuedRunCoordinator"]
    assert not {"maxConcurrentRuns", "tagConcurrencyLimits"} & set(queue)
    assert values["additionalInstanceConfig"]["concurrency"] == cfg["concurrency"]
    assert queue["dequeueNumWorkers"] == cfg["run_coordinator"]["config"]["dequeue_num_workers"]
    launcher = values["runLauncher"]["config"]["k8sRunLauncher"]
    rl = cfg["run_launcher"]["config"]
    assert launcher["jobNamespace"] == rl["job_namespace"]
    assert [c["name"] for c in launcher["envConfigMaps"]] == rl["env_config_maps"]
    assert [s["name"] for s in launcher["envSecrets"]] == rl["env_secrets"]
    assert launcher["volumes"][0]["persistentVolumeClaim"]["claimName"] == rl["volumes"][0]["persistent_volume_claim"]["claim_name"]
    assert values["postgresql"]["postgresqlScheme"] == cfg["storage"]["postgres"]["postgres_db"]["scheme"]
    assert values["global"]["serviceAccountName"] == values["serviceAccount"]["name"] == rl["service_account_name"]
    code = values["dagster-user-deployments"]["deployments"][0]
    assert code["dagsterApiGrpcArgs"] == ["-m", "assets.definitions"]
    assert _env()["LINEUP_TRAINER_IMAGE"].startswith(code["image"]["repository"])
    assert _env()["LINEUP_HOME"] == code["volumeMounts"][0]["mountPath"] == rl["volume_mounts"][0]["mount_path"]


def test_dagster_accepts_the_instance(tmp_path):
    """Dagster's own loading of dagster.yaml (schema plus its cross-field rules, e.g. run limits in one place
    only), not only the schema: the file the chart renders must be an instance Dagster will start."""
    from dagster._core.instance.config import dagster_instance_config

    (tmp_path / "dagster.yaml").write_text((K8S / "dagster.yaml").read_text())
    cfg, _ = dagster_instance_config(str(tmp_path))
    assert cfg["run_coordinator"]["class"] == "QueuedRunCoordinator"
    broken = _instance()
    broken["run_coordinator"]["config"]["max_concurrent_runs"] = 8  # the old layout: limits in two places
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(broken))
    with pytest.raises(Exception, match="concurrency"):
        dagster_instance_config(str(tmp_path))


def test_postgres_password_secret_is_the_one_the_steps_create():
    """One secret, made by hand from a file, read by every pod that opens the instance: the chart must not
    render its own (generatePostgresqlPasswordSecret), and run pods get DAGSTER_PG_PASSWORD from it."""
    values, rl = _values(), _instance()["run_launcher"]["config"]
    name = values["global"]["postgresqlSecretName"]
    assert values["generatePostgresqlPasswordSecret"] is False
    assert rl["postgres_password_secret"] == name
    assert _instance()["storage"]["postgres"]["postgres_db"]["password"] == {"env": "DAGSTER_PG_PASSWORD"}
    # as an envFrom secret its key (postgresql-password) would not be DAGSTER_PG_PASSWORD anyway
    assert name not in rl["env_secrets"]
    assert name not in [s["name"] for s in values["runLauncher"]["config"]["k8sRunLauncher"]["envSecrets"]]
    steps = (K8S / "README.md").read_text()
    assert f"create secret generic {name} --from-file=postgresql-password=" in steps
    # credentials never on a command line (shell history, process list)
    for doc in (K8S / "README.md", REPO / "README.md", K8S / "values.yaml", K8S / "Dockerfile"):
        assert "--from-literal" not in doc.read_text(), doc


# keys the dagster/dagster chart's values.schema.json accepts, read from helm/dagster/values.schema.json of
# dagster-io/dagster at commit bdb8547f (a master snapshot, not checked to equal the 1.13.27 release), kept by
# hand for the parts these values set: a guard against typos and keys of other chart versions, NOT the chart's
# schema (which is not vendored here; test_values_against_the_chart_schema below runs the real one)
CHART_KEYS = {
    "": {"dagsterWebserver", "dagster-user-deployments", "postgresql", "generatePostgresqlPasswordSecret",
         "generateCeleryConfigSecret", "rabbitmq", "redis", "flower", "ingress", "imagePullSecrets",
         "computeLogManager", "scheduler", "runLauncher", "pythonLogs", "dagsterDaemon", "busybox", "migrate",
         "telemetry", "serviceAccount", "global", "retention", "additionalInstanceConfig"},
    "global": {"postgresqlSecretName", "dagsterHome", "serviceAccountName", "celeryConfigSecretName"},
    "serviceAccount": {"create", "name", "annotations"},
    "postgresql": {"image", "enabled", "postgresqlHost", "postgresqlUsername", "postgresqlPassword",
                   "postgresqlDatabase", "postgresqlParams", "postgresqlScheme", "service"},
    "runLauncher.config.k8sRunLauncher": {
        "image", "imagePullPolicy", "jobNamespace", "loadInclusterConfig", "kubeconfigFile", "envConfigMaps",
        "envSecrets", "envVars", "volumeMounts", "volumes", "labels", "failPodOnRunFailure", "resources",
        "schedulerName", "securityContext", "runK8sConfig"},
    "runLauncher.config.k8sRunLauncher.runK8sConfig": {
        "containerConfig", "podSpecConfig", "podTemplateSpecMetadata", "jobSpecConfig", "jobMetadata"},
    "dagsterDaemon.runCoordinator.config.queuedRunCoordinator": {
        "maxConcurrentRuns", "tagConcurrencyLimits", "dequeueIntervalSeconds", "dequeueNumWorkers",
        "dequeueUseThreads", "blockOpConcurrencyLimitedRuns"},
}


def _at(tree: dict, path: str):
    for part in filter(None, path.split(".")):
        tree = tree[part]
    return tree


def test_helm_values_use_only_chart_keys():
    values = _values()
    for path, allowed in CHART_KEYS.items():
        unknown = set(_at(values, path)) - allowed
        assert not unknown, f"{path or 'top level'}: {sorted(unknown)} are not keys of the dagster chart"
    with pytest.raises(AssertionError):  # the guard itself can fail: the run limits where the chart has no key
        assert not set({**values, "concurrency": {}}) - CHART_KEYS[""]


# the pulled chart (values.yaml + values.schema.json): LINEUP_HELM_CHART, or the folder the steering repo can
# place beside the checkout (../shared/helm/dagster); this repository may not vendor the chart's files
HELM_CHART = os.environ.get("LINEUP_HELM_CHART") or str(REPO.parent / "shared" / "helm" / "dagster")


@pytest.mark.skipif(not (Path(HELM_CHART) / "values.schema.json").exists(),
                    reason="the dagster chart's values.schema.json is not on PyPI and may not be vendored here: set "
                    "LINEUP_HELM_CHART to `helm pull dagster/dagster --version 1.13.27 --untar`, or place it in "
                    "../shared/helm/dagster (deploy/k8s/README.md)")
def test_values_against_the_chart_schema(tmp_path):
    """check-jsonschema of the chart's defaults merged with these values, against the chart's own schema."""
    chart = Path(HELM_CHART)

    def merge(a, b):
        return {**a, **{k: merge(a[k], v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
                        for k, v in b.items()}}

    merged = merge(yaml.safe_load((chart / "values.yaml").read_text()), _values())
    (tmp_path / "merged.json").write_text(json.dumps(merged))
    out = subprocess.run([str(Path(sys.executable).parent / "check-jsonschema"), "--schemafile",
                          str(chart / "values.schema.json"), str(tmp_path / "merged.json")],
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def test_definitions_load_with_the_k8s_configuration():
    """The code server's view: LINEUP_DEPLOYMENT=k8s and the ConfigMap's environment."""
    pytest.importorskip("dagster_k8s", reason="pip install -e '.[k8s]'")
    probe = r"""
import json
import re
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
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert "PipesK8sClient" in got["client"]
    assert got["image"] == _env()["LINEUP_TRAINER_IMAGE"] and got["namespace"] == "lineup"
    assert got["spec"]["node_selector"] == json.loads(_env()["LINEUP_GPU_NODE_SELECTOR"])
    assert got["spec"]["service_account_name"] == _values()["serviceAccount"]["name"]
    assert got["spec"]["security_context"]["run_as_non_root"] is True
    container = got["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert got["spec"]["volumes"][0]["persistent_volume_claim"]["claim_name"] == "lineup-home"
    assert all(p == ["gpu"] for p in got["pools"].values()), got["pools"]
    assert got["partitioned"] == ["face_expressions", "faces", "images"]
K8S_VERSION = "1.32.0"  # the oldest Kubernetes these manifests must validate on


def _manifests() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted((K8S / "manifests").glob("*.yaml")):
        docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def _pod_templates(raycluster: dict) -> list[dict]:
    spec = raycluster["spec"]
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]


def _validate(doc: dict) -> None:
    """kubernetes-validate against the API's own schema (strict: unknown fields fail); a custom resource
    (KubeRay's RayCluster) has no schema there, so its pod templates are validated as PodTemplates."""
    import kubernetes_validate

    if doc["kind"] == "RayCluster":
        for i, template in enumerate(_pod_templates(doc)):
            kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate",
                                          "metadata": {"name": f"{doc['metadata']['name']}-{i}"}, "template": template},
                                         K8S_VERSION, strict=True)
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_every_manifest_validates():
    pytest.importorskip("kubernetes_validate", reason="pip install -e '.[dev]'")
    import copy

    import kubernetes_validate

    docs = _manifests()
    assert {d["kind"] for _, d in docs} >= {"Namespace", "PersistentVolumeClaim", "RayCluster"}
    for name, doc in docs:
        _validate(doc)
    # the validator can fail: a misspelt field in a worker's container
    ray = copy.deepcopy(next(d for _, d in docs if d["kind"] == "RayCluster"))
    ray["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["envfrom"] = []
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(ray)


def test_ray_pods_get_the_environment_and_no_shared_volume():
    ray = next(d for _, d in _manifests() if d["kind"] == "RayCluster")
    env = _env()
    # RAY_ADDRESS names this cluster's head service (KubeRay: <name>-head-svc)
    assert env["RAY_ADDRESS"] == f"ray://{ray['metadata']['name']}-head-svc.{ray['metadata']['namespace']}.svc:10001"
    lock = (K8S / "requirements.lock").read_text()
    assert f"\nray=={ray['spec']['rayVersion']} " in lock
    code = _values()["dagster-user-deployments"]["deployments"][0]["image"]
    for template in _pod_templates(ray):
        spec = template["spec"]
        assert spec["serviceAccountName"] == _values()["serviceAccount"]["name"]  # workload identity, if annotated
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] > 0
        assert all("emptyDir" in v for v in spec.get("volumes", [])), "workers see only the object store"
        for c in spec["containers"]:
            assert c["image"] == f"{code['repository']}:{code['tag']}"
            refs = c["envFrom"]
            assert {"configMapRef": {"name": "lineup-env"}} in refs
            assert any(r.get("secretRef", {}).get("name") == "lineup-aws" for r in refs)
            # the cluster's token, required (a pod without it could not join its own cluster)
            assert {"secretRef": {"name": "lineup-ray-auth"}} in refs
            assert not any(m["mountPath"] == env["LINEUP_HOME"] for m in c.get("volumeMounts", []))


def test_ray_drivers_hold_the_clusters_token():
    """Token authentication on the Ray cluster: RAY_AUTH_MODE=token for every pod that reads lineup-env, and
    the token's secret on the run pods (each run is a Ray driver) through both the chart's values and the
    instance the run launcher reads; the code server, which never joins the cluster, does not get it."""
    assert _env()["RAY_AUTH_MODE"] == "token"
    instance = yaml.safe_load((K8S / "dagster.yaml").read_text())
    assert "lineup-ray-auth" in instance["run_launcher"]["config"]["env_secrets"]
    values = _values()
    assert {"name": "lineup-ray-auth"} in values["runLauncher"]["config"]["k8sRunLauncher"]["envSecrets"]
    code = values["dagster-user-deployments"]["deployments"][0]
    assert {"name": "lineup-ray-auth"} not in code.get("envSecrets", [])


def test_image_is_pinned_non_root_and_without_test_servers():
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    docker = (K8S / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", docker, re.MULTILINE).group(1)
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", base), base
    user = re.findall(r"^USER (\S+)", docker, re.MULTILINE)
    assert user and user[-1].split(":")[0].isdigit() and int(user[-1].split(":")[0]) > 0, user
    assert "--require-hashes" in docker and " -e " not in docker

    lock = (K8S / "requirements.lock").read_text()
    pins = dict(re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+) \\$", lock, re.MULTILINE))
    n_hashed = len(re.findall(r"^[A-Za-z0-9_.\-]+==\S+ \\\n    --hash=sha256:", lock, re.MULTILINE))
    assert pins and n_hashed == len(pins), "every locked package carries its hashes"
    locked = {canonicalize_name(k): v for k, v in pins.items()}
    assert not {"moto", "pytest", "hypothesis", "ruff"} & set(locked), "no test server or dev tool in the image"
    # every runtime requirement of pyproject.toml is locked, at a version it allows
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    runtime = project["dependencies"] + extras["ray"] + extras["s3"] + extras["k8s"]
    for r in map(Requirement, runtime):
        name = canonicalize_name(r.name)
        assert name in locked, f"{r.name} is not in requirements.lock: regenerate it (deploy/k8s/README.md)"
        assert r.specifier.contains(locked[name], prereleases=True), f"{r.name}=={locked[name]} is outside {r.specifier}"


def test_partitions_stay_under_dagsters_limit_at_100m_photos():
    """Dagster recommends at most 100,000 partitions per asset. Tar shards are one partition each
    (img2dataset writes 10,000 images a shard); loose files are batched by LINEUP_BATCH_SIZE, which the
    production ConfigMap sets. 100M loose photos must stay under the limit."""
    probe = "from assets.resources import LineupSettings; print(LineupSettings().batch_size)"
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env={**os.environ, **_env()},
                         capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    batch = int(out.stdout.strip().splitlines()[-1])
    assert batch == int(_env()["LINEUP_BATCH_SIZE"])  # the setting reads the ConfigMap's value
    assert -(-100_000_000 // batch) <= 100_000
