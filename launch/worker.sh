#!/usr/bin/env bash
# Runs a command detached on one TPU VM worker, its log and exit status mirrored to a bucket.
# Started on every worker by `launch/tpu.py generate` (through `gcloud ... ssh --worker=all`):
#
#   bash launch/worker.sh start LOG_PREFIX COMMAND...
#
# `start` clears this worker's old exit marker in LOG_PREFIX, starts `run` detached (setsid +
# nohup, so the ssh session can end) and returns at once; a second `start` while the first still
# runs does nothing. `run` appends COMMAND's output to ~/datasetdm-launch/worker-W.log, copies it
# to LOG_PREFIX/worker-W.log every DATASETDM_LOG_EVERY seconds (default 60) and at the end, then
# writes LOG_PREFIX/worker-W.done (exit status 0) or LOG_PREFIX/worker-W.failed (holding the
# status). W is the worker number from the TPU VM metadata server (DATASETDM_WORKER overrides it).
set -u

mode=${1:?usage: worker.sh start|run LOG_PREFIX COMMAND...}
prefix=${2:?usage: worker.sh start|run LOG_PREFIX COMMAND...}
shift 2
[ $# -gt 0 ] || { echo "worker.sh: no command" >&2; exit 2; }
prefix=${prefix%/}

w=${DATASETDM_WORKER:-$(curl -sf -m 5 -H Metadata-Flavor:Google \
    http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number 2>/dev/null \
    || hostname)}
dir=$HOME/datasetdm-launch
mkdir -p "$dir"

case $mode in
start)
    if [ -f "$dir/pid" ] && kill -0 "$(cat "$dir/pid")" 2>/dev/null; then
        echo "worker $w: already running (pid $(cat "$dir/pid")), not starting another"
        exit 0
    fi
    for m in done failed; do
        rm -f "$dir/worker-$w.$m"
        gcloud storage rm "$prefix/worker-$w.$m" >/dev/null 2>&1 || true
    done
    detach=$(command -v setsid || true)
    $detach nohup bash "$0" run "$prefix" "$@" >/dev/null 2>&1 </dev/null &
    echo $! >"$dir/pid"
    echo "worker $w: started, log $prefix/worker-$w.log"
    ;;
run)
    log=$dir/worker-$w.log
    echo "=== $(date -u +%Y-%m-%dT%H:%M:%SZ) worker $w: $*" >>"$log"
    push() { gcloud storage cp "$log" "$prefix/worker-$w.log" >/dev/null 2>&1 || true; }
    (while sleep "${DATASETDM_LOG_EVERY:-60}"; do push; done) &
    pusher=$!
    "$@" >>"$log" 2>&1
    rc=$?
    kill "$pusher" 2>/dev/null
    echo "=== $(date -u +%Y-%m-%dT%H:%M:%SZ) worker $w: exit status $rc" >>"$log"
    push
    if [ "$rc" = 0 ]; then marker=done; else marker=failed; fi
    echo "$rc" >"$dir/worker-$w.$marker"
    gcloud storage cp "$dir/worker-$w.$marker" "$prefix/worker-$w.$marker" >/dev/null 2>&1
    rm -f "$dir/pid"
    exit "$rc"
    ;;
*)
    echo "worker.sh: unknown mode $mode (start or run)" >&2
    exit 2
    ;;
esac
