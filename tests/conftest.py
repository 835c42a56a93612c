import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

# nothing in the tests may reach a model hub
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("DAGSTER_TELEMETRY_DISABLED", "1")

REPO = Path(__file__).resolve().parent.parent
# LINEUP_SHARED_FACES: where the photos are when the checkout is not beside ../shared (a git worktree)
SHARED_FACES = Path(os.environ.get("LINEUP_SHARED_FACES") or REPO.parent / "shared" / "data" / "faces").resolve()


@pytest.fixture(scope="session")
def shared_faces() -> Path:
    """The labelled real photos in ../shared/data/faces (never copied into the repo)."""
    if not (SHARED_FACES / "labels.csv").exists():
        pytest.skip(f"shared photos not found at {SHARED_FACES}")
    return SHARED_FACES


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny-model training tests run one torch thread: 2 threads on 2 shared cores were slower and noisier."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# a CLIP small enough to build in a test (random weights; nothing from a model hub)
TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def write_tiny_clip(config_file: Path, weights_file: Path) -> str:
    """TINY_CLIP's config written to ``config_file`` and registered with open_clip under the file's stem, the
    returned model name; its weights (torch seed 0, so the same in every test) saved to ``weights_file``."""
    import open_clip
    import torch

    config_file.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(config_file)
    torch.manual_seed(0)
    torch.save(open_clip.create_model(config_file.stem, pretrained=None).state_dict(), weights_file)
    return config_file.stem


def photos_into_store(fs, images, prefix: str):
    """``images`` (a table of path locators) with each photo uploaded to ``prefix`` ("bucket/folder") of the
    store ``fs`` under its file name, and its path that object's s3:// URL (a name already there is not sent
    again)."""
    import pyarrow as pa

    rows = images.to_pylist()
    for r in rows:
        key = f"{prefix}/{Path(r['path']).name}"
        if not fs.exists(key):
            fs.put(r["path"], key)
        r["path"] = f"s3://{key}"
    return pa.Table.from_pylist(rows, schema=images.schema)


@contextlib.contextmanager
def moto_s3(log_dir: Path, bucket: str):
    """A moto S3 server on a free 127.0.0.1 port with ``bucket`` made, the standard AWS variables pointing at
    it (restored after); yields (an s3 filesystem, those variables). s3fs caches filesystems by their
    arguments, not by the AWS variables: the cache is cleared first, or one made for an earlier, stopped
    server would be reused by the code under test."""
    import fsspec
    import s3fs

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    log = open(Path(log_dir) / "server.log", "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        s3fs.S3FileSystem.clear_instance_cache()
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        fs.mkdir(bucket)
        yield fs, env
    finally:
        server.terminate()
        server.wait(10)
        log.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
