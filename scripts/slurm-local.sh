#!/usr/bin/env bash
# A throw-away single-node SLURM cluster for tests and laptops (no systemd needed; root).
#
#   scripts/slurm-local.sh install   apt-get the Debian packages (skipped when present)
#   scripts/slurm-local.sh up        start munged, mariadbd, slurmdbd, slurmctld, slurmd (idempotent) and wait
#                                    until the node is idle and `srun true` runs
#   scripts/slurm-local.sh down      cancel all jobs, stop the daemons (by the PIDs this script recorded)
#   scripts/slurm-local.sh status    exit 0 iff the cluster is up and its node can take jobs
#   scripts/slurm-local.sh purge     down, then delete the state directory
#   eval "$(scripts/slurm-local.sh env)"   export SLURM_CONF (and MDH_SLURM_DIR) for sbatch/srun/sacct/submitit
#
# Everything (configs, munge key and socket, MariaDB datadir, Slurm state, logs, PID files) lives under the
# state directory; no file under /etc is written. Clients find the cluster only through SLURM_CONF.
#
# Environment knobs:
#   MDH_SLURM_DIR=/tmp/mdh-slurm     state directory
#   MDH_SLURM_CPUS=$(nproc)          CPUs the node advertises (more than the real cores is allowed)
#   MDH_SLURM_PORT_BASE=6817         slurmctld=BASE, slurmd=BASE+1, slurmdbd=BASE+2, mariadbd=BASE+3
#   MDH_SLURM_TIMEOUT=60             seconds `up` waits for each daemon / the node before it gives up
#
# Notes (details in the project's SLURM reference notes):
# - slurmdbd + MariaDB are always started: without them `sacct` fails and submitit cannot see that a job
#   died without writing its result (job.result() then blocks forever).
# - SlurmctldHost/NodeName come from `hostname -s` and are pinned to 127.0.0.1, so no name resolution is needed.
# - cred_expire=10 and sched_interval=2/bf_interval=2 let a requeued job start again within ~15 s
#   (Slurm's defaults make that ~2 min).
# - Preemption: jobs in the default partition `debug` are requeued when a job of partition `urgent` (higher
#   PriorityTier) needs their CPUs; submitit's signal (USR2) is sent first (preempt_send_user_signal).
# - No cgroups (proctrack/linuxproc, task/none): no CPU/memory enforcement.
set -euo pipefail

D=${MDH_SLURM_DIR:-/tmp/mdh-slurm}
BASE=${MDH_SLURM_PORT_BASE:-6817}
TIMEOUT=${MDH_SLURM_TIMEOUT:-60}
CTLD_PORT=$BASE
SLURMD_PORT=$((BASE + 1))
DBD_PORT=$((BASE + 2))
DB_PORT=$((BASE + 3))
CONF=$D/etc/slurm.conf
DBD_CONF=$D/etc/slurmdbd.conf
MUNGE_SOCK=$D/munge/munge.socket
DB_SOCK=$D/mysql/mysqld.sock
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)
export SLURM_CONF=$CONF

log() { echo "[slurm-local] $*" >&2; }
die() {
  echo "[slurm-local] ERROR: $*" >&2
  exit 1
}

# running PID: the process exists and has not exited (a dead daemon lingers as a zombie until init reaps it)
running() {
  local stat
  stat=$(<"/proc/$1/stat") 2>/dev/null || return 1
  stat=${stat##*) }
  [[ ${stat:0:1} != [ZX] ]]
}

# alive NAME: the PID in $D/run/NAME.pid is running and is NAME (a stale file's PID may belong to another program)
alive() {
  local f=$D/run/$1.pid pid
  [[ -s $f ]] || return 1
  pid=$(<"$f")
  [[ $pid =~ ^[0-9]+$ && -r /proc/$pid/comm ]] || return 1
  [[ $(<"/proc/$pid/comm") == "$1" ]] && running "$pid"
}

# wait_until SECONDS WHAT CMD...: poll CMD until it succeeds
wait_until() {
  local limit=$1 what=$2
  shift 2
  local end=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= end)); then
      log "timed out after ${limit}s waiting for $what"
      return 1
    fi
    sleep 0.2
  done
}

listening() { ss -Hltn "( sport = :$1 )" 2>/dev/null | grep -q .; }

free_port() {  # free_port PORT NAME
  if listening "$1"; then die "port $1 (for $2) is taken by another process; set MDH_SLURM_PORT_BASE"; fi
}

node_name() { hostname -s; }

node_state() { sinfo -h -N -o %T 2>/dev/null | head -n1; }

usable_state() {  # a node that takes (or runs) jobs; a trailing '*' means slurmd is not responding
  case $1 in
    idle | mixed | allocated | completing | planned) return 0 ;;
    *) return 1 ;;
  esac
}

show_logs() {
  local f
  for f in "$D"/log/{slurmctld,slurmd,slurmdbd,mariadbd,munged}.log; do
    [[ -s $f ]] || continue
    echo "---- tail $f" >&2
    tail -n 15 "$f" >&2
  done
}

# ---------------------------------------------------------------------------------------------- install
missing_packages() {
  local p
  for p in "${PACKAGES[@]}"; do
    [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true) == "install ok installed" ]] || echo "$p"
  done
}

cmd_install() {
  local missing
  command -v dpkg-query >/dev/null || die "install: not a Debian/Ubuntu system (no dpkg-query)"
  missing=$(missing_packages | tr '\n' ' ')
  if [[ -z ${missing// /} ]]; then
    log "install: all packages present (${PACKAGES[*]})"
    return 0
  fi
  [[ $(id -u) == 0 ]] || die "install: must run as root (missing: $missing)"
  command -v apt-get >/dev/null || die "install: apt-get not found (missing: $missing)"
  log "install: apt-get install $missing"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq || die "install: apt-get update failed"
  # --no-install-recommends: the recommends pull ~40 more packages (HDF5, ROCm-SMI, IPMI, ...)
  apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null || die "install: apt-get install failed"
  missing=$(missing_packages | tr '\n' ' ')
  [[ -z ${missing// /} ]] || die "install: still missing after apt-get: $missing"
  log "install: done"
}

# ---------------------------------------------------------------------------------------------- configs
# write_if_changed FILE MODE CONTENT: returns 0 when the file was (re)written
write_if_changed() {
  local f=$1 mode=$2 content=$3
  if [[ -f $f && $(<"$f") == "$content" ]]; then return 1; fi
  (umask 077 && printf '%s\n' "$content" >"$f")
  chmod "$mode" "$f"
}

slurm_conf() {
  local host cpus mem
  host=$(node_name)
  cpus=${MDH_SLURM_CPUS:-$(nproc)}
  # RealMemory above what slurmd detects makes the node INVAL ("Low RealMemory"): take slurmd's own number
  mem=$(slurmd -C 2>/dev/null | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
  [[ $mem =~ ^[0-9]+$ ]] || die "could not read RealMemory from 'slurmd -C'"
  cat <<EOF
# Generated by scripts/slurm-local.sh; rewritten on every 'up' (edit the script, not this file).
ClusterName=mdh
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCK,cred_expire=10
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool
SlurmctldPidFile=$D/run/slurmctld.pid
SlurmdPidFile=$D/run/slurmd.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
JobRequeue=1
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
AccountingStoragePass=$MUNGE_SOCK
JobCompType=jobcomp/none
ReturnToService=2
SlurmdParameters=config_overrides
InactiveLimit=0
KillWait=5
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=10
PartitionName=urgent Nodes=$host MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
EOF
}

slurmdbd_conf() {
  cat <<EOF
# Generated by scripts/slurm-local.sh
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCK
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
DebugLevel=info
LogFile=$D/log/slurmdbd.log
PidFile=$D/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
}

# ---------------------------------------------------------------------------------------------- daemons
start_munged() {
  alive munged && return 0
  [[ -s $D/munge/munge.key ]] || mungekey --create --keyfile="$D/munge/munge.key" >/dev/null
  chmod 600 "$D/munge/munge.key"
  rm -f "$MUNGE_SOCK" "$MUNGE_SOCK.lock"
  munged --key-file="$D/munge/munge.key" --socket="$MUNGE_SOCK" --pid-file="$D/run/munged.pid" \
    --log-file="$D/log/munged.log" --seed-file="$D/munge/munged.seed" --num-threads=4 \
    </dev/null >>"$D/log/munged.out" 2>&1 9>&-
  wait_until "$TIMEOUT" munged bash -c "munge -n -S '$MUNGE_SOCK' | unmunge -S '$MUNGE_SOCK'"
}

db() { mariadb --no-defaults -S "$DB_SOCK" -u root "$@"; }

start_mariadbd() {
  alive mariadbd && return 0
  free_port "$DB_PORT" mariadbd
  if [[ ! -d $D/mysql/data/mysql ]]; then
    mariadb-install-db --no-defaults --datadir="$D/mysql/data" --user=root \
      --auth-root-authentication-method=socket --skip-test-db >"$D/log/mariadb-install.log" 2>&1 ||
      die "mariadb-install-db failed; see $D/log/mariadb-install.log"
  fi
  setsid mariadbd --no-defaults --datadir="$D/mysql/data" --user=root --socket="$DB_SOCK" \
    --pid-file="$D/run/mariadbd.pid" --port="$DB_PORT" --bind-address=127.0.0.1 --skip-name-resolve \
    --log-error="$D/log/mariadbd.log" --innodb-buffer-pool-size=128M --innodb-lock-wait-timeout=900 \
    </dev/null >>"$D/log/mariadbd.out" 2>&1 9>&- &
  wait_until "$TIMEOUT" mariadbd db -e 'select 1'
  db -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
         CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
         GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
         GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
}

start_slurmdbd() {
  alive slurmdbd && return 0
  free_port "$DBD_PORT" slurmdbd
  slurmdbd </dev/null >>"$D/log/slurmdbd.out" 2>&1 9>&-  # reads slurmdbd.conf next to $SLURM_CONF; daemonizes
  wait_until "$TIMEOUT" "slurmdbd on port $DBD_PORT" listening "$DBD_PORT"
}

start_slurmctld() {
  alive slurmctld && return 0
  free_port "$CTLD_PORT" slurmctld
  slurmctld -f "$CONF" </dev/null >>"$D/log/slurmctld.out" 2>&1 9>&-
  wait_until "$TIMEOUT" "slurmctld (scontrol ping)" scontrol ping
}

start_slurmd() {
  alive slurmd && return 0
  free_port "$SLURMD_PORT" slurmd
  slurmd -f "$CONF" </dev/null >>"$D/log/slurmd.out" 2>&1 9>&-
}

# stop NAME...: SIGTERM the recorded PIDs, wait up to 15 s each, then SIGKILL
stop() {
  local n pid i
  local -a pids=()
  for n in "$@"; do
    if alive "$n"; then
      pid=$(<"$D/run/$n.pid")
      kill -TERM "$pid" 2>/dev/null && pids+=("$pid")
    fi
  done
  for pid in "${pids[@]}"; do
    for ((i = 0; i < 150; i++)); do
      running "$pid" || break
      sleep 0.1
    done
    if running "$pid"; then
      log "PID $pid ignored SIGTERM; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
  for n in "$@"; do rm -f "$D/run/$n.pid"; done
}

wait_node_usable() {
  local end=$((SECONDS + TIMEOUT)) st resumed=0 host
  host=$(node_name)
  while ((SECONDS < end)); do
    st=$(node_state)
    usable_state "$st" && return 0
    case $st in
      inval*) die "node $host is INVAL ($(sinfo -h -N -o %E)): slurm.conf declares more than slurmd finds" ;;
      drain* | fail*)  # DRAIN is kept in the state directory across restarts: resume once
        if ((!resumed)); then
          log "node $host is $st ($(sinfo -h -N -o %E)); resuming it"
          scontrol update NodeName="$host" State=RESUME || true
          resumed=1
        fi
        ;;
    esac  # unknown / down* / idle*: slurmd has not registered yet (ReturnToService=2 brings it back)
    sleep 0.2
  done
  log "node $host not usable after ${TIMEOUT}s (state '${st:-none}')"
  return 1
}

check_srun() {
  if [[ -n $(squeue -h -t RUNNING,COMPLETING 2>/dev/null) ]]; then
    log "jobs are running; skipping the 'srun true' check"
    return 0
  fi
  timeout "$TIMEOUT" srun --quiet --time=1 true >/dev/null 2>"$D/log/srun-check.err" || {
    log "'srun true' failed or timed out after ${TIMEOUT}s: $(tr '\n' ' ' <"$D/log/srun-check.err")"
    return 1
  }
}

fully_up() {
  local n
  for n in "${DAEMONS[@]}"; do alive "$n" || return 1; done
  scontrol ping >/dev/null 2>&1 && usable_state "$(node_state)"
}

# ---------------------------------------------------------------------------------------------- commands
cmd_up() {
  [[ $(id -u) == 0 ]] || die "up: must run as root (slurmd launches jobs as the submitting user)"
  local b
  for b in munged mungekey munge slurmctld slurmd slurmdbd sinfo srun mariadbd mariadb-install-db ss; do
    command -v "$b" >/dev/null || die "up: '$b' not found; run: scripts/slurm-local.sh install"
  done
  mkdir -p "$D"/{etc,run,log,state,spool,munge,mysql}
  chmod 755 "$D" "$D/munge"  # munged wants a+x on every directory of its socket path
  exec 9>"$D/run/up.lock"  # daemons are started with 9>&- so they do not inherit the lock
  flock -w "$TIMEOUT" 9 || die "up: another 'up' holds $D/run/up.lock"

  local t0=$SECONDS conf_changed=0 dbd_changed=0 started=0 n
  write_if_changed "$CONF" 644 "$(slurm_conf)" && conf_changed=1
  write_if_changed "$DBD_CONF" 600 "$(slurmdbd_conf)" && dbd_changed=1  # slurmdbd refuses a readable config
  if ((!conf_changed && !dbd_changed)) && fully_up; then
    log "up: already running ($(sinfo -h -o '%P:%T' | tr '\n' ' '))"
    return 0
  fi
  if ((dbd_changed)); then stop slurmdbd; fi
  if ((conf_changed)); then stop slurmd slurmctld; fi  # both daemons must read the same slurm.conf
  for n in "${DAEMONS[@]}"; do alive "$n" || started=1; done
  # fail before starting anything when a port we need is taken by someone else
  alive mariadbd || free_port "$DB_PORT" mariadbd
  alive slurmdbd || free_port "$DBD_PORT" slurmdbd
  alive slurmctld || free_port "$CTLD_PORT" slurmctld
  alive slurmd || free_port "$SLURMD_PORT" slurmd

  start_munged || { show_logs; die "up: munged did not start"; }
  start_mariadbd || { show_logs; die "up: mariadbd did not start"; }
  start_slurmdbd || { show_logs; die "up: slurmdbd did not start"; }
  start_slurmctld || { show_logs; die "up: slurmctld did not start"; }
  start_slurmd
  wait_node_usable || {
    sinfo -N -l >&2 || true
    show_logs
    die "up: the node never became idle"
  }
  if ((started || conf_changed)); then
    check_srun || {
      show_logs
      die "up: the cluster runs but cannot run a job"
    }
  fi
  log "up in $((SECONDS - t0))s: $(sinfo -h -o '%P %a %D %T %N' | tr '\n' ';') SLURM_CONF=$CONF"
}

cmd_down() {
  if alive slurmctld && scontrol ping >/dev/null 2>&1; then
    local jobs
    jobs=$(squeue -h -o %A 2>/dev/null | tr '\n' ' ')
    if [[ -n ${jobs// /} ]]; then
      log "down: cancelling jobs $jobs"
      # shellcheck disable=SC2086
      scancel $jobs 2>/dev/null || true
      # shellcheck disable=SC2016  # expanded by the inner bash, on each poll
      wait_until 30 "jobs to end" bash -c '[[ -z $(squeue -h 2>/dev/null) ]]' || true
    fi
  fi
  stop slurmd slurmctld  # slurmctld sends its last job records to slurmdbd on the way out
  stop slurmdbd
  stop mariadbd munged
  log "down"
}

cmd_status() {
  local n ok=0 st
  for n in "${DAEMONS[@]}"; do
    if alive "$n"; then
      echo "$n: running (pid $(<"$D/run/$n.pid"))"
    else
      echo "$n: stopped"
      ok=1
    fi
  done
  if ((ok == 0)); then
    if ! scontrol ping >/dev/null 2>&1; then
      echo "slurmctld: not answering (scontrol ping)"
      ok=1
    else
      st=$(node_state)
      echo "node $(node_name): ${st:-unknown}"
      usable_state "$st" || ok=1
    fi
  fi
  echo "SLURM_CONF=$CONF"
  return $ok
}

cmd_env() {
  printf 'export SLURM_CONF=%q\n' "$CONF"
  printf 'export MDH_SLURM_DIR=%q\n' "$D"
}

case ${1:-} in
  install) cmd_install ;;
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  purge)
    cmd_down
    [[ -n $D && $D != / ]] && rm -rf -- "$D"
    log "purged $D"
    ;;
  env) cmd_env ;;
  *)
    echo "usage: $0 install|up|down|status|purge|env   (state: \$MDH_SLURM_DIR, default /tmp/mdh-slurm)" >&2
    exit 2
    ;;
esac
