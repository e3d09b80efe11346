"""Run by test_train.py: the same training run as 1 process (batch 2b) or under torchrun (b per rank)."""
import json
import os
import sys

import torch

from dart_core.crg.graph import random_crg
from dart_core.model import DART
from dart_core.train import TrainConfig, fit
from tests.model_fixtures import NAMES, fixed_batch, tiny_config
from dart_core.vocab import Vocabulary

out_dir, clip_ckpt, global_batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
vocab = Vocabulary.from_names(NAMES, unseen={"boat"})
torch.manual_seed(0)
model = DART(tiny_config(pretrained=clip_ckpt))
model.set_classes(NAMES, random_crg(vocab, 2, seed=0).edge_index(vocab))
x, y = fixed_batch(32)
# global batch k = rows [k*G, (k+1)*G); rank r takes every world-th row of it (DistributedSampler's split)
batches = []
for k in range(len(x) // global_batch):
    rows = torch.arange(k * global_batch, (k + 1) * global_batch)[rank::world]
    batches.append((x[rows], y[rows]))
hist = fit(model, batches, vocab, out_dir, TrainConfig(epochs=3, lr=1e-3, min_lr=1e-4, warmup_epochs=1, log_every=1000),
           log=lambda *_: None)
if rank == 0:
    json.dump({k: [h[k] for h in hist if "step" in h] for k in ("total", "rank", "rank_class")},
              open(os.path.join(out_dir, "losses.json"), "w"))
