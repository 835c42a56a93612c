"""Identity-adapter training (diffusion + ID + InfoNCE losses) on a multi-identity dataset version:
CLI and Dagster Pipes entry point.

    python -m training.run_identity --config identity.json

Config (JSON)::

    {"data": "<dataset version dir>", "loader": {LoaderConfig fields; family forced to "identity"},
     "model": {... as run_dpo ...},
     "face_embedder": {"path": "<iresnet weights .pth/.safetensors>", "arch": "iresnet50",
                       "num_features": 512, "widths": null, "layers": null},
     "train": {IdentityConfig fields}, "output_dir": "<dir>", "resume": "auto", "device": "auto"}

Without face-embedder weights the run trains the adapter with the diffusion loss only and says so
(log + ``identity_terms: false`` and the reason in the metadata).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training import checkpoints, data, distributed, models, pipes, rng


def run(cfg: dict, rep: pipes.Reporter) -> dict:
    from training.identity import IdentityConfig, IdentityTrainer
    from training.iresnet import load_face_embedder

    t0 = time.time()
    dev = distributed.init_distributed_from_env()  # torchrun: one process per GPU
    if dev:
        cfg = {**cfg, "device": dev}
    rank, _ = distributed.dist_info()
    if rank != 0:
        rep = pipes.Quiet()
    out = Path(cfg["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    lcfg = data.LoaderConfig.from_dict({**cfg.get("loader", {}), "family": "identity"})
    tcfg = IdentityConfig.from_dict(cfg.get("train"))
    rng.seed_everything(tcfg.seed)
    stream = data.BatchStream(cfg["data"], lcfg)
    rep.info(f"dataset {stream.manifest.get('dataset')} version {stream.manifest.get('version')} "
             f"fingerprint {stream.manifest.get('config_fingerprint')}")
    fe = dict(cfg.get("face_embedder") or {})
    embedder, info = load_face_embedder(fe.get("path"), fe.get("arch", "iresnet50"),
                                        int(fe.get("num_features", tcfg.emb_dim)), fe.get("widths"), fe.get("layers"))
    if embedder is None:
        rep.warning(info["reason"])
    unet, vae, sched, te = models.build_diffusion(cfg.get("model") or {})
    trainer = IdentityTrainer(unet, vae, sched, te, tcfg, embedder, info, device=cfg.get("device"),
                              manifest=stream.manifest)
    ckpts = out / "checkpoints"
    resume = cfg.get("resume", "auto")
    ck = checkpoints.latest_checkpoint(ckpts) if resume == "auto" else (Path(resume) if resume else None)
    if ck is not None:
        trainer.resume(ck, stream)
        rep.info(f"resumed from {ck} at step {trainer.step}")

    def on_log(m):
        extra = f" id {m['id_loss']:.4f} nce {m['infonce']:.4f}" if "id_loss" in m else ""
        rep.info(f"step {m['step']}/{tcfg.max_steps} loss {m['loss']:.4f} diff {m['diffusion_loss']:.4f}{extra}")

    trainer.train(stream, tcfg.max_steps, ckpts, on_log)
    trainer.save_checkpoint(ckpts, stream)
    if rank != 0:
        return {}
    png = pipes.loss_curve_png(trainer.history, out / "loss_curve.png",
                                keys=("loss", "diffusion_loss", "id_loss", "infonce"))
    last = trainer.history[-10:]
    keys = ("loss", "diffusion_loss", "id_loss", "infonce", "id_cos")
    summary = {f"final_{k}": sum(h[k] for h in last if k in h) / max(1, sum(k in h for h in last))
               for k in keys if any(k in h for h in last)}
    summary.update(steps=trainer.step, identity_terms=trainer.identity_terms, bank_size=len(trainer.bank),
                   bad_samples=stream.counter.errors, duration_s=time.time() - t0)
    path = trainer.export_adapter(out / "adapter", {"metrics": summary})
    checkpoints.atomic_write_text(out / "metrics.json", json.dumps({"summary": summary, "history": trainer.history},
                                                              default=str))
    md = {
        **pipes.dataset_metadata(stream.manifest),
        "identity_terms": trainer.identity_terms, "face_embedder": pipes.json_value(info),
        **pipes.numeric(summary), "adapter_path": pipes.path_value(path), **pipes.curve_metadata(png),
    }
    rep.materialize(md)
    return summary


def main(argv=None) -> int:
    with pipes.session(argv, "Identity adapter training (WithAnyone-style losses)") as (cfg, rep):
        run(cfg, rep)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
