"""Contrastive identity training (after WithAnyone) for an identity-conditioned UNet.

Model: the frozen UNet plus an *identity adapter*, IP-Adapter style decoupled cross-attention:
each face's reference identity embedding goes through a small projection to ``num_tokens`` tokens;
every cross-attention layer gets its own ``to_k_ip``/``to_v_ip`` and adds
``scale * Attention(q, K_ip, V_ip)`` to the text attention. It is implemented as a diffusers
attention processor (``IDAttnProcessor``, set with ``unet.set_attn_processor``); the identity
tokens reach it through ``cross_attention_kwargs={"id_tokens", "id_mask"}`` (variable face counts
are masked).

Loss = diffusion MSE + w_id * (1 - cos(g, t)) + w_nce * InfoNCE(g; t, negatives), where
- g = face embedding of the generated face: predicted x0 (one-step estimate from the noise
  prediction) -> VAE decode -> crop aligned 112x112 at the target's landmarks (similarity transform
  to the ArcFace template; the bbox when landmarks are missing) -> ArcFace-style iresnet;
- t = the same embedder on the same crop of the ground-truth target image;
- negatives = the other GT faces of the batch (other identities) + extended negatives from an
  identity bank (a FIFO of past GT embeddings, optionally seeded from a file), also filtered by
  identity id. WithAnyone: 63 in-batch + 4033 extended negatives, temperature 0.1.

Weights and timesteps follow WithAnyone's released training code as the issue reads it (the paper's
text suggested 0.1 and 0.1, which this module used before): ``id_loss_weight`` 1.0,
``infonce_weight`` 0.01, and both identity terms switched off at high noise, t > 0.6 of the training
timesteps (``id_terms_max_t``), where the one-step x0 estimate is too blurred to carry a face.

Held-out evaluation (``evaluate``): for every face of the held-out split, is it more like its ground
truth under the trained adapter than under the untrained one (the adapter's initial weights), with the
same noise and timestep (t <= the identity-term limit)? Ties count half, so an adapter that changed
nothing reads 0.5. With a face embedder the likeness is a one-step MultiID-Bench-style Sim(GT):
cos(embedder(face crop of the x0 estimate), embedder(the target's face crop)); its Sim(Ref) (to the
face's reference crop) is reported beside it, as a copy-paste signal. Without one it is an
embedding-level proxy: the projection's tokens of the face's conditioning embedding against those of
its target embedding (the shard json), as a margin over the batch's other identities.

Without face-embedder weights the identity terms are left out (logged and recorded in the metadata)
and only the diffusion loss trains the adapter: never a random embedder.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training import checkpoints, precision
from training.config import Options
from training.diffusion import DiffusionTrainerBase
from training.metrics import pairwise_wins

log = logging.getLogger("lineup.training.identity")

# insightface's 112x112 ArcFace alignment template (left eye, right eye, nose, mouth left, mouth right)
ARCFACE_TEMPLATE = torch.tensor(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]]
)


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------


def info_nce(g: torch.Tensor, pos: torch.Tensor, negatives: torch.Tensor, neg_mask: torch.Tensor | None = None,
             temperature: float = 0.1) -> torch.Tensor:
    """Mean over rows of -log( exp(g.pos/T) / (exp(g.pos/T) + sum_valid exp(g.neg_k/T)) ).

    g, pos: [N, E]; negatives: [N, K, E] (or [K, E] shared by all rows); neg_mask: [N, K] bool (True
    = use). All embeddings are L2-normalised here."""
    g = F.normalize(g.float(), dim=-1)
    pos = F.normalize(pos.float(), dim=-1)
    negatives = F.normalize(negatives.float(), dim=-1)
    if negatives.dim() == 2:
        negatives = negatives.unsqueeze(0).expand(g.shape[0], -1, -1)
    lpos = (g * pos).sum(-1, keepdim=True)
    lneg = torch.einsum("ne,nke->nk", g, negatives)
    if neg_mask is not None:
        lneg = lneg.masked_fill(~neg_mask, float("-inf"))
    logits = torch.cat([lpos, lneg], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(g.shape[0], dtype=torch.long, device=g.device))


def id_cosine_loss(g: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return (1 - F.cosine_similarity(g.float(), t.float(), dim=-1)).mean()


class IdentityBank:
    """Extended negatives: a FIFO of (embedding, identity id), optionally seeded from a file
    (``.npy`` [M, E] with a sibling ``.ids.json``, or ``.safetensors`` with ``embeddings``)."""

    def __init__(self, dim: int, capacity: int = 4033, path: str | Path | None = None):
        self.dim, self.capacity = dim, capacity
        self.emb = torch.zeros(0, dim)
        self.ids: list[str] = []
        self.codes = torch.zeros(0, dtype=torch.long)  # identity ids as integers (vectorised masks)
        self._code_of: dict[str, int] = {}
        if path:
            self.load_file(Path(path))

    def load_file(self, path: Path) -> None:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            emb = load_file(str(path))["embeddings"].float()
        else:
            emb = torch.from_numpy(np.load(path, allow_pickle=False)).float()
        ids_path = path.with_suffix(".ids.json")
        ids = json.loads(ids_path.read_text()) if ids_path.exists() else [f"bank{i}" for i in range(len(emb))]
        if emb.shape[1] != self.dim:
            raise ValueError(f"identity bank {path} has dim {emb.shape[1]}, the face embedder gives {self.dim}")
        self.push(emb, ids)

    def code(self, ids: list[str]) -> torch.Tensor:
        return torch.tensor([self._code_of.setdefault(i, len(self._code_of)) for i in ids], dtype=torch.long)

    def push(self, emb: torch.Tensor, ids: list[str]) -> None:
        self.emb = torch.cat([self.emb, F.normalize(emb.detach().float().cpu(), dim=-1)])[-self.capacity:]
        self.ids = (self.ids + list(ids))[-self.capacity:]
        self.codes = torch.cat([self.codes, self.code(list(ids))])[-self.capacity:]

    def __len__(self) -> int:
        return len(self.ids)

    def state(self) -> dict:
        return {"emb": self.emb.clone(), "ids": list(self.ids)}

    def load_state(self, st: Mapping) -> None:
        self.emb, self.ids = st["emb"].float(), list(st["ids"])
        self._code_of = {}
        self.codes = self.code(self.ids)


# ----------------------------------------------------------------------------------------------
# Alignment
# ----------------------------------------------------------------------------------------------


def similarity_transform(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Least-squares similarity (Umeyama) mapping src [..., K, 2] onto dst [K, 2]: [..., 2, 3]."""
    src = src.float()
    dst = dst.to(src).expand_as(src)
    mu_s, mu_d = src.mean(-2, keepdim=True), dst.mean(-2, keepdim=True)
    s0, d0 = src - mu_s, dst - mu_d
    var_s = (s0 ** 2).sum(dim=(-1, -2)).clamp_min(1e-8)
    # closed form for 2-D similarity: a = sum(s.d)/var, b = sum(s x d)/var
    a = (s0 * d0).sum(dim=(-1, -2)) / var_s
    b = (s0[..., 0] * d0[..., 1] - s0[..., 1] * d0[..., 0]).sum(-1) / var_s
    R = torch.stack([torch.stack([a, -b], -1), torch.stack([b, a], -1)], -2)  # [..., 2, 2]
    tvec = mu_d.squeeze(-2) - (R @ mu_s.squeeze(-2).unsqueeze(-1)).squeeze(-1)
    return torch.cat([R, tvec.unsqueeze(-1)], -1)


def crop_faces(images: torch.Tensor, idx: torch.Tensor, landmarks: torch.Tensor, has_lmk: torch.Tensor,
               bbox: torch.Tensor, size: int = 112) -> torch.Tensor:
    """Differentiable aligned crops. images [B,3,H,W]; idx [N] (which image); landmarks [N,5,2]
    and bbox [N,4] in image pixels. Landmarks -> similarity to the ArcFace template (scaled to
    ``size``); otherwise the bbox (squared) is resized. Returns [N,3,size,size]."""
    N = idx.shape[0]
    H, W = images.shape[-2:]
    dev = images.device
    tmpl = ARCFACE_TEMPLATE.to(dev) * (size / 112.0)
    M = similarity_transform(landmarks.to(dev).float(), tmpl)  # image px -> crop px
    # bbox fallback: square box around the bbox center
    x1, y1, x2, y2 = bbox.to(dev).float().unbind(-1)
    side = torch.maximum(x2 - x1, y2 - y1).clamp_min(1.0)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    s = size / side
    Mb = torch.zeros(N, 2, 3, device=dev)
    Mb[:, 0, 0] = s
    Mb[:, 1, 1] = s
    Mb[:, 0, 2] = size / 2 - s * cx
    Mb[:, 1, 2] = size / 2 - s * cy
    # landmarks that do not span a face (e.g. all at one point) cannot define an alignment
    spread = landmarks.to(dev).float().std(dim=1).sum(-1)
    ok = has_lmk.to(dev) & (spread > 0.5)
    M = torch.where(ok.view(N, 1, 1), M, Mb)
    # invert: crop px -> image px
    A, tvec = M[:, :, :2], M[:, :, 2:]
    Ainv = torch.linalg.inv(A)
    Minv = torch.cat([Ainv, -Ainv @ tvec], -1)
    # crop normalised (align_corners=False) -> crop px -> image px -> image normalised
    n_out = torch.tensor([[size / 2, 0, (size - 1) / 2], [0, size / 2, (size - 1) / 2], [0, 0, 1]], device=dev)
    n_in = torch.tensor([[2 / W, 0, 1 / W - 1], [0, 2 / H, 1 / H - 1]], device=dev)
    Minv3 = torch.cat([Minv, torch.tensor([[[0, 0, 1.0]]], device=dev).expand(N, 1, 3)], 1)
    theta = n_in.unsqueeze(0) @ Minv3 @ n_out.unsqueeze(0)
    grid = F.affine_grid(theta, (N, 3, size, size), align_corners=False)
    return F.grid_sample(images[idx].float(), grid.to(images.dtype).float(), mode="bilinear",
                         padding_mode="border", align_corners=False)


# ----------------------------------------------------------------------------------------------
# Identity adapter
# ----------------------------------------------------------------------------------------------


class IDProjection(nn.Module):
    """Identity embedding [.., E] -> ``num_tokens`` tokens of the cross-attention width."""

    def __init__(self, emb_dim: int, cross_dim: int, num_tokens: int = 4, hidden: int | None = None):
        super().__init__()
        hidden = hidden or max(cross_dim * 2, emb_dim)
        self.num_tokens, self.cross_dim = num_tokens, cross_dim
        self.net = nn.Sequential(nn.Linear(emb_dim, hidden), nn.GELU(), nn.Linear(hidden, num_tokens * cross_dim))
        self.norm = nn.LayerNorm(cross_dim)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        x = self.net(F.normalize(emb.float(), dim=-1))
        return self.norm(x.view(*emb.shape[:-1], self.num_tokens, self.cross_dim))


class IDAttnProcessor(nn.Module):
    """Attention processor (SDPA) with an optional decoupled identity branch for cross-attention."""

    def __init__(self, hidden_size: int | None = None, cross_dim: int | None = None, scale: float = 1.0):
        super().__init__()
        self.has_ip = hidden_size is not None
        self.scale = scale
        if self.has_ip:
            self.to_k_ip = nn.Linear(cross_dim, hidden_size, bias=False)
            self.to_v_ip = nn.Linear(cross_dim, hidden_size, bias=False)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 id_tokens=None, id_mask=None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b_, c_, h_, w_ = hidden_states.shape
            hidden_states = hidden_states.view(b_, c_, h_ * w_).transpose(1, 2)
        is_cross = encoder_hidden_states is not None
        batch_size, seq_len, _ = (encoder_hidden_states if is_cross else hidden_states).shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if not is_cross:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        inner = key.shape[-1]
        hd = inner // attn.heads

        def heads(x):
            return x.view(batch_size, -1, attn.heads, hd).transpose(1, 2)

        q = heads(query)
        out = F.scaled_dot_product_attention(q, heads(key), heads(value), attn_mask=attention_mask)
        if self.has_ip and is_cross and id_tokens is not None and self.scale != 0:
            id_tokens = id_tokens.to(query.dtype)
            ik, iv = heads(self.to_k_ip(id_tokens)), heads(self.to_v_ip(id_tokens))
            if id_mask is not None:
                valid = id_mask.any(-1)  # samples with no reference face get no identity branch
                m = (id_mask | ~valid[:, None])[:, None, None, :]
                ip = F.scaled_dot_product_attention(q, ik, iv, attn_mask=m)
                ip = ip * valid.view(-1, 1, 1, 1).to(ip.dtype)
            else:
                ip = F.scaled_dot_product_attention(q, ik, iv)
            out = out + self.scale * ip
        out = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * hd).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b_, c_, h_, w_)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class IDAdapter(nn.Module):
    """The trainable part: projection + the identity K/V of every cross-attention layer."""

    def __init__(self, unet, emb_dim: int, num_tokens: int = 4, scale: float = 1.0):
        super().__init__()
        cross = unet.config.cross_attention_dim
        self.emb_dim, self.num_tokens, self.scale = emb_dim, num_tokens, scale
        self.proj = IDProjection(emb_dim, cross, num_tokens)
        procs, ip = {}, {}
        attn_modules = {n: m for n, m in unet.named_modules() if hasattr(m, "set_processor") and hasattr(m, "to_k")}
        for name in unet.attn_processors:
            mod = attn_modules[name.removesuffix(".processor")]
            if name.endswith("attn2.processor"):
                hidden = mod.to_k.out_features
                p = IDAttnProcessor(hidden, cross, scale)
                with torch.no_grad():  # IP-Adapter init: start from the text K/V weights
                    p.to_k_ip.weight.copy_(mod.to_k.weight.float())
                    p.to_v_ip.weight.copy_(mod.to_v.weight.float())
                ip[name.replace(".", "__")] = p
            else:
                p = IDAttnProcessor()
            procs[name] = p
        self.layers = nn.ModuleDict(ip)
        unet.set_attn_processor(procs)

    def tokens(self, emb: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """emb [B, F, E], mask [B, F] -> tokens [B, F*N, D], token mask [B, F*N]."""
        B, Fm = mask.shape
        tok = self.proj(emb).reshape(B, Fm * self.num_tokens, -1)
        return tok, mask.repeat_interleave(self.num_tokens, dim=1)

    def config(self) -> dict:
        return {"emb_dim": self.emb_dim, "num_tokens": self.num_tokens, "scale": self.scale,
                "layers": sorted(k.replace("__", ".") for k in self.layers)}


# ----------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------


@dataclass
class IdentityConfig(Options):
    options_name: ClassVar[str] = "identity"

    learning_rate: float = 1e-4
    adam_weight_decay: float = 1e-2
    max_steps: int = 1000
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    mixed_precision: str = "bf16"
    gradient_checkpointing: bool | None = None
    checkpoint_every: int = 500
    log_every: int = 10
    seed: int = 0
    lr_warmup_steps: int = 0
    vae_latent: str = "sample"  # "sample" | "mean"
    # adapter
    emb_dim: int = 512
    num_tokens: int = 4
    adapter_scale: float = 1.0
    cond_dropout: float = 0.0  # probability of dropping the identity condition (CFG-style)
    # identity terms (WithAnyone's released training code, see the module docstring)
    id_loss_weight: float = 1.0
    infonce_weight: float = 0.01
    temperature: float = 0.1
    bank_size: int = 4033
    bank_path: str | None = None
    id_terms_max_t: float | None = 0.6  # identity terms only where t <= this fraction of the timesteps (None: all)
    id_loss_max_timestep: int | None = None  # an absolute limit instead of id_terms_max_t
    face_size: int = 112
    # where embeddings come from: "auto" = ref json embedding, else embedder(ref image), else GT json
    ref_source: str = "auto"
    gt_source: str = "embedder"  # "embedder" (same space as g, recommended) | "json"


class IdentityTrainer(DiffusionTrainerBase):
    def __init__(self, unet, vae, scheduler, text_encoder, cfg: IdentityConfig, face_embedder=None,
                 face_embedder_info: Mapping | None = None, device=None, manifest=None):
        super().__init__(unet, vae, scheduler, text_encoder, cfg, device, manifest)
        self.adapter = IDAdapter(self.unet, cfg.emb_dim, cfg.num_tokens, cfg.adapter_scale).to(self.device)
        self.embedder = face_embedder.to(self.device) if face_embedder is not None else None
        self.embedder_info = dict(face_embedder_info or {})
        self.identity_terms = self.embedder is not None and (cfg.id_loss_weight > 0 or cfg.infonce_weight > 0)
        if self.embedder is None:
            reason = self.embedder_info.get("reason", "no face embedder given")
            log.warning("identity terms disabled: %s; training with the diffusion loss only", reason)
        self.embedder_info["identity_terms"] = self.identity_terms
        # the bank lives in the face embedder's space (g and t), which may differ from the
        # conditioning embedding (e.g. 128-d dlib embeddings in the shards, 512-d ArcFace here)
        feat = getattr(getattr(self.embedder, "features", None), "num_features", None)
        self.face_dim = int(feat or cfg.emb_dim)
        self.bank = IdentityBank(self.face_dim, cfg.bank_size, cfg.bank_path if self.identity_terms else None)
        # the untrained adapter, the held-out evaluation's baseline (kept before any resume overwrites it)
        self.untrained_state = {k: v.detach().clone() for k, v in self.adapter.state_dict().items()}
        self._finish_setup()

    def id_terms_max_timestep(self) -> int | None:
        """The largest timestep at which the identity terms apply (None: every timestep)."""
        if self.cfg.id_loss_max_timestep is not None:
            return int(self.cfg.id_loss_max_timestep)
        if self.cfg.id_terms_max_t is None:
            return None
        return int(self.cfg.id_terms_max_t * (self.scheduler.config.num_train_timesteps - 1))

    def trainable_module(self) -> nn.Module:
        return self.adapter

    def _embed(self, crops: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.embedder(crops.float()).float(), dim=-1)

    def condition(self, batch: Mapping, generator) -> tuple[torch.Tensor, torch.Tensor, str]:
        """Per-face conditioning embeddings [B,F,E] and mask [B,F]."""
        mask = batch["ref_mask"].to(self.device)
        src = self.cfg.ref_source
        if src in ("auto", "json") and batch["ref_emb_mask"].any() and batch["ref_emb"].shape[-1] == self.cfg.emb_dim:
            emb, mask, used = batch["ref_emb"].to(self.device), batch["ref_emb_mask"].to(self.device), "ref_json"
        elif src in ("auto", "embedder") and self.embedder is not None and self.face_dim == self.cfg.emb_dim:
            B, Fm = mask.shape
            refs = batch["refs"].to(self.device).flatten(0, 1)
            r = refs.shape[-1]
            with torch.no_grad():
                lm = batch["ref_landmarks"].flatten(0, 1)
                has = batch["ref_has_landmarks"].flatten(0, 1)
                full = torch.tensor([0.0, 0.0, r, r]).expand(B * Fm, 4)
                crops = crop_faces(refs, torch.arange(B * Fm, device=self.device), lm, has, full, self.cfg.face_size)
                emb = self._embed(crops).view(B, Fm, -1)
            used = "ref_embedder"
        elif batch["gt_emb"].shape[-1] == self.cfg.emb_dim:
            emb, mask, used = batch["gt_emb"].to(self.device), batch["gt_emb_mask"].to(self.device), "gt_json_copy"
        else:
            raise ValueError("no usable identity embedding for conditioning (set emb_dim to the json embedding "
                             "size or provide face-embedder weights)")
        if self.cfg.cond_dropout > 0 and self.unet.training:
            keep = torch.rand(mask.shape[0], 1, generator=generator, device=self.device) >= self.cfg.cond_dropout
            mask = mask & keep
        return emb.float(), mask, used

    def compute_loss(self, batch: Mapping, generator=None) -> tuple[torch.Tensor, dict]:
        g_ = generator or self.generator
        target_px = batch["target"].to(self.device)
        B = target_px.shape[0]
        latents = self.encode_images(target_px, g_)
        noise, t = self.sample_noise_t(latents, B, g_)
        noisy = self.scheduler.add_noise(latents, noise, t)
        emb_text = self.encode_text(batch)
        cond, cmask, used = self.condition(batch, g_)
        tokens, tmask = self.adapter.tokens(cond, cmask)
        pred = self.unet(noisy, t, emb_text,
                         cross_attention_kwargs={"id_tokens": tokens, "id_mask": tmask}).sample
        target = self.target_for(latents, noise, t)
        diff_loss = F.mse_loss(pred.float(), target.float())
        metrics = {"diffusion_loss": diff_loss.item(), "cond_source": used,
                   "identity_terms": float(self.identity_terms)}
        loss = diff_loss
        if self.identity_terms:
            id_l, nce_l, m = self.identity_losses(batch, noisy, pred, t)
            loss = loss + self.cfg.id_loss_weight * id_l + self.cfg.infonce_weight * nce_l
            metrics.update(m)
        metrics["loss"] = loss.item()
        return loss, metrics

    def predicted_x0(self, noisy, pred, t) -> torch.Tensor:
        a = self.alphas_cumprod[t].float().view(-1, 1, 1, 1)
        if self.scheduler.config.prediction_type == "v_prediction":
            return a.sqrt() * noisy.float() - (1 - a).sqrt() * pred.float()
        return (noisy.float() - (1 - a).sqrt() * pred.float()) / a.sqrt()

    def identity_losses(self, batch, noisy, pred, t):
        fm = batch["face_mask"].to(self.device)
        limit = self.id_terms_max_timestep()
        if limit is not None:
            fm = fm & (t <= limit)[:, None]
        zero = pred.sum() * 0.0
        if not fm.any():
            return zero, zero, {"id_loss": 0.0, "infonce": 0.0, "id_faces": 0}
        b_idx, f_idx = fm.nonzero(as_tuple=True)
        lm = batch["landmarks"].to(self.device)[b_idx, f_idx]
        has = batch["has_landmarks"].to(self.device)[b_idx, f_idx]
        bb = batch["bbox"].to(self.device)[b_idx, f_idx]
        ids = [batch["identity_ids"][b][f] for b, f in zip(b_idx.tolist(), f_idx.tolist())]
        # generated face: x0 estimate -> decode (only images that carry a face in the loss)
        imgs = sorted(set(b_idx.tolist()))
        remap = torch.full((pred.shape[0],), -1, dtype=torch.long, device=self.device)
        remap[torch.tensor(imgs, device=self.device)] = torch.arange(len(imgs), device=self.device)
        x0 = self.predicted_x0(noisy[imgs], pred[imgs], t[imgs])
        decoded = self.vae.decode((x0 / self.vae.config.scaling_factor).to(self.wdtype)).sample.clamp(-1, 1)
        g = self._embed(crop_faces(decoded, remap[b_idx], lm, has, bb, self.cfg.face_size))
        with torch.no_grad():
            if self.cfg.gt_source == "json" and batch["gt_emb"].shape[-1] == self.face_dim:
                tgt = F.normalize(batch["gt_emb"].to(self.device)[b_idx, f_idx].float(), dim=-1)
            else:
                tgt = self._embed(crop_faces(batch["target"].to(self.device).float(), b_idx, lm, has, bb,
                                             self.cfg.face_size))
        id_l = id_cosine_loss(g, tgt)
        # negatives: other GT faces of the batch + identity bank, never the same identity id
        N = g.shape[0]
        codes = self.bank.code(ids).to(self.device)
        negs = [tgt]
        nmask = [codes[:, None] != codes[None, :]]
        if len(self.bank):
            negs.append(self.bank.emb.to(self.device))
            nmask.append(codes[:, None] != self.bank.codes.to(self.device)[None, :])
        negatives = torch.cat(negs)  # [K, E]
        neg_mask = torch.cat(nmask, 1)
        nce = info_nce(g, tgt, negatives, neg_mask, self.cfg.temperature)
        n_neg = int(neg_mask.sum(1).float().mean().item())
        self.bank.push(tgt, ids)
        cos = F.cosine_similarity(g.detach(), tgt, dim=-1).mean().item()
        return id_l, nce, {"id_loss": id_l.item(), "infonce": nce.item(), "id_cos": cos, "id_faces": N,
                           "negatives": n_neg}

    # ------------------------------------------------------------------------------------------
    # held-out evaluation (see the module docstring)
    @property
    def heldout_measure(self) -> str:
        return "sim_gt_one_step" if self.identity_terms else "projection_margin_proxy"

    @torch.no_grad()
    def identity_likeness(self, batch: Mapping, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per held-out face, its likeness to its ground truth under the adapter's current weights, and
        with a face embedder its Sim(Ref) (cosine to its reference crop; NaN for a face without one);
        the noise, timestep and conditioning depend only on ``seed``."""
        g = torch.Generator(device=self.device).manual_seed(seed)
        cond, cmask, _ = self.condition(batch, g)
        if not self.identity_terms:
            return self._projection_margin(batch, cond, cmask), None
        target_px = batch["target"].to(self.device)
        B = target_px.shape[0]
        latents = self.encode_images(target_px, g)
        noise = torch.randn(latents.shape, generator=g, device=self.device, dtype=torch.float32).to(latents.dtype)
        top = self.id_terms_max_timestep()
        top = self.scheduler.config.num_train_timesteps - 1 if top is None else top
        t = torch.randint(0, top + 1, (B,), generator=g, device=self.device).long()
        noisy = self.scheduler.add_noise(latents, noise, t)
        tokens, tmask = self.adapter.tokens(cond, cmask)
        pred = self.unet(noisy, t, self.encode_text(batch),
                         cross_attention_kwargs={"id_tokens": tokens, "id_mask": tmask}).sample
        fm = batch["face_mask"].to(self.device)
        if not fm.any():
            return torch.zeros(0, device=self.device), torch.zeros(0, device=self.device)
        b_idx, f_idx = fm.nonzero(as_tuple=True)
        lm = batch["landmarks"].to(self.device)[b_idx, f_idx]
        has = batch["has_landmarks"].to(self.device)[b_idx, f_idx]
        bb = batch["bbox"].to(self.device)[b_idx, f_idx]
        x0 = self.predicted_x0(noisy, pred, t)
        decoded = self.vae.decode((x0 / self.vae.config.scaling_factor).to(self.wdtype)).sample.clamp(-1, 1)
        gen = self._embed(crop_faces(decoded, b_idx, lm, has, bb, self.cfg.face_size))
        gt = self._embed(crop_faces(target_px.float(), b_idx, lm, has, bb, self.cfg.face_size))
        # Sim(Ref): a model that copies its reference raises this more than Sim(GT) (MultiID-Bench)
        refs = batch["refs"].to(self.device)[b_idx, f_idx].float()
        n, r = refs.shape[0], refs.shape[-1]
        bi, fi = b_idx.cpu(), f_idx.cpu()
        whole = torch.tensor([0.0, 0.0, r, r]).expand(n, 4)
        ref_emb = self._embed(crop_faces(refs, torch.arange(n, device=self.device), batch["ref_landmarks"][bi, fi],
                                         batch["ref_has_landmarks"][bi, fi], whole, self.cfg.face_size))
        sim_ref = F.cosine_similarity(gen, ref_emb, dim=-1)
        sim_ref = sim_ref.masked_fill(~batch["ref_mask"].to(self.device)[b_idx, f_idx], float("nan"))
        return F.cosine_similarity(gen, gt, dim=-1), sim_ref

    def _projection_margin(self, batch: Mapping, cond: torch.Tensor, cmask: torch.Tensor) -> torch.Tensor:
        """Embedding-level proxy: cos(tokens(conditioning), tokens(own target)) minus the best cos to a
        target of another identity in the batch (-1 when there is none)."""
        gt, gmask = batch["gt_emb"].to(self.device), batch["gt_emb_mask"].to(self.device)
        if gt.shape[-1] != cond.shape[-1]:
            raise ValueError(f"the projection proxy needs target embeddings of the conditioning size {cond.shape[-1]}, "
                             f"the shards carry {gt.shape[-1]}: give face-embedder weights")
        both = cmask & gmask
        b_idx, f_idx = both.nonzero(as_tuple=True)
        if b_idx.numel() == 0:
            return torch.zeros(0, device=self.device)
        ids = self.bank.code([batch["identity_ids"][b][f] for b, f in zip(b_idx.tolist(), f_idx.tolist())])
        ids = ids.to(self.device)

        def tok(e):
            return F.normalize(self.adapter.proj(e.float()).flatten(-2), dim=-1)

        sims = tok(cond[b_idx, f_idx]) @ tok(gt[b_idx, f_idx]).T
        other = sims.masked_fill(ids[:, None] == ids[None, :], -1.0).amax(1)
        return sims.diagonal() - other

    @torch.no_grad()
    def evaluate(self, batches, seed: int = 1234) -> dict:
        """Held-out identity win rate of the current adapter over the untrained one (ties half), the
        mean likeness under each, and the number of faces; an empty input reports ``eval_pairs: 0``."""
        current = {k: v.detach().clone() for k, v in self.adapter.state_dict().items()}
        was_training = self.unet.training
        self.unet.eval()  # no conditioning dropout while measuring
        n, wins, mine, base = 0, 0.0, 0.0, 0.0
        ref_sims: dict[str, list[torch.Tensor]] = {"trained": [], "untrained": []}
        try:
            for i, batch in enumerate(batches):
                with precision.autocast(self.device, self.cfg.mixed_precision):  # as in training (bf16 UNet)
                    trained, ref_trained = self.identity_likeness(batch, seed + i)
                    self.adapter.load_state_dict(self.untrained_state)
                    untrained, ref_untrained = self.identity_likeness(batch, seed + i)
                self.adapter.load_state_dict(current)
                wins += pairwise_wins(trained - untrained)
                mine += float(trained.sum())
                base += float(untrained.sum())
                n += trained.numel()
                if ref_trained is not None:
                    ref_sims["trained"].append(ref_trained)
                    ref_sims["untrained"].append(ref_untrained)
        finally:
            self.adapter.load_state_dict(current)
            self.unet.train(was_training)
        if n == 0:
            return {"eval_pairs": 0}
        out = {"eval_id_win_rate": wins / n, "eval_likeness_trained": mine / n, "eval_likeness_untrained": base / n,
               "eval_pairs": n, "eval_measure": self.heldout_measure}
        for which, sims in ref_sims.items():
            v = torch.cat(sims) if sims else torch.zeros(0)
            v = v[~v.isnan()]
            if v.numel():  # faces without a reference have no Sim(Ref): left out, not counted as 0
                out[f"eval_sim_ref_{which}"] = float(v.mean())
        return out

    # bank state goes with the checkpoint so that a resume is exact
    def save_checkpoint(self, ckpt_dir, stream=None) -> Path:
        p = super().save_checkpoint(ckpt_dir, stream)
        if p is not None:  # rank 0 (each rank keeps its own bank in memory; rank 0's is saved)
            torch.save(self.bank.state(), p / "identity_bank.pt")
        return p

    def resume(self, ckpt, stream=None, strict_data: bool = True) -> dict:
        st = super().resume(ckpt, stream, strict_data)
        bp = Path(ckpt) / "identity_bank.pt"
        if bp.exists():
            self.bank.load_state(torch.load(bp, map_location="cpu", weights_only=True))
        return st

    def export_adapter(self, out_dir: str | Path, extra_meta: Mapping | None = None) -> Path:
        """``id_adapter.safetensors`` (adapter state dict) + ``id_adapter.json`` (adapter config,
        face-embedder status, dataset manifest, training config)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        checkpoints.save_trainable(self.adapter, out / "id_adapter.safetensors",
                              {"dataset_fingerprint": self.manifest.get("config_fingerprint")})
        meta = {"kind": "identity-adapter", "step": self.step, "adapter": self.adapter.config(),
                "face_embedder": self.embedder_info, "dataset": self.manifest,
                "config": self.cfg.to_dict(), **dict(extra_meta or {})}
        checkpoints.atomic_write_text(out / "id_adapter.json", json.dumps(meta, indent=2, default=str))
        return out / "id_adapter.safetensors"
