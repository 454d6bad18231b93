#!/usr/bin/env bash
# A one-machine Slurm cluster for trying the course's job scripts: a controller and one node on this host.
#
#   scripts/slurm/local_cluster.sh start    # write the configuration, start munged, slurmctld and slurmd
#   export SLURM_CONF=/tmp/course-slurm/slurm.conf   (start prints this line)
#   sbatch scripts/slurm/sbatch_single_gpu.sh
#   scripts/slurm/local_cluster.sh status   # the daemons and the queue
#   scripts/slurm/local_cluster.sh stop     # stop every daemon it started and remove its folder
#
# It needs Debian's (or Ubuntu's) slurm-wlm and munge packages and root, as daemons that change user do.
# The node has no GPU: its four "GPUs" are a count only (gres.conf with no device files), so scripts that
# ask for GPUs are accepted and the course's code finds no driver and runs in CPU mode. Everything lives in
# one folder ($COURSE_SLURM_DIR, default /tmp/course-slurm): configuration, state, logs, the munge key and
# socket; nothing in /etc is touched.
set -euo pipefail

DIR=${COURSE_SLURM_DIR:-/tmp/course-slurm}
HOST=$(hostname -s)
CONF=$DIR/slurm.conf

usage() {
    sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
}

need() {
    for program in munged slurmctld slurmd sbatch; do
        command -v "$program" >/dev/null || {
            echo "error: $program is not installed: apt-get install slurm-wlm munge (Debian, Ubuntu)" >&2
            exit 2
        }
    done
    [ "$(id -u)" = 0 ] || { echo "error: the Slurm daemons run as root here; run this as root" >&2; exit 2; }
}

write_configuration() {
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/munge"
    chmod 700 "$DIR/munge"
    [ -f "$DIR/munge/munge.key" ] || dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$DIR/munge/munge.key"
    cat >"$CONF" <<CONF
# Written by scripts/slurm/local_cluster.sh: one controller and one node, both on $HOST.
ClusterName=course
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
SlurmctldPort=${COURSE_SLURMCTLD_PORT:-6817}
SlurmdPort=${COURSE_SLURMD_PORT:-6818}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
GresTypes=gpu
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=$(($(free -m | awk '/Mem:/ {print $2}') / 2)) Gres=gpu:4 State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=60 State=UP
CONF
    for gpu in 0 1 2 3; do  # stand-ins for /dev/nvidia0..3: character devices like /dev/null
        [ -e "$DIR/gpu$gpu" ] || mknod "$DIR/gpu$gpu" c 1 3
    done
    printf 'AutoDetect=off\nNodeName=%s Name=gpu File=%s/gpu[0-3]\n' "$HOST" "$DIR" >"$DIR/gres.conf"
}

start() {
    need
    if [ -f "$DIR/slurmctld.pid" ] && kill -0 "$(cat "$DIR/slurmctld.pid")" 2>/dev/null; then
        echo "already running; export SLURM_CONF=$CONF"
        return
    fi
    write_configuration
    munged --force --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
        --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" --seed-file="$DIR/munge/munged.seed"
    SLURM_CONF=$CONF slurmctld
    SLURM_CONF=$CONF slurmd
    for _ in $(seq 60); do  # the node registers with the controller within a few seconds
        if SLURM_CONF=$CONF sinfo --noheader --states=idle --format=%N 2>/dev/null | grep -q .; then
            echo "a Slurm cluster is up on $HOST (partition debug, $(nproc) CPUs, 4 GPUs by count only)"
            echo "export SLURM_CONF=$CONF"
            return
        fi
        sleep 0.5
    done
    echo "error: the node did not come up; the daemons' logs follow (stop removes them)" >&2
    tail -n 5 "$DIR/slurmctld.log" "$DIR/slurmd.log" "$DIR/munge/munged.log" >&2 || true
    exit 1
}

stop() {
    for daemon in slurmd slurmctld munge/munged; do
        if [ -f "$DIR/$daemon.pid" ]; then
            pid=$(cat "$DIR/$daemon.pid")
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
        fi
    done
    rm -rf "$DIR"
    echo "the local Slurm cluster is stopped and $DIR removed"
}

status() {
    if [ ! -f "$CONF" ]; then
        echo "not running (no $CONF)"
        return 1
    fi
    SLURM_CONF=$CONF sinfo
    SLURM_CONF=$CONF squeue
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    -h | --help | help) usage ;;
    *) usage >&2; exit 2 ;;
esac
