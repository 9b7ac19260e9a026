#!/usr/bin/env bash
# One SLURM task (one per node, started by slurm.sbatch): torchrun for this node, joining the others through a c10d
# rendezvous, with the time-limit warning (USR1) passed on to its training processes.
#   slurm_node.sh NODES PROCS_PER_NODE RDZV_ID HEAD:PORT OVERRIDES...
# torchrun runs its workers in their own sessions, so a signal to this task's process group would not reach
# them, and USR1's default action would kill torchrun itself: torchrun starts with USR1 ignored (the workers
# inherit that until the trainer installs its handler) and this script forwards USR1 to torchrun's children.
# A worker that dies makes torchrun restart every node's workers (up to MAX_RESTARTS times, default 3); they resume
# from the latest checkpoint. Each rendezvous round gets a fresh store (TORCH_DISABLE_SHARE_RDZV_TCP_STORE): the
# shared one keeps the dead workers' addresses, which restarted workers would try to connect to.
set -uo pipefail
nodes=$1 procs_per_node=$2 rdzv_id=$3 endpoint=$4
shift 4
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
(
  trap '' USR1
  exec "${PYTHON:-python}" -m torch.distributed.run --nnodes="$nodes" --nproc_per_node="$procs_per_node" \
    --max-restarts="${MAX_RESTARTS:-3}" --rdzv_id="$rdzv_id" --rdzv_backend=c10d --rdzv_endpoint="$endpoint" \
    -m contrastive.cli.train "$@"
) &
torchrun_pid=$!
trap 'pkill -USR1 -P "$torchrun_pid"' USR1
# A trapped signal interrupts `wait`; keep waiting until torchrun has ended.
while :; do
  wait "$torchrun_pid"; status=$?
  kill -0 "$torchrun_pid" 2>/dev/null || break
done
if [ "$status" -gt 128 ]; then
  wait "$torchrun_pid"; late=$?
  [ "$late" = 127 ] || status=$late  # 127: that status was torchrun's own, already collected
fi
exit "$status"
