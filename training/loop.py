"""The training loop every trainer shares: the optimizer step (gradient accumulation, autocast,
fp16 loss scaling, all-reduce over ranks, clipping), the step loop with logging and periodic checkpoints, and
checkpoints with an exact resume.

A trainer subclasses ``TrainerBase``, calls ``_setup_loop`` first, builds its trainable modules,
then ``_setup_optimizer``; it defines ``trainable_module`` and ``compute_loss(batch) -> (loss,
metrics)``.

Noise and timesteps of a step come from ``self.generator``, reseeded from (seed, rank, step) at
the start of every step, so a resume reproduces them and ranks draw different ones. Rank 0 writes
checkpoints, with every rank's data position.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from torch import nn

from training import checkpoints, distributed, precision, rng


class TrainerBase:
    cfg: object  # an Options dataclass with the loop fields (max_steps, log_every, checkpoint_every, ...)

    def _setup_loop(self, cfg, device=None, manifest=None) -> None:
        self.cfg = cfg
        self.device = precision.pick_device(device)
        self.scaler = precision.grad_scaler(self.device, precision.check_mixed_precision(cfg.mixed_precision))
        self.manifest = checkpoints.manifest_info(manifest)
        self.rank, self.world = distributed.dist_info()
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self.step = 0
        self.history: list[dict] = []

    def _setup_optimizer(self, learning_rate: float, weight_decay: float, warmup_steps: int = 0) -> None:
        params = self.trainable_parameters()
        if not params:
            raise ValueError("nothing to train: the trainable module has no parameter with requires_grad")
        self.optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
        warm = max(0, warmup_steps)
        self.lr_sched = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0
        )

    # ------------------------------------------------------------------------------------------
    def trainable_module(self) -> nn.Module:
        raise NotImplementedError

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.trainable_module().parameters() if p.requires_grad]

    @property
    def ckpt_module(self) -> nn.Module:
        return self.trainable_module()

    def compute_loss(self, batch: Mapping, generator=None) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------
    def train_step(self, batches: Iterator[Mapping]) -> dict:
        """One optimizer step over ``gradient_accumulation_steps`` batches."""
        t0 = time.perf_counter()
        # noise/timesteps of this step depend only on (seed, rank, step): exact resume, distinct ranks
        self.generator.manual_seed(rng.step_seed(self.cfg.seed, self.rank, self.step))
        self.optimizer.zero_grad(set_to_none=True)
        acc = self.cfg.gradient_accumulation_steps
        sums: dict[str, float] = {}
        total = 0.0
        for _ in range(acc):
            batch = next(batches)
            with precision.autocast(self.device, self.cfg.mixed_precision):
                loss, metrics = self.compute_loss(batch)
            self.scaler.scale(loss / acc).backward()
            total += loss.item() / acc
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    sums[k] = sums.get(k, 0.0) + v / acc
                else:
                    sums[k] = v
        params = self.trainable_parameters()
        # all-reduce first: an overflow on one rank then reaches every rank and all skip the step
        distributed.allreduce_grads(params)
        self.scaler.unscale_(self.optimizer)  # clip and report the true gradients, not the scaled ones
        gnorm = torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm) if self.cfg.max_grad_norm \
            else torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        self.scaler.step(self.optimizer)  # skipped when the fp16 gradients overflowed
        self.scaler.update()
        self.lr_sched.step()
        self.step += 1
        sums.update(step=self.step, loss=total, grad_norm=float(gnorm), lr=self.lr_sched.get_last_lr()[0],
                    step_time_s=time.perf_counter() - t0)
        if self.scaler.is_enabled():
            sums["loss_scale"] = self.scaler.get_scale()
        self.history.append(sums)
        return sums

    def train(self, stream, max_steps: int | None = None, ckpt_dir: str | Path | None = None,
              on_log: Callable[[dict], None] | None = None) -> list[dict]:
        """Train until ``max_steps`` (total, counting resumed steps). ``stream`` is a BatchStream
        (its position goes into checkpoints) or any iterator of batches."""
        max_steps = max_steps if max_steps is not None else self.cfg.max_steps
        it = iter(stream)
        while self.step < max_steps:
            m = self.train_step(it)
            if on_log and (self.step % self.cfg.log_every == 0 or self.step == max_steps):
                on_log(m)
            if ckpt_dir and self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0:
                self.save_checkpoint(ckpt_dir, stream)
        return self.history

    # ------------------------------------------------------------------------------------------
    def save_checkpoint(self, ckpt_dir: str | Path, stream=None) -> Path | None:
        """Rank 0 writes; every rank's data position is recorded (``data_positions[rank]``)."""
        positions = distributed.gather_objects(dict(getattr(stream, "position", {}) or {}))
        if self.rank != 0:
            distributed.barrier()
            return None
        state = {
            "step": self.step,
            "data_position": positions[0],
            "data_positions": positions,
            "manifest": self.manifest,
            "config": self.cfg.to_dict(),
            "lr_sched": self.lr_sched.state_dict(),
            "grad_scaler": self.scaler.state_dict(),
            "history": self.history,
        }
        path = checkpoints.save_checkpoint(Path(ckpt_dir), self.ckpt_module, self.optimizer, state, self.generator)
        distributed.barrier()
        return path

    def resume(self, ckpt: str | Path, stream=None, strict_data: bool = True) -> dict:
        """Load a checkpoint (trainable weights, optimizer, step, RNG, LR schedule) and put ``stream``
        back at the recorded data position. With ``strict_data`` a checkpoint trained on a different
        dataset version (manifest fingerprint) is refused."""
        state = checkpoints.load_checkpoint(Path(ckpt), self.ckpt_module, self.optimizer, self.generator)
        fp_ck, fp_now = state["manifest"].get("config_fingerprint"), self.manifest.get("config_fingerprint")
        if strict_data and fp_ck != fp_now:
            raise ValueError(f"checkpoint was trained on dataset fingerprint {fp_ck}, this data is {fp_now}")
        self.step = int(state["step"])
        self.lr_sched.load_state_dict(state["lr_sched"])
        if state.get("grad_scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["grad_scaler"])
        self.history = list(state.get("history") or [])
        positions = state.get("data_positions") or [state.get("data_position")]
        pos = positions[self.rank] if self.rank < len(positions) else None
        if stream is not None and pos and hasattr(stream, "restore"):
            stream.restore(pos)
        return state
