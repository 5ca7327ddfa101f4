#!/usr/bin/env bash
# A real two-node SLURM cluster on this one machine, for the `slurm` tests and for trying the
# sbatch scripts before a real cluster sees them.
#
#   slurm/testing/cluster.sh install   # Debian packages slurm-wlm + munge (root)
#   slurm/testing/cluster.sh start     # munge key, munged, slurmctld, slurmd n1 + n2
#   export SLURM_CONF=/tmp/noa-slurm/slurm.conf   # what `start` prints; then sbatch/squeue work
#   slurm/testing/cluster.sh stop      # stops the daemons it started (by pid), nothing else
#   slurm/testing/cluster.sh status
#
# Two nodes n1, n2 with one CPU each (NodeAddr 127.0.0.1, slurmd ports 17001-17002, `%n` in
# every per-node path), proctrack/linuxproc, task/none, cons_tres with CR_CPU, SlurmUser=root.
# Everything lives under $NOA_SLURM_DIR (default /tmp/noa-slurm); n1/n2 go to /etc/hosts.
set -euo pipefail

DIR=${NOA_SLURM_DIR:-/tmp/noa-slurm}
CONF=$DIR/slurm.conf
HOST=$(hostname -s)

need_root() {
    if [ "$(id -u)" != 0 ]; then echo "error: $1 needs root" >&2; exit 2; fi
}

install() {
    need_root install
    if command -v slurmctld >/dev/null && command -v munged >/dev/null; then
        echo "slurm-wlm and munge already installed"; return
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q slurm-wlm munge || { apt-get update -q && apt-get install -y -q slurm-wlm munge; }
}

write_conf() {
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log" "$DIR/munge"
    local mem
    mem=$(awk '/MemTotal/ {print int($2 / 1024 / 4)}' /proc/meminfo)  # a quarter per node
    cat > "$CONF" <<EOF
# Written by slurm/testing/cluster.sh: a two-node test cluster on $HOST.
ClusterName=noa-test
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=16817
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobRequeue=1
# Seconds between the SIGTERM of a cancelled/preempted/timed-out/requeued job and its SIGKILL
# (a requeued job's batch step also lingers this long): enough for the tests' tiny saves; a real
# cluster's value must cover a step plus a checkpoint save (ask your admins; GraceTime too).
KillWait=30
InactiveLimit=0
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=n[1-2] NodeHostname=$HOST NodeAddr=127.0.0.1 Port=[17001-17002] CPUs=1 RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
}

start_munge() {
    if [ -f "$DIR/munged.pid" ] && kill -0 "$(cat "$DIR/munged.pid")" 2>/dev/null; then return; fi
    if [ ! -s /etc/munge/munge.key ]; then
        mkdir -p /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
        chmod 0400 /etc/munge/munge.key
    fi
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    munged --force --pid-file="$DIR/munged.pid" --log-file="$DIR/log/munged.log" \
        --socket=/run/munge/munge.socket.2
}

wait_for_nodes() {
    for _ in $(seq 60); do
        if sinfo -h -N -o '%N %t' 2>/dev/null | grep -qE '^n2 (idle|mix|alloc)' &&
           sinfo -h -N -o '%N %t' 2>/dev/null | grep -qE '^n1 (idle|mix|alloc)'; then
            return
        fi
        sleep 1
    done
    echo "error: nodes n1/n2 did not come up; see $DIR/log" >&2
    sinfo -N >&2 || true
    exit 1
}

start() {
    need_root start
    command -v slurmctld >/dev/null || { echo "error: slurm-wlm not installed (run: $0 install)" >&2; exit 2; }
    for n in n1 n2; do
        grep -qE "[[:space:]]$n([[:space:]]|$)" /etc/hosts || echo "127.0.0.1 $n" >> /etc/hosts
    done
    write_conf
    start_munge
    export SLURM_CONF=$CONF
    if ! { [ -f "$DIR/slurmctld.pid" ] && kill -0 "$(cat "$DIR/slurmctld.pid")" 2>/dev/null; }; then
        slurmctld -f "$CONF" -c  # -c: a clean state, no jobs from an earlier cluster
    fi
    for n in n1 n2; do
        if ! { [ -f "$DIR/slurmd-$n.pid" ] && kill -0 "$(cat "$DIR/slurmd-$n.pid")" 2>/dev/null; }; then
            mkdir -p "$DIR/spool/$n"
            slurmd -f "$CONF" -N "$n"
        fi
    done
    wait_for_nodes
    echo "cluster up: export SLURM_CONF=$CONF"
}

stop() {
    for name in slurmd-n1 slurmd-n2 slurmctld munged; do
        local pidfile=$DIR/$name.pid
        [ -f "$pidfile" ] || continue
        local pid
        pid=$(cat "$pidfile")
        if kill -0 "$pid" 2>/dev/null; then
            kill "$pid"
            for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
            kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
        fi
        rm -f "$pidfile"
    done
    echo "cluster stopped"
}

status() {
    export SLURM_CONF=$CONF
    sinfo -N && squeue
}

case "${1:-}" in
    install) install ;;
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 install|start|stop|status" >&2; exit 2 ;;
esac
