#!/usr/bin/env bash
# A real SLURM cluster on this machine, for the tests and for trying `environment: slurm`:
# `make slurm-local` (start, idempotent; NODES=2 for two nodes) and `make slurm-local-stop`. Installs
# Debian's slurm-wlm and munge when missing (apt, as root). Its slurm.conf, state, logs and the daemons'
# PID files live in .slurm/ (git-ignored); /etc/slurm/slurm.conf points there, so sbatch, squeue and
# scancel find it.
#
# NODES=2 runs two slurmd daemons on this one host (Debian's build supports it: `scontrol show config`
# prints MULTIPLE_SLURMD = Yes), nodes ts-n1 and ts-n2, each on its own port and its own loopback
# address (127.0.0.11, 127.0.0.12, added to /etc/hosts). A job's main address is its first node's name,
# which resolves to neither 127.0.0.1 nor this host's name: a run that found its peers came by it from
# the allocation, not by luck. Tasks are bound to cores (task/affinity, TaskPluginParam=Cores) as on
# most real clusters, so a rank sees exactly the CPUs its step was given.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="$PWD/.slurm"
HOST="$(hostname -s)"
ETC_CONF=/etc/slurm/slurm.conf
NODES="${NODES:-1}"
MARKER="# Written by scripts/slurm_local.sh"
HOSTS_MARKER="# tinystories-lab slurm-local node"

say() { echo "slurm-local: $*"; }

answers() { grep -qE 'idle|mix|alloc' <<<"$(timeout 5 sinfo -h -o %T 2>/dev/null)"; }

node_count() { timeout 5 sinfo -h -N -o %N 2>/dev/null | sort -u | wc -l; }

node_names() {
    if [ "$NODES" = 1 ]; then echo "$HOST"; else seq -f "ts-n%g" 1 "$NODES"; fi
}

# Stop exactly the daemons whose PID files are in folder $1 (this checkout's .slurm/, or the one another
# checkout's cluster runs from), waiting until they are gone.
stop_daemons() {
    local dir="$1" file pid
    for file in "$dir"/slurmctld.pid "$dir"/slurmd*.pid; do
        [ -s "$file" ] || continue
        pid="$(cat "$file")"
        if grep -qxE 'slurmctld|slurmd' "/proc/$pid/comm" 2>/dev/null; then
            kill "$pid"
            for _ in $(seq 100); do [ -e "/proc/$pid" ] || break; sleep 0.1; done
        fi
        rm -f "$file"
    done
}

stop() {
    stop_daemons "$DIR"
    say "stopped the slurmctld and slurmd this checkout started (munged keeps running)"
}

install() {
    command -v slurmctld >/dev/null && command -v munged >/dev/null && return
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        say "SLURM is not installed. As root on Debian/Ubuntu: apt-get install -y slurm-wlm munge" >&2
        exit 1
    fi
    say "installing slurm-wlm and munge with apt ..."
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

start_munge() {
    pgrep -x munged >/dev/null && return
    if [ ! -s /etc/munge/munge.key ]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/log/munge /var/lib/munge && chown munge:munge /run/munge /var/log/munge /var/lib/munge
    runuser -u munge -- munged
}

# The conf /etc/slurm/slurm.conf points to now, if this script wrote it (ours or another checkout's).
linked_conf() {
    [ -e "$ETC_CONF" ] && grep -q "^$MARKER" "$ETC_CONF" && readlink -f "$ETC_CONF"
}

add_hosts() {
    local i=0 name
    for name in $(node_names); do
        i=$((i + 1))
        grep -qE "^127\.0\.0\.$((10 + i))[[:space:]]+$name([[:space:]]|\$)" /etc/hosts \
            || echo "127.0.0.$((10 + i)) $name $HOSTS_MARKER" >>/etc/hosts
    done
}

write_conf() {
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
    local nodes="" names i=0 name
    if [ "$NODES" = 1 ]; then
        nodes="NodeName=$HOST CPUs=$(nproc) State=UNKNOWN"
    else
        for name in $(node_names); do
            i=$((i + 1))
            nodes+="NodeName=$name NodeHostname=$HOST NodeAddr=127.0.0.$((10 + i)) Port=$((17000 + i)) CPUs=$(nproc) State=UNKNOWN"$'\n'
        done
    fi
    names="$(node_names | paste -sd,)"
    cat >"$DIR/slurm.conf" <<EOF
$MARKER: a $NODES-node cluster for tinystories-lab's tests.
ClusterName=tinystories
SlurmctldHost=$HOST
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
ReturnToService=2
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
TaskPluginParam=Cores
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
KillWait=5
MinJobAge=60
${nodes%$'\n'}
PartitionName=debug Nodes=$names Default=YES MaxTime=INFINITE State=UP
EOF
    # Another checkout's cluster (its conf carries the marker line) or a dangling link is taken over; a
    # conf this script did not write is the machine's own SLURM and is left alone.
    if [ -e "$ETC_CONF" ] && [ "$(readlink -f "$ETC_CONF")" != "$DIR/slurm.conf" ] \
        && ! grep -q "^$MARKER" "$ETC_CONF"; then
        say "$ETC_CONF exists and is not this project's: this machine has its own SLURM; use that." >&2
        exit 1
    fi
    mkdir -p "$(dirname "$ETC_CONF")"
    ln -sfn "$DIR/slurm.conf" "$ETC_CONF"
}

start() {
    case "$NODES" in
        [1-9]) ;;
        *) say "NODES=$NODES: give a number of nodes from 1 to 9" >&2; exit 2 ;;
    esac
    if answers && [ "$(node_count)" = "$NODES" ]; then
        say "a cluster answers already: $(sinfo -h -o '%P %D node(s) %T' | head -1)"
        return
    fi
    install
    [ "$(id -u)" = 0 ] || { say "starting the daemons needs root" >&2; exit 1; }
    local previous
    if previous="$(linked_conf)"; then  # a cluster of another size (or another checkout's): replace it
        stop_daemons "$(dirname "$previous")"
    fi
    start_munge
    [ "$NODES" = 1 ] || add_hosts
    write_conf
    slurmctld
    for _ in $(seq 50); do timeout 5 scontrol ping >/dev/null 2>&1 && break; sleep 0.2; done
    if [ "$NODES" -gt 1 ] && ! grep -qE 'MULTIPLE_SLURMD *= *Yes' <<<"$(scontrol show config 2>/dev/null)"; then
        say "NODES=$NODES needs a SLURM built with multiple-slurmd support (this one is not)" >&2
        exit 1
    fi
    local name
    for name in $(node_names); do
        slurmd -N "$name"
    done
    for _ in $(seq 60); do
        answers && [ "$(node_count)" = "$NODES" ] && break
        sleep 0.5
    done
    if ! answers; then
        scontrol update nodename="$(node_names | paste -sd,)" state=resume 2>/dev/null || true
        sleep 2
    fi
    answers || { say "the cluster does not answer; see $DIR/log/" >&2; exit 1; }
    say "$NODES-node cluster up: $(sinfo -h -o '%P %D node(s) %c CPUs each %T' | head -1) (conf $DIR/slurm.conf)"
}

case "${1:-start}" in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
