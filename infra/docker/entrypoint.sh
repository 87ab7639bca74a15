#!/usr/bin/env bash
# Training container entrypoint: restore the latest checkpoint of $CLOUDCKPT_REMOTE, then exec the training command.
#
#   cloudckpt-entrypoint python train.py --epochs 50
#
# `cloudckpt pull latest` exit codes decide: 0 → resume (CLOUDCKPT_RESUME_DIR is the restored directory),
# 3 → the run has no checkpoint yet, start fresh (CLOUDCKPT_RESUME_DIR is empty); 2/4/5/6 (usage, integrity,
# access, fenced writer) → exit with that code, which the Kubernetes Job's podFailurePolicy treats as fatal;
# anything else → exit 1, a retriable pod failure. The training process replaces this shell (exec), so it receives
# SIGTERM directly when the pod or VM is preempted.
#
# Environment: CLOUDCKPT_REMOTE (required), CLOUDCKPT_CHECKPOINT_DIR (default ./checkpoint),
# CLOUDCKPT_PULL_SELECTOR (default latest), CLOUDCKPT_BIN (default: cloudckpt on PATH).
set -euo pipefail

log() { printf 'cloudckpt-entrypoint: %s\n' "$*" >&2; }

[[ $# -gt 0 ]] || { log "usage: cloudckpt-entrypoint COMMAND [ARGS...]"; exit 2; }
[[ -n ${CLOUDCKPT_REMOTE:-} ]] || { log "CLOUDCKPT_REMOTE is not set"; exit 2; }
ckpt_dir=${CLOUDCKPT_CHECKPOINT_DIR:-checkpoint}
selector=${CLOUDCKPT_PULL_SELECTOR:-latest}
cloudckpt=${CLOUDCKPT_BIN:-cloudckpt}

rc=0
"$cloudckpt" pull "$selector" --remote "$CLOUDCKPT_REMOTE" --to "$ckpt_dir" --fallback || rc=$?
case $rc in
  0) log "restored $selector of $CLOUDCKPT_REMOTE into $ckpt_dir"
     export CLOUDCKPT_RESUME_DIR=$ckpt_dir ;;
  3) log "no checkpoint at $CLOUDCKPT_REMOTE yet: starting fresh"
     export CLOUDCKPT_RESUME_DIR="" ;;
  2|4|5|6) log "cloudckpt pull failed with exit code $rc (not retriable)"; exit "$rc" ;;
  *) log "cloudckpt pull failed with exit code $rc"; exit 1 ;;
esac
exec "$@"
