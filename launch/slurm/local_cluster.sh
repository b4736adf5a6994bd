#!/bin/bash
# A one-machine SLURM cluster for trying the sbatch scripts (and for `pytest -m slurm`):
# munged + slurmctld + slurmd on this host, every file under STATE_DIR, nothing system-wide.
#
#   launch/slurm/local_cluster.sh start STATE_DIR [CPUS]   # prints `export SLURM_CONF=...`
#   SLURM_CONF=STATE_DIR/slurm.conf sbatch --ntasks 4 launch/slurm/train.sbatch my.yaml
#   launch/slurm/local_cluster.sh stop STATE_DIR            # cancels jobs, stops the daemons, removes STATE_DIR
#
# Needs root and Debian's packages: apt-get install -y slurm-wlm munge. The node declares CPUS CPUs
# (default 8) whatever the machine has (SlurmdParameters=config_overrides), so 4+ tasks fit on 2
# cores. Ports: SLURMCTLD_PORT (default 6817) and the next one for slurmd.
set -euo pipefail

usage() { echo "usage: $0 start|stop STATE_DIR [CPUS]" >&2; exit 2; }
ACTION=${1:-}
DIR=${2:-}
[ -n "$ACTION" ] && [ -n "$DIR" ] || usage

stop_pidfile() {  # stop the daemon whose pid the file holds, and only it
    local file=$1 pid
    [ -s "$file" ] || return 0
    pid=$(cat "$file")
    kill "$pid" 2>/dev/null || return 0
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
}

case "$ACTION" in
start)
    CPUS=${3:-8}
    for tool in munged slurmctld slurmd sbatch; do
        command -v "$tool" >/dev/null || { echo "error: $tool not found; apt-get install -y slurm-wlm munge" >&2; exit 2; }
    done
    [ "$(id -u)" = 0 ] || { echo "error: slurmd must run as root" >&2; exit 2; }
    [ ! -e "$DIR/slurm.conf" ] || { echo "error: $DIR already holds a cluster; stop it first" >&2; exit 2; }
    mkdir -p "$DIR"/{munge,state,spool,log}
    DIR=$(cd "$DIR" && pwd)
    chmod 700 "$DIR/munge"
    dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    chmod 600 "$DIR/munge/munge.key"
    munged --force --key-file "$DIR/munge/munge.key" --socket "$DIR/munge/socket" --pid-file "$DIR/munge/munged.pid" \
        --log-file "$DIR/log/munged.log" --seed-file "$DIR/munge/seed"
    PORT=${SLURMCTLD_PORT:-6817}
    cat > "$DIR/slurm.conf" <<EOF
ClusterName=fusionlocal
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/socket
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=10
MinJobAge=600
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    export SLURM_CONF=$DIR/slurm.conf
    slurmctld -f "$SLURM_CONF"
    slurmd -f "$SLURM_CONF" -N localhost
    for _ in $(seq 100); do
        if sinfo -h -o %T 2>/dev/null | grep -qx idle; then
            echo "export SLURM_CONF=$SLURM_CONF"
            exit 0
        fi
        sleep 0.2
    done
    echo "error: the node did not come up; see $DIR/log" >&2
    tail -n 5 "$DIR"/log/*.log >&2 || true
    exit 1
    ;;
stop)
    [ -e "$DIR/slurm.conf" ] || { echo "error: no cluster in $DIR" >&2; exit 2; }
    DIR=$(cd "$DIR" && pwd)
    export SLURM_CONF=$DIR/slurm.conf
    if [ -s "$DIR/slurmctld.pid" ] && kill -0 "$(cat "$DIR/slurmctld.pid")" 2>/dev/null; then
        scancel --full --quiet --cluster=fusionlocal --user="$(id -un)" 2>/dev/null || true
        # slurmd's job steps outlive slurmd: stop only once every job of this cluster has ended.
        for _ in $(seq 300); do
            [ -z "$(squeue -h -t RUNNING,COMPLETING,PENDING -o %i 2>/dev/null)" ] && break
            sleep 0.2
        done
    fi
    stop_pidfile "$DIR/slurmd.pid"
    stop_pidfile "$DIR/slurmctld.pid"
    stop_pidfile "$DIR/munge/munged.pid"
    rm -rf "$DIR"
    ;;
*) usage ;;
esac
