"""Training consumers of lineup's WebDataset shards.

The contract with the rest of the project is the shard format and ``manifest.json`` of a dataset
version (see ``training/data.py``); nothing here imports ``pipeline/``.

Modules
- ``data``: manifest reading and WebDataset loaders for the preference and multi-identity families.
- ``models``: UNet / VAE / scheduler builders; ``text``: text conditioning (hash or CLIP).
- ``precision``: device choice, autocast, frozen-weight dtype.
- ``rng``: seeding and RNG state; ``checkpoints``: checkpoints and atomic output writes;
  ``distributed``: torchrun helpers.
- ``dpo``: Diffusion-DPO with a LoRA on a diffusers ``UNet2DConditionModel``.
- ``iresnet``: ArcFace-style iresnet face embedder (insightface ``arcface_torch`` layout).
- ``identity``: identity adapter (decoupled cross-attention) + diffusion, ID and InfoNCE losses.
- ``reward``: social reward model on an open_clip backbone (triplet loss).
- ``pipes``: configuration and reporting to Dagster Pipes or stdout.
- ``run_dpo`` / ``run_identity`` / ``run_reward``: CLIs that also run under Dagster Pipes.

Importing ``training`` is cheap: submodules are imported on use, and the model, trainer and
``iresnet`` modules need only torch, diffusers, peft, safetensors and numpy (the GPU bench depends
on that).
"""

import os

# Nothing may reach a model hub at run time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
