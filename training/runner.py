"""The one runner behind ``python -m training.run_dpo`` / ``run_identity`` / ``run_reward``.

Every run goes through the same steps: torchrun init (one process per GPU; ranks other than 0
report nothing), seeding, the trainer's models, the loader on the dataset version, the trainer,
resume from the latest checkpoint, held-out evaluation before and after, training with progress
lines, a final checkpoint, the exported artifact, ``metrics.json``, the loss curve, the incumbent's
evaluation and the promotion decision, one materialization with the dataset version and split it
read, and the ``promotion`` check. A trainer contributes only what differs: a ``TrainerRun``
subclass (see the run_* modules) with its option class, models, trainer, progress line, summary
keys, export, extra metadata and held-out metric.

Config keys shared by every run::

    {"data": "<dataset version dir>", "eval_data": "<held-out dir>" | null,
     "eval_batches": N | null (null: the whole held-out split),
     "loader": {LoaderConfig fields; the family is the trainer's}, "train": {<trainer options>},
     "output_dir": "<dir>", "resume": "auto" | "<checkpoint dir>" | null, "device": "auto",
     "smoke_run": false (true: tiny random-init models; never promoted, the promotion check only warns)}

Promotion (``training/promotion.py``): with a held-out split the run ends with the trained model's
held-out pairwise accuracy and its 95% Wilson interval, and the incumbent's accuracy on the same
batches when the model family (``"model_family_dir"``: ``<dir>/LATEST`` names the current version,
``output_dir`` is ``<dir>/<dataset version>``) has one. The decision goes to ``promotion.json``,
to the metadata and to the ``promotion`` check; only a promoted model moves ``LATEST``. The check is
ERROR-severity when not promoted on a real run, WARN on a smoke run (never promoted: expected). An
empty held-out split is reported as empty (``heldout_pairs: 0``, no accuracy) and is not promoted.

    "model_family_dir": "<dir>" | null (null: decide and record, publish nothing; no incumbent)
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, ClassVar

import torch

from training import checkpoints, data, distributed, pipes, promotion, rng


class TrainerRun:
    """Per-trainer hooks of the runner."""

    description: ClassVar[str]
    family: ClassVar[str]  # loader family: "preference" | "identity"
    options: ClassVar[type]  # the trainer's Options dataclass (the config's "train" section)
    curve_keys: ClassVar[tuple[str, ...]] = ("loss",)
    final_keys: ClassVar[tuple[str, ...]] = ("loss",)  # reported as final_<key>: mean of the last 10 steps
    output_key: ClassVar[str]  # metadata key of the exported artifact's path
    heldout_key: ClassVar[str | None] = None  # the evaluate() key of its held-out pairwise accuracy; None: none
    heldout_measure: ClassVar[str] = ""  # what that accuracy counts (metadata)

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

    def measure(self, trainer) -> str:
        return self.heldout_measure

    def evaluate_incumbent(self, trainer, incumbent_dir: Path, batches: list[dict]) -> dict:
        """The incumbent's ``evaluate`` on the same held-out batches: its final trainable weights are
        swapped into this run's model for the measurement, then this run's weights come back."""
        ck = checkpoints.latest_checkpoint(incumbent_dir / "checkpoints")
        if ck is None:
            raise FileNotFoundError(f"no checkpoint under {incumbent_dir}")
        module = trainer.ckpt_module
        mine = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
        try:
            checkpoints.load_trainable(module, ck / "trainable.safetensors")
            return trainer.evaluate(batches)
        finally:
            with torch.no_grad():
                for n, p in module.named_parameters():
                    if n in mine:
                        p.copy_(mine[n])


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


def promotion_decision(job: TrainerRun, trainer, cfg: dict, out: Path, evb: list[dict], after: dict,
                       smoke: bool) -> dict:
    """Evaluate the incumbent on the same held-out batches, decide, record the decision in
    ``promotion.json`` and, when promoted, move the family's ``LATEST`` to this version."""
    n = int(after.get("eval_pairs", 0))
    new = promotion.evaluation(after.get(job.heldout_key, 0.0) * n, n, job.measure(trainer))
    family = Path(cfg["model_family_dir"]) if cfg.get("model_family_dir") else None
    replaces = promotion.incumbent_version(family, out.name) if family else None
    incumbent, note = None, None
    if replaces and not (family / replaces).is_dir():
        # a dangling LATEST (its model folder removed) names nothing to replace: compared with chance only
        note = f"LATEST named {replaces}, whose folder {family / replaces} is gone: compared with chance only"
        replaces = None
    if replaces and n:
        try:
            measured = job.evaluate_incumbent(trainer, family / replaces, evb)
            incumbent = {"version": replaces, "accuracy": measured.get(job.heldout_key),
                         "pairs": measured.get("eval_pairs", 0)}
        except (OSError, ValueError, KeyError, RuntimeError) as e:  # recorded; no comparison, no promotion
            incumbent = {"version": replaces, "accuracy": None, "error": f"{type(e).__name__}: {e}"}
    decision = {**promotion.decide(new, incumbent, smoke), "evaluation": new,
                **({"incumbent_note": note} if note else {})}
    promotion.write_decision(out, decision, replaces)
    decision["published"] = bool(decision["promoted"] and family)
    if decision["published"]:
        promotion.publish(family, out.name)
    return decision


def promotion_metadata(decision: dict) -> dict:
    """The decision as flat materialization metadata (what the UI shows next to the model)."""
    ev = decision["evaluation"]
    md = {"promoted": decision["promoted"], "promotion_reason": decision["reason"],
          "heldout_measure": ev["measure"], "heldout_pairs": ev["pairs"],
          "promotion_baseline": decision["baseline"], "promotion_baseline_from": decision["baseline_from"]}
    if ev["pairs"]:
        md.update(heldout_accuracy=ev["accuracy"], heldout_ci_low=ev["ci_low"], heldout_ci_high=ev["ci_high"])
    if decision.get("incumbent_note"):
        md["incumbent_note"] = decision["incumbent_note"]
    inc = decision.get("incumbent")
    if inc is not None:
        md["incumbent_version"] = inc["version"]
        md["incumbent_accuracy"] = inc["accuracy"] if inc.get("accuracy") is not None else \
            inc.get("error") or "not measured"
    return md


def promotion_check(decision: dict, smoke: bool) -> dict:
    """The ``promotion`` asset check: failed when not promoted; ERROR on a real run, WARN on a smoke run
    (a smoke model is never promoted, which is expected)."""
    md = promotion_metadata(decision)
    if smoke:
        md["note"] = "smoke run: not promoted, expected (tiny random-init models; their numbers mean nothing)"
    return {"check_name": "promotion", "passed": bool(decision["promoted"]), "severity": "WARN" if smoke else "ERROR",
            "metadata": {**md, "smoke_run": smoke}}


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
    evb = heldout_batches(cfg, lcfg) if job.heldout_key else None
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
    heldout, decision = {}, None
    if evb is not None:
        n = after.get("eval_pairs", 0)
        heldout = {"heldout": f"{n} held-out pairs evaluated" if n else "empty: the held-out split has no pairs"}
        decision = promotion_decision(job, trainer, cfg, out, evb, after, smoke)
        heldout.update(promotion_metadata(decision))
        rep.info(f"promotion: {'promoted' if decision['promoted'] else 'not promoted'}: {decision['reason']}")
    rep.materialize({
        **pipes.dataset_metadata(stream.manifest), "smoke_run": smoke, **job.metadata(trainer),
        **pipes.numeric(summary), **heldout, job.output_key: pipes.path_value(path), **pipes.curve_metadata(png),
    })
    if decision is not None:
        rep.check(**promotion_check(decision, smoke))
    return {**summary, **({"promotion": decision} if decision else {})}


def main(run_cls: type[TrainerRun], argv=None) -> int:
    with pipes.session(argv, run_cls.description) as (cfg, rep):
        run(run_cls, cfg, rep)
    return 0
