#!/usr/bin/env bash
# One node, N processes, Hydra overrides passed through unchanged:
#   NPROC=8 launch/torchrun.sh experiment=siglip_vit_b16 data.sources.0.shards='/data/{00000..01023}.tar'
# NPROC defaults to the number of visible GPUs (1 without any); PYTHON picks the interpreter (default: python).
# --standalone runs a c10d rendezvous on a free local port, so several jobs can share a machine. A worker that dies
# makes torchrun restart all of them (up to MAX_RESTARTS times, default 3), resuming from the latest checkpoint;
# each restart gets a fresh rendezvous store, as launch/slurm_node.sh explains.
set -euo pipefail
PYTHON=${PYTHON:-python}
NPROC=${NPROC:-$("$PYTHON" -c "import torch; print(max(1, torch.cuda.device_count()))")}
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" --max-restarts="${MAX_RESTARTS:-3}" \
  -m contrastive.cli.train "$@"
