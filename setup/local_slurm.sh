#!/usr/bin/env bash
# A single-node SLURM cluster on localhost, for trying lingua.stool and for its test.
#
#   bash setup/local_slurm.sh start     # installs slurm-wlm and munge when missing (apt, root), starts the daemons
#   bash setup/local_slurm.sh status
#   bash setup/local_slurm.sh stop
#
# State, logs, the generated slurm.conf and this cluster's own munged (socket, key, pid file) live
# in $LINGUA_SLURM_DIR (default /tmp/lingua-slurm); slurmctld and slurmd listen on
# $LINGUA_SLURM_CTLD_PORT and $LINGUA_SLURM_SLURMD_PORT (default 6817 and 6818). Two clusters on one
# machine need two folders and two pairs of ports. `stop` stops the three daemons it started.
# There is no accounting database: a small `sacct` stand-in that reads `scontrol show job` is put
# first on PATH by `source "$LINGUA_SLURM_DIR/env.sh"`, so submitit sees real job states.
set -euo pipefail

dir=${LINGUA_SLURM_DIR:-/tmp/lingua-slurm}
ctld_port=${LINGUA_SLURM_CTLD_PORT:-6817}
slurmd_port=${LINGUA_SLURM_SLURMD_PORT:-6818}
conf="$dir/slurm.conf"
munge_dir="$dir/munge"

install_if_missing() {
  command -v slurmctld >/dev/null && command -v munged >/dev/null && return 0
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "[local_slurm] slurm-wlm and munge are missing and cannot be installed here (needs root and apt-get)" >&2
    exit 3
  fi
  echo "[local_slurm] installing slurm-wlm and munge"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

write_config() {
  mkdir -p "$dir/state" "$dir/spool" "$dir/log" "$dir/bin"
  local cpus mem_mb user
  cpus=$(nproc)
  mem_mb=$(( $(awk '/MemAvailable/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
  user=$(id -un)
  cat > "$conf" <<CONF
ClusterName=lingua-local
SlurmctldHost=localhost
SlurmUser=$user
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$munge_dir/munge.socket
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
MpiDefault=none
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
KillWait=30
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=local Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
  # sacct stand-in: "JobID|State|NodeList" rows (--parsable2 layout) for the requested job ids.
  cat > "$dir/bin/sacct" <<'SACCT'
#!/usr/bin/env bash
jobs=""
while [ $# -gt 0 ]; do
  case "$1" in
    -j) jobs="$jobs,$2"; shift 2 ;;
    -j*) jobs="$jobs,${1#-j}"; shift ;;
    *) shift ;;
  esac
done
echo "JobID|State|NodeList"
for job in ${jobs//,/ }; do
  state=$(scontrol show job "$job" 2>/dev/null | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p' | head -n 1)
  echo "$job|${state:-COMPLETED}|localhost"
done
SACCT
  chmod +x "$dir/bin/sacct"
  printf 'export SLURM_CONF=%q\nexport PATH=%q:$PATH\n' "$conf" "$dir/bin" > "$dir/env.sh"
}

check_ports_free() {
  local port
  for port in "$ctld_port" "$slurmd_port"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "[local_slurm] port $port is in use (another cluster?): set LINGUA_SLURM_CTLD_PORT and LINGUA_SLURM_SLURMD_PORT to free ports" >&2
      exit 1
    fi
  done
}

start_munge() {
  # A munged of this cluster's own (socket, key, pid file in $munge_dir), so that stopping this
  # cluster stops it and never a munged that something else uses.
  mkdir -p "$munge_dir"
  if [ ! -s "$munge_dir/munge.key" ]; then
    dd if=/dev/urandom bs=1 count=1024 of="$munge_dir/munge.key" status=none
  fi
  chown -R munge:munge "$munge_dir"
  chmod 755 "$munge_dir"
  chmod 400 "$munge_dir/munge.key"
  su -s /bin/sh munge -c "/usr/sbin/munged --force --socket=$munge_dir/munge.socket --key-file=$munge_dir/munge.key \
    --pid-file=$munge_dir/munged.pid --log-file=$munge_dir/munged.log --seed-file=$munge_dir/munged.seed" >/dev/null
  for _ in $(seq 1 50); do [ -S "$munge_dir/munge.socket" ] && return 0; sleep 0.1; done
  echo "[local_slurm] munged did not start (the munge user must be able to reach $dir); see $munge_dir/munged.log" >&2
  exit 1
}

wait_idle() {
  for _ in $(seq 1 60); do
    if SLURM_CONF="$conf" sinfo -h -o "%t" 2>/dev/null | grep -q "idle\|mix\|alloc"; then
      return 0
    fi
    sleep 0.5
  done
  echo "[local_slurm] the node did not become idle; see $dir/log" >&2
  exit 1
}

stop_daemons() {
  local pidfile pid
  for pidfile in "$dir/slurmd.pid" "$dir/slurmctld.pid" "$munge_dir/munged.pid"; do
    if [ -f "$pidfile" ]; then
      pid=$(cat "$pidfile")
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      rm -f "$pidfile"
    fi
  done
}

case "${1:-}" in
  start)
    install_if_missing
    stop_daemons
    check_ports_free
    write_config
    start_munge
    slurmctld -f "$conf" -c
    slurmd -f "$conf" -N localhost
    wait_idle
    echo "[local_slurm] running: source $dir/env.sh to use it"
    ;;
  stop)
    stop_daemons
    echo "[local_slurm] stopped slurmd, slurmctld and munged of $dir"
    ;;
  status)
    SLURM_CONF="$conf" sinfo
    ;;
  *)
    echo "usage: $0 start|stop|status" >&2
    exit 2
    ;;
esac
