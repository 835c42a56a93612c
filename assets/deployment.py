"""What differs between deployments, in one place: how trainers are launched.

``LINEUP_DEPLOYMENT`` picks it (``local`` by default):
- ``local``: trainers run as Dagster Pipes subprocesses on the machine that runs the asset;
- ``k8s``: each trainer is a Kubernetes pod (``dagster_k8s.PipesK8sClient``) of the lineup image on a GPU
  node (node selector, ``nvidia.com/gpu`` limit), with the same environment as the run pods; see
  deploy/k8s/README.md. The trainer assets take the ``gpu`` concurrency pool in both.
"""

from __future__ import annotations

import json
import os

import dagster as dg

from pipeline.config import REPO_ROOT

DEPLOYMENTS = ("local", "k8s")
DEFAULT_GPU_NODE_SELECTOR = {"nvidia.com/gpu.present": "true"}  # the NVIDIA GPU operator's node label


def deployment() -> str:
    name = os.environ.get("LINEUP_DEPLOYMENT", "local").strip().lower() or "local"
    if name not in DEPLOYMENTS:
        raise ValueError(f"LINEUP_DEPLOYMENT={name!r}: choose one of {', '.join(DEPLOYMENTS)}")
    return name


def gpu_pod_spec(node_selector: dict, gpus: int, env_config_maps: list[str], env_secrets: list[str],
                 home_claim: str | None) -> dict:
    """The trainer pod: on a GPU node, with the GPUs it needs, the shared environment, and LINEUP_HOME
    (trained models, removal requests) on the same volume as the run pods."""
    container = {
        "resources": {"limits": {"nvidia.com/gpu": str(gpus)}, "requests": {"nvidia.com/gpu": str(gpus)}},
        "env_from": [{"config_map_ref": {"name": n}} for n in env_config_maps]
        + [{"secret_ref": {"name": n}} for n in env_secrets],
    }
    spec: dict = {
        # the chart's service account (workload identity for the store, when annotated) and the image's user
        "service_account_name": os.environ.get("LINEUP_SERVICE_ACCOUNT", "lineup"),
        "security_context": {"run_as_non_root": True, "run_as_user": 10001, "run_as_group": 10001, "fs_group": 10001},
        "node_selector": dict(node_selector),
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "restart_policy": "Never",
        "containers": [container],
    }
    if home_claim:
        container["volume_mounts"] = [{"name": "lineup-home", "mount_path": os.environ.get("LINEUP_HOME", "/data")}]
        spec["volumes"] = [{"name": "lineup-home", "persistent_volume_claim": {"claim_name": home_claim}}]
    return spec


def trainer_client():
    """The Pipes client the trainer assets launch with (resource key ``trainer_client``)."""
    if deployment() == "local":
        return dg.PipesSubprocessClient(cwd=str(REPO_ROOT))
    from dagster_k8s import PipesK8sClient

    class GpuPodPipesClient(PipesK8sClient):
        """PipesK8sClient that always starts the trainer in the lineup image on a GPU node."""

        def __init__(self, image: str, namespace: str, pod_spec: dict):
            super().__init__(load_incluster_config=os.environ.get("KUBERNETES_SERVICE_HOST") is not None or None)
            self.image, self.namespace, self.pod_spec = image, namespace, pod_spec

        def run(self, *, context, command=None, extras=None, **_ignored):  # cwd etc. mean nothing in a pod
            return super().run(context=context, extras=extras, image=self.image, command=command,
                               namespace=self.namespace, base_pod_spec=self.pod_spec)

    image = os.environ.get("LINEUP_TRAINER_IMAGE") or os.environ.get("DAGSTER_CURRENT_IMAGE")
    if not image:
        raise ValueError("LINEUP_DEPLOYMENT=k8s needs LINEUP_TRAINER_IMAGE (the lineup image the trainer pods run)")
    selector = json.loads(os.environ.get("LINEUP_GPU_NODE_SELECTOR") or json.dumps(DEFAULT_GPU_NODE_SELECTOR))
    split = lambda v: [x for x in (v or "").split(",") if x]
    spec = gpu_pod_spec(selector, int(os.environ.get("LINEUP_TRAINER_GPUS", "1")),
                        split(os.environ.get("LINEUP_ENV_CONFIG_MAPS", "lineup-env")),
                        split(os.environ.get("LINEUP_ENV_SECRETS", "lineup-aws")),
                        os.environ.get("LINEUP_HOME_CLAIM") or None)
    return GpuPodPipesClient(image, os.environ.get("LINEUP_K8S_NAMESPACE", "lineup"), spec)
