"""Identity-adapter training (diffusion + ID + InfoNCE losses) on a multi-identity dataset version:
CLI and Dagster Pipes entry point.

    python -m training.run_identity --config identity.json

Config (JSON): the runner's keys (see training/runner.py) plus::

    "model": {... as run_dpo ...},
    "face_embedder": {"path": "<iresnet weights .pth/.safetensors>", "arch": "iresnet50",
                      "num_features": 512, "widths": null, "layers": null},
    "train": {IdentityConfig fields}

Without face-embedder weights a run on tiny or explicitly given test models trains the adapter with
the diffusion loss only and says so (log + ``identity_terms: false`` and the reason in the
metadata); a run on real diffusion weights (``model.pretrained``) is refused: its adapter would
learn no identity.

With ``eval_data`` (the multi-identity version's ``eval`` split) the run ends with the held-out identity
win rate of the trained adapter over the untrained one (``IdentityTrainer.evaluate``) and the promotion
decision (training/promotion.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training import models, pipes, runner
from training.identity import IdentityConfig, IdentityTrainer
from training.iresnet import load_face_embedder


class IdentityRun(runner.TrainerRun):
    description = "Identity adapter training (WithAnyone-style losses)"
    family = "identity"
    options = IdentityConfig
    curve_keys = ("loss", "diffusion_loss", "id_loss", "infonce")
    final_keys = ("loss", "diffusion_loss", "id_loss", "infonce", "id_cos")
    output_key = "adapter_path"
    heldout_key = "eval_id_win_rate"

    def build_models(self) -> None:
        fe = dict(self.cfg.get("face_embedder") or {})
        self.embedder, self.embedder_info = load_face_embedder(
            fe.get("path"), fe.get("arch", "iresnet50"), int(fe.get("num_features", self.tcfg.emb_dim)),
            fe.get("widths"), fe.get("layers"))
        if self.embedder is None:
            if (self.cfg.get("model") or {}).get("pretrained"):
                # real diffusion weights without the identity loss would train an adapter that learns no
                # identity, yet look like a real run
                raise RuntimeError(f"refusing a real identity-adapter run without face-embedder weights: "
                                   f"{self.embedder_info['reason']}")
            self.rep.warning(self.embedder_info["reason"])
        self.parts = models.build_diffusion(self.cfg.get("model") or {})

    def make_trainer(self, manifest: dict) -> IdentityTrainer:
        return IdentityTrainer(*self.parts, self.tcfg, self.embedder, self.embedder_info,
                               device=self.cfg.get("device"), manifest=manifest)

    def progress(self, m: dict) -> str:
        extra = f" id {m['id_loss']:.4f} nce {m['infonce']:.4f}" if "id_loss" in m else ""
        return f"step {m['step']}/{self.tcfg.max_steps} loss {m['loss']:.4f} diff {m['diffusion_loss']:.4f}{extra}"

    def measure(self, trainer: IdentityTrainer) -> str:
        if trainer.identity_terms:
            return ("identity win rate, one-step Sim(GT): a held-out face's x0 estimate is closer (face-embedder "
                    "cosine) to its ground truth under the trained adapter than under the untrained one (ties half)")
        return ("identity win rate, embedding-level proxy (no face embedder): the projection's tokens of a held-out "
                "face's conditioning embedding are closer to its target's, against other identities, under the "
                "trained adapter than under the untrained one (ties half)")

    def summary(self, trainer: IdentityTrainer) -> dict:
        return {"identity_terms": trainer.identity_terms, "bank_size": len(trainer.bank)}

    def export(self, trainer: IdentityTrainer, out: Path, summary: dict) -> Path:
        return trainer.export_adapter(out / "adapter", {"metrics": summary})

    def metadata(self, trainer: IdentityTrainer) -> dict:
        return {"identity_terms": trainer.identity_terms, "face_embedder": pipes.json_value(self.embedder_info)}


def main(argv=None) -> int:
    return runner.main(IdentityRun, argv)


if __name__ == "__main__":
    raise SystemExit(main())
