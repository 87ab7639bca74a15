#!/usr/bin/env bash
# AWS spot launch-template user-data: install cloudckpt, restore the latest checkpoint, resume training.
#
# cloud-init runs this once per instance (stage "boot"): it installs cloudckpt into a venv, copies itself to
# $CLOUDCKPT_HOME/bin and starts itself again as the systemd unit cloudckpt-train (stage "run"). The unit pulls the
# latest checkpoint (`cloudckpt pull latest`; exit code 3 means the run has none yet: start fresh), then runs the
# training command with CLOUDCKPT_RESUME_DIR set: the latest checkpoint, the model file Keras wrote plus
# cloudckpt_state/ — or, for a save point where Keras wrote no file (save_best_only without improvement, a
# preemption), resume state alone, which is what resuming needs (the log says so; `cloudckpt pull latest-model`
# gets the newest checkpoint with a model). On a spot interruption systemd sends SIGTERM and waits
# CLOUDCKPT_STOP_TIMEOUT seconds (the AWS notice is 2 minutes; the cloudckpt callback flushes within its deadline).
# A training exit with CLOUDCKPT_PREEMPT_EXIT_CODE (the instance survived, e.g. a rebalance signal) or a
# transient failure restarts the unit (at most 10 times an hour), which restores again; usage, integrity, access
# and fencing errors do not.
#
# Settings: the environment first, else the instance's tags through IMDSv2 (the launch template must set
# instance_metadata_tags = "enabled"; see terraform/examples/aws):
#   CLOUDCKPT_REMOTE             tag cloudckpt-remote         s3://bucket/runs/name (required)
#   TRAIN_COMMAND                tag cloudckpt-train-command  training command, run by bash -c (required)
#   TRAIN_PACKAGE                tag cloudckpt-train-package  pip requirement with the training code (optional)
#   CLOUDCKPT_REPO_URL           tag cloudckpt-repo-url       https:// git URL of the cloudckpt repository (required to install)
#   CLOUDCKPT_REF                tag cloudckpt-ref            the commit to install: a full 40-hex sha (required to install)
#   CLOUDCKPT_EXTRAS             extras to install (default "s3,keras")
#   CLOUDCKPT_SPEC               instead of the three above: a pip requirement for cloudckpt by path or URL (a
#                                wheel baked into the image, "cloudckpt[...] @ https://.../cloudckpt-....whl"); never
#                                the bare name: no cloudckpt release exists on PyPI, and an unclaimed name installed as
#                                root is a dependency-confusion risk (docs/deploy.md)
#   CLOUDCKPT_HOME               venv, checkpoint and working directory (default /opt/cloudckpt)
#   CLOUDCKPT_VENV               virtualenv holding cloudckpt (default $CLOUDCKPT_HOME/venv)
#   CLOUDCKPT_USER               user that trains (default cloudckpt; created when missing)
#   CLOUDCKPT_PREEMPT_EXIT_CODE  training's exit code after a preemption flush (default 143 = cloudckpt.keras.EXIT_PREEMPTED)
#   CLOUDCKPT_STOP_TIMEOUT       seconds from SIGTERM to SIGKILL (default 45 > the callback's 25 s preemption_deadline)
#   CLOUDCKPT_INSTALL            1 (default) installs cloudckpt; 0 uses the one in CLOUDCKPT_VENV as it is
#   CLOUDCKPT_LAUNCH             systemd (default) or exec: restore and train in the foreground, no systemd
#   CLOUDCKPT_METADATA           1 (default) reads unset settings from instance tags; 0 never asks IMDS
set -euo pipefail

readonly IMDS=http://169.254.169.254/latest
STAGE=${1:-boot}

log() { printf 'cloudckpt-user-data: %s\n' "$*" >&2; }

imds_tag() {
  local token
  token=$(curl -fsS -X PUT "$IMDS/api/token" -H "X-aws-ec2-metadata-token-ttl-seconds: 300") || return 1
  curl -fsS -H "X-aws-ec2-metadata-token: $token" "$IMDS/meta-data/tags/instance/$1"
}

setting() { # setting NAME TAG [DEFAULT]: the variable if set (even empty), else the instance tag, else the default
  local name=$1 tag=$2 default=${3-} value
  if [[ -n ${!name+set} ]]; then
    value=${!name}
  elif [[ ${CLOUDCKPT_METADATA:-1} == 0 ]] || ! value=$(imds_tag "$tag" 2>/dev/null); then
    value=$default
  fi
  printf '%s' "$value"
}

CLOUDCKPT_HOME=${CLOUDCKPT_HOME:-/opt/cloudckpt}
CLOUDCKPT_VENV=${CLOUDCKPT_VENV:-$CLOUDCKPT_HOME/venv}
CLOUDCKPT_EXTRAS=${CLOUDCKPT_EXTRAS:-s3,keras}
CLOUDCKPT_USER=${CLOUDCKPT_USER:-cloudckpt}
CLOUDCKPT_PREEMPT_EXIT_CODE=${CLOUDCKPT_PREEMPT_EXIT_CODE:-143}
CLOUDCKPT_STOP_TIMEOUT=${CLOUDCKPT_STOP_TIMEOUT:-45}
CLOUDCKPT_INSTALL=${CLOUDCKPT_INSTALL:-1}
CLOUDCKPT_LAUNCH=${CLOUDCKPT_LAUNCH:-systemd}
CKPT_DIR=$CLOUDCKPT_HOME/checkpoint

CLOUDCKPT_REMOTE=$(setting CLOUDCKPT_REMOTE cloudckpt-remote)
TRAIN_COMMAND=$(setting TRAIN_COMMAND cloudckpt-train-command)
TRAIN_PACKAGE=$(setting TRAIN_PACKAGE cloudckpt-train-package)
CLOUDCKPT_REPO_URL=$(setting CLOUDCKPT_REPO_URL cloudckpt-repo-url)
CLOUDCKPT_REF=$(setting CLOUDCKPT_REF cloudckpt-ref)
[[ -n $CLOUDCKPT_REMOTE ]] || { log "CLOUDCKPT_REMOTE is not set (env or tag cloudckpt-remote)"; exit 2; }
[[ -n $TRAIN_COMMAND ]] || { log "TRAIN_COMMAND is not set (env or tag cloudckpt-train-command)"; exit 2; }
export CLOUDCKPT_REMOTE

cloudckpt_spec() { # the pip requirement for cloudckpt: a pinned commit of its repository, or CLOUDCKPT_SPEC by path/URL
  if [[ -n ${CLOUDCKPT_SPEC:-} ]]; then
    if [[ $CLOUDCKPT_SPEC =~ ^[[:space:]]*cloudckpt[[:space:]]*(\[[^]]*\])?[[:space:]]*([<>=!~;].*)?$ ]]; then
      log "CLOUDCKPT_SPEC=$CLOUDCKPT_SPEC installs cloudckpt by name from the package index: there is no such release"
      log "(dependency-confusion risk); give a wheel path/URL or CLOUDCKPT_REPO_URL + CLOUDCKPT_REF"
      exit 2
    fi
    printf '%s' "$CLOUDCKPT_SPEC"
    return
  fi
  [[ ${CLOUDCKPT_REPO_URL:-} == https://* ]] || { log "CLOUDCKPT_REPO_URL must be the https:// git URL of cloudckpt (tag cloudckpt-repo-url)"; exit 2; }
  [[ ${CLOUDCKPT_REF:-} =~ ^[0-9a-f]{40}$ ]] || { log "CLOUDCKPT_REF must be a full commit sha, 40 hex digits (tag cloudckpt-ref)"; exit 2; }
  printf 'cloudckpt[%s] @ git+%s@%s' "$CLOUDCKPT_EXTRAS" "$CLOUDCKPT_REPO_URL" "$CLOUDCKPT_REF"
}

install_cloudckpt() {
  local spec
  spec=$(cloudckpt_spec)
  if ! python3 -m venv --help >/dev/null 2>&1; then
    if command -v apt-get >/dev/null; then
      apt-get update -q && apt-get install -y -q python3-venv
    else
      dnf install -y -q python3
    fi
  fi
  if [[ $spec == *git+* ]] && ! command -v git >/dev/null; then
    if command -v apt-get >/dev/null; then
      apt-get update -q && apt-get install -y -q git
    else
      dnf install -y -q git
    fi
  fi
  mkdir -p "$CLOUDCKPT_HOME"
  [[ -x $CLOUDCKPT_VENV/bin/python ]] || python3 -m venv "$CLOUDCKPT_VENV"
  "$CLOUDCKPT_VENV/bin/pip" install -q --upgrade pip
  local packages=("$spec")
  [[ -z $TRAIN_PACKAGE ]] || packages+=("$TRAIN_PACKAGE")
  "$CLOUDCKPT_VENV/bin/pip" install -q "${packages[@]}"
  id -u "$CLOUDCKPT_USER" >/dev/null 2>&1 || useradd --system --home-dir "$CLOUDCKPT_HOME" "$CLOUDCKPT_USER"
  chown -R "$CLOUDCKPT_USER:" "$CLOUDCKPT_HOME"
}

restore() { # pull the latest checkpoint into CKPT_DIR; set CLOUDCKPT_RESUME_DIR, empty for a fresh start
  local rc attempt said
  for attempt in 1 2 3; do
    rc=0
    said=$(mktemp)  # what cloudckpt prints: logged, except its "no run" error before a fresh start
    "$CLOUDCKPT_VENV/bin/cloudckpt" pull latest --remote "$CLOUDCKPT_REMOTE" --to "$CKPT_DIR" --fallback \
      >"$said" 2>&1 || rc=$?
    [[ $rc == 3 ]] || cat "$said" >&2
    rm -f "$said"
    case $rc in
      0) log "restored the latest checkpoint of $CLOUDCKPT_REMOTE into $CKPT_DIR"
         CLOUDCKPT_RESUME_DIR=$CKPT_DIR; return 0 ;;
      3) log "no checkpoint at $CLOUDCKPT_REMOTE yet: starting fresh"
         CLOUDCKPT_RESUME_DIR=""; return 0 ;;
      1) log "pull failed (exit 1), attempt $attempt of 3"; sleep $((attempt * 10)) ;;
      *) log "pull failed with exit code $rc: not retrying"; exit "$rc" ;;
    esac
  done
  exit "$rc"
}

run_training() {
  mkdir -p "$CLOUDCKPT_HOME"
  restore
  export CLOUDCKPT_RESUME_DIR CLOUDCKPT_PREEMPT_EXIT_CODE
  cd "$CLOUDCKPT_HOME"
  log "training: $TRAIN_COMMAND (resume from: ${CLOUDCKPT_RESUME_DIR:-nothing})"
  exec bash -c "$TRAIN_COMMAND"
}

case $STAGE in
  run)
    run_training ;;
  boot)
    [[ $CLOUDCKPT_INSTALL == 0 ]] || install_cloudckpt
    if [[ $CLOUDCKPT_LAUNCH == exec ]]; then
      run_training
    fi
    install -D -m 0755 "${BASH_SOURCE[0]}" "$CLOUDCKPT_HOME/bin/resume-train.sh"
    systemd-run --unit=cloudckpt-train --uid="$CLOUDCKPT_USER" --collect \
      --property=Restart=on-failure --property=RestartSec=10 \
      --property=StartLimitIntervalSec=3600 --property=StartLimitBurst=10 \
      --property="RestartPreventExitStatus=2 4 5 6" \
      --property=KillSignal=SIGTERM --property=TimeoutStopSec="$CLOUDCKPT_STOP_TIMEOUT" \
      --setenv=HOME="$CLOUDCKPT_HOME" --setenv=CLOUDCKPT_HOME="$CLOUDCKPT_HOME" \
      --setenv=CLOUDCKPT_VENV="$CLOUDCKPT_VENV" --setenv=CLOUDCKPT_REMOTE="$CLOUDCKPT_REMOTE" \
      --setenv=TRAIN_COMMAND="$TRAIN_COMMAND" --setenv=TRAIN_PACKAGE="$TRAIN_PACKAGE" \
      --setenv=CLOUDCKPT_PREEMPT_EXIT_CODE="$CLOUDCKPT_PREEMPT_EXIT_CODE" \
      --setenv=PATH="$CLOUDCKPT_VENV/bin:/usr/local/bin:/usr/bin:/bin" \
      "$CLOUDCKPT_HOME/bin/resume-train.sh" run
    log "started systemd unit cloudckpt-train (journalctl -u cloudckpt-train)" ;;
  *)
    log "unknown stage $STAGE (boot or run)"; exit 2 ;;
esac
