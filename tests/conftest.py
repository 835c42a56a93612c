import os
from pathlib import Path

import pytest

# nothing in the tests may reach a model hub
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("DAGSTER_TELEMETRY_DISABLED", "1")

REPO = Path(__file__).resolve().parent.parent
# LINEUP_SHARED_FACES: where they are when the checkout is not beside shared/ (a git worktree elsewhere)
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
