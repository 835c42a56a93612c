"""The one runner behind ``python -m training.run_dpo`` / ``run_identity`` / ``run_reward``.

Every run goes through the same steps: torchrun init (one process per GPU; ranks other than 0
report nothing), seeding, the trainer's models, the loader on the dataset version, the trainer,
resume from the latest checkpoint, held-out evaluation before and after, training with progress
lines, a final checkpoint, the exported artifact, ``metrics.json``, the loss curve and one
materialization with the dataset version it read. A trainer contributes only what differs: a
``TrainerRun`` subclass (see the run_* modules) with its option class, models, trainer, progress
line, summary keys, export and extra metadata.

Config keys shared by every run::

    {"data": "<dataset version dir>", "eval_data": "<held-out dir>" | null, "eval_batches": N,
     "loader": {LoaderConfig fields; the family is the trainer's}, "train": {<trainer options>},
     "output_dir": "<dir>", "resume": "auto" | "<checkpoint dir>" | null, "device": "auto"}
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
    default_eval_batches: ClassVar[int] = 4

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


def eval_batches(cfg: dict, loader_cfg: data.LoaderConfig, default: int) -> list[dict]:
    """The first batches of the held-out split, read once, in order (no shuffle, no resampling)."""
    if not cfg.get("eval_data"):
        return []
    ecfg = data.LoaderConfig.from_dict({**loader_cfg.to_dict(), "resampled": False, "num_workers": 0,
                                        "shuffle_buffer": 0, "epoch_batches": None})
    out = []
    for b in data.build_pipeline(data.shard_paths(cfg["eval_data"]), ecfg):
        out.append(b)
        if len(out) >= int(cfg.get("eval_batches", default)):
            break
    return out


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
    evaluate = getattr(trainer, "evaluate", None)
    evb = eval_batches(cfg, lcfg, job.default_eval_batches) if evaluate else []
    before = evaluate(evb) if evb else {}

    trainer.train(stream, job.tcfg.max_steps, ckpts, lambda m: rep.info(job.progress(m)))
    trainer.save_checkpoint(ckpts, stream)
    if rank != 0:
        return {}
    after = evaluate(evb) if evb else {}
    png = pipes.loss_curve_png(trainer.history, out / "loss_curve.png", keys=job.curve_keys)
    summary = {
        "steps": trainer.step, **final_means(trainer.history, job.final_keys), **job.summary(trainer),
        **{f"{k}_before": v for k, v in before.items()}, **after,
        "skipped_ties": stream.counter.skipped, "bad_samples": stream.counter.errors,
        "duration_s": time.time() - t0,
    }
    path = job.export(trainer, out, summary)
    checkpoints.atomic_write_text(out / "metrics.json", json.dumps({"summary": summary, "history": trainer.history},
                                                                   default=str))
    rep.materialize({
        **pipes.dataset_metadata(stream.manifest), **job.metadata(trainer), **pipes.numeric(summary),
        job.output_key: pipes.path_value(path), **pipes.curve_metadata(png),
    })
    return summary


def main(run_cls: type[TrainerRun], argv=None) -> int:
    with pipes.session(argv, run_cls.description) as (cfg, rep):
        run(run_cls, cfg, rep)
    return 0
