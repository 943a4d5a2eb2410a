#!/usr/bin/env bash
# A single-node SLURM cluster on localhost, for trying lingua.stool and for its test.
#
#   bash setup/local_slurm.sh start     # installs slurm-wlm and munge when missing (apt, root), starts the daemons
#   bash setup/local_slurm.sh status
#   bash setup/local_slurm.sh stop
#
# State, logs and the generated slurm.conf live in $LINGUA_SLURM_DIR (default /tmp/lingua-slurm).
# There is no accounting database: a small `sacct` stand-in that reads `scontrol show job` is put
# first on PATH by `source "$LINGUA_SLURM_DIR/env.sh"`, so submitit sees real job states.
set -euo pipefail

dir=${LINGUA_SLURM_DIR:-/tmp/lingua-slurm}
conf="$dir/slurm.conf"

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
SlurmctldPort=6817
SlurmdPort=6818
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

start_munge() {
  if pgrep -x munged >/dev/null; then return 0; fi
  mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
  if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
  fi
  chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
  chmod 400 /etc/munge/munge.key
  chmod 755 /run/munge
  su -s /bin/sh munge -c "/usr/sbin/munged --force" >/dev/null
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
  for pidfile in "$dir/slurmd.pid" "$dir/slurmctld.pid"; do
    if [ -f "$pidfile" ]; then
      kill "$(cat "$pidfile")" 2>/dev/null || true
      rm -f "$pidfile"
    fi
  done
}

case "${1:-}" in
  start)
    install_if_missing
    stop_daemons
    write_config
    start_munge
    slurmctld -f "$conf" -c
    slurmd -f "$conf" -N localhost
    wait_idle
    echo "[local_slurm] running: source $dir/env.sh to use it"
    ;;
  stop)
    stop_daemons
    echo "[local_slurm] stopped"
    ;;
  status)
    SLURM_CONF="$conf" sinfo
    ;;
  *)
    echo "usage: $0 start|stop|status" >&2
    exit 2
    ;;
esac
