#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for the tests and for trying `environment: slurm`:
# `make slurm-local` (start, idempotent) and `make slurm-local-stop`. Installs Debian's slurm-wlm and munge
# when missing (apt, as root). Its slurm.conf, state and logs live in .slurm/ (git-ignored);
# /etc/slurm/slurm.conf points there, so sbatch, squeue and scancel find it.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="$PWD/.slurm"
HOST="$(hostname -s)"
ETC_CONF=/etc/slurm/slurm.conf

say() { echo "slurm-local: $*"; }

answers() { timeout 5 sinfo -h -o %T 2>/dev/null | grep -qE 'idle|mix|alloc'; }

stop() {
    pkill -x slurmd 2>/dev/null || true
    pkill -x slurmctld 2>/dev/null || true
    say "stopped slurmctld and slurmd (munged keeps running)"
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

write_conf() {
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
    cat >"$DIR/slurm.conf" <<EOF
# Written by scripts/slurm_local.sh: a one-node cluster for tinystories-lab's tests.
ClusterName=tinystories
SlurmctldHost=$HOST
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ReturnToService=2
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
KillWait=5
MinJobAge=60
NodeName=$HOST CPUs=$(nproc) State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
    # Another checkout's one-node cluster (its conf carries the marker line) or a dangling link is
    # taken over; a conf this script did not write is the machine's own SLURM and is left alone.
    if [ -e "$ETC_CONF" ] && [ "$(readlink -f "$ETC_CONF")" != "$DIR/slurm.conf" ] \
        && ! grep -q "^# Written by scripts/slurm_local.sh" "$ETC_CONF"; then
        say "$ETC_CONF exists and is not this project's: this machine has its own SLURM; use that." >&2
        exit 1
    fi
    mkdir -p "$(dirname "$ETC_CONF")"
    ln -sfn "$DIR/slurm.conf" "$ETC_CONF"
}

start() {
    if answers; then
        say "a cluster answers already: $(sinfo -h -o '%P %D node(s) %T' | head -1)"
        return
    fi
    install
    [ "$(id -u)" = 0 ] || { say "starting the daemons needs root" >&2; exit 1; }
    start_munge
    write_conf
    pgrep -x slurmctld >/dev/null || slurmctld
    pgrep -x slurmd >/dev/null || slurmd
    for _ in $(seq 60); do
        answers && break
        sleep 0.5
    done
    if ! answers; then
        scontrol update nodename="$HOST" state=resume 2>/dev/null || true
        sleep 2
    fi
    answers || { say "the cluster does not answer; see $DIR/log/" >&2; exit 1; }
    say "one-node cluster up: $(sinfo -h -o '%P %D node(s) %c CPUs %T' | head -1) (conf $DIR/slurm.conf)"
}

case "${1:-start}" in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
