"""The one runner behind ``python -m training.run_dpo`` / ``run_identity`` / ``run_reward``.

Every run goes through the same steps: torchrun init (one process per GPU; ranks other than 0
report nothing), seeding, the trainer's models, the loader on the dataset version, the trainer,
resume from the latest checkpoint, held-out evaluation before and after, training with progress
lines, a final checkpoint, the exported artifact, ``metrics.json``, the loss curve, one
materialization with the dataset version and split it read, and the held-out check. A trainer
contributes only what differs: a ``TrainerRun`` subclass (see the run_* modules) with its option
class, models, trainer, progress line, summary keys, export, extra metadata and held-out check.

Config keys shared by every run::

    {"data": "<dataset version dir>", "eval_data": "<held-out dir>" | null,
     "eval_batches": N | null (null: the whole held-out split),
     "loader": {LoaderConfig fields; the family is the trainer's}, "train": {<trainer options>},
     "output_dir": "<dir>", "resume": "auto" | "<checkpoint dir>" | null, "device": "auto",
     "smoke_run": false (true: tiny random-init models; the held-out check only warns)}

The held-out check passes when the trained model prefers the held-out winners more often than
chance (accuracy > 0.5, ties counting half; 0.5 is what the untrained reference scores). It is an
ERROR-severity failure on a real run and a WARN on a smoke run, whose numbers mean nothing. An
empty held-out split is reported as empty (``heldout_pairs: 0``, no accuracy) and fails the check
with a warning: nothing was measured.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, ClassVar

from training import checkpoints, data, distributed, pipes, rng


class TrainerRun:
    """Per-trainer hooks of the runner."""

    description: ClassVar[str]
    family: ClassVar[str]  # loader family: "preference" | "identity"
    options: ClassVar[type]  # the trainer's Options dataclass (the config's "train" section)
    curve_keys: ClassVar[tuple[str, ...]] = ("loss",)
    final_keys: ClassVar[tuple[str, ...]] = ("loss",)  # reported as final_<key>: mean of the last 10 steps
    output_key: ClassVar[str]  # metadata key of the exported artifact's path
    # (asset check name, the evaluate() key of its held-out pairwise accuracy); None: no evaluation
    heldout_check: ClassVar[tuple[str, str] | None] = None

    def __init__(self, cfg: dict, rep: pipes.Reporter):
        self.cfg, self.rep = cfg, rep
        self.tcfg = self.options.from_dict(cfg.get("train"))

    def build_models(self) -> None:
        """Build (or load) the models; runs after seeding."""

    def loader_defaults(self) -> dict:
        return {}

    def make_trainer(self, manifest: dict):
        raise NotImplementedError

    def progress(self, m: dict) -> str:
        return f"step {m['step']}/{self.tcfg.max_steps} loss {m['loss']:.4f}"

    def summary(self, trainer) -> dict:
        return {}

    def export(self, trainer, out: Path, summary: dict) -> Path:
        raise NotImplementedError

    def metadata(self, trainer) -> dict:
        return {}


def checkpoint_to_resume(cfg: dict, ckpt_dir: Path) -> Path | None:
    resume = cfg.get("resume", "auto")
    if resume == "auto":
        return checkpoints.latest_checkpoint(ckpt_dir)
    return Path(resume) if resume else None


def heldout_batches(cfg: dict, loader_cfg: data.LoaderConfig) -> list[dict] | None:
    """The held-out split's batches, read once, in order (no shuffle, no resampling), at most
    ``eval_batches`` of them; None when no held-out split is configured, [] when it is empty."""
    if not cfg.get("eval_data"):
        return None
    manifest = data.read_manifest(cfg["eval_data"])
    if not manifest["shards"]:
        return []
    ecfg = data.LoaderConfig.from_dict({**loader_cfg.to_dict(), "resampled": False, "num_workers": 0,
                                        "shuffle_buffer": 0, "epoch_batches": None})
    limit = cfg.get("eval_batches")
    out = []
    for b in data.build_pipeline(data.shard_paths(cfg["eval_data"], manifest), ecfg):
        out.append(b)
        if limit is not None and len(out) >= int(limit):
            break
    return out


def heldout_check(name: str, key: str, before: dict, after: dict, smoke: bool) -> dict:
    """The asset check result of a run's held-out evaluation (see the module docstring)."""
    n = int(after.get("eval_pairs", 0))
    if n == 0:
        return {"check_name": name, "passed": False, "severity": "WARN",
                "metadata": {"heldout_pairs": 0, "status": "empty held-out split: nothing was measured"}}
    acc = after[key]
    md = {key: acc, "heldout_pairs": n, "chance": 0.5, "smoke_run": smoke}
    if key in before:
        md[f"{key}_before"] = before[key]
    if smoke:
        md["note"] = "smoke run: tiny random-init models, the accuracy means nothing"
    return {"check_name": name, "passed": bool(acc > 0.5), "severity": "WARN" if smoke else "ERROR", "metadata": md}
def final_means(history: list[dict], keys, last: int = 10) -> dict:
    tail = history[-last:]
    out = {}
    for k in keys:
        vals = [h[k] for h in tail if k in h]
        if vals:
            out[f"final_{k}"] = sum(vals) / len(vals)
    return out


def run(run_cls: type[TrainerRun], cfg: dict, rep: pipes.Reporter) -> dict[str, Any]:
    t0 = time.time()
    dev = distributed.init_distributed_from_env()  # torchrun: one process per GPU
    if dev:
        cfg = {**cfg, "device": dev}
    rank, _ = distributed.dist_info()
    if rank != 0:
        rep = pipes.Quiet()
    out = Path(cfg["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    job = run_cls(cfg, rep)
    rng.seed_everything(job.tcfg.seed)
    job.build_models()
    lcfg = data.LoaderConfig.from_dict({**job.loader_defaults(), **cfg.get("loader", {}), "family": job.family})
    stream = data.BatchStream(cfg["data"], lcfg)
    m = stream.manifest
    rep.info(f"dataset {m.get('dataset')} version {m.get('version')} fingerprint {m.get('config_fingerprint')}: "
             f"{m['num_samples']} samples")
    trainer = job.make_trainer(stream.manifest)
    ckpts = out / "checkpoints"
    ck = checkpoint_to_resume(cfg, ckpts)
    if ck is not None:
        trainer.resume(ck, stream)
        rep.info(f"resumed from {ck} at step {trainer.step}")
    evb = heldout_batches(cfg, lcfg) if job.heldout_check else None
    before = trainer.evaluate(evb) if evb is not None else {}

    trainer.train(stream, job.tcfg.max_steps, ckpts, lambda m: rep.info(job.progress(m)))
    trainer.save_checkpoint(ckpts, stream)
    if rank != 0:
        return {}
    after = trainer.evaluate(evb) if evb is not None else {}
    png = pipes.loss_curve_png(trainer.history, out / "loss_curve.png", keys=job.curve_keys)
    summary = {
        "steps": trainer.step, **final_means(trainer.history, job.final_keys), **job.summary(trainer),
        **{f"{k}_before": v for k, v in before.items() if k != "eval_pairs"}, **after,
        "skipped_ties": stream.counter.skipped, "bad_samples": stream.counter.errors,
        "duration_s": time.time() - t0,
    }
    smoke = bool(cfg.get("smoke_run"))
    path = job.export(trainer, out, summary)
    checkpoints.atomic_write_text(out / "metrics.json", json.dumps({"summary": summary, "history": trainer.history},
                                                                   default=str))
    heldout = {}
    if evb is not None:
        n = after.get("eval_pairs", 0)
        heldout = {"heldout": f"{n} held-out pairs evaluated" if n else "empty: the held-out split has no pairs"}
    rep.materialize({
        **pipes.dataset_metadata(stream.manifest), "smoke_run": smoke, **job.metadata(trainer),
        **pipes.numeric(summary), **heldout, job.output_key: pipes.path_value(path), **pipes.curve_metadata(png),
    })
    if evb is not None:
        rep.check(**heldout_check(*job.heldout_check, before, after, smoke))
    return summary


def main(run_cls: type[TrainerRun], argv=None) -> int:
    with pipes.session(argv, run_cls.description) as (cfg, rep):
        run(run_cls, cfg, rep)
    return 0
