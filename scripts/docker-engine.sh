#!/usr/bin/env bash
# Start, stop or inspect a Docker engine for kubelora's image builds and its real-node tests.
#
#   sudo bash scripts/docker-engine.sh start    # install if missing, start dockerd, wait for `docker info`
#   sudo bash scripts/docker-engine.sh status   # running or not, data root, default runtime
#   sudo bash scripts/docker-engine.sh stop     # stop the dockerd this script started
#
# What `start` does to the machine (it says so before acting, and needs root):
#   - apt-get installs Debian's docker.io, debootstrap, containernetworking-plugins, dnsmasq-base and
#     conntrack when they are missing (a container engine, the base-image tool, CNI plugins, DNS);
#   - starts dockerd by hand (no systemd), which adds iptables rules and chains (DOCKER, DOCKER-USER,
#     NAT for docker0) and sets the FORWARD policy to DROP.
# Settings:
#   - data root ${KUBELORA_DOCKER_ROOT:-$HOME/.cache/kubelora/docker}/data, so built images survive
#     between runs; its log goes to .../dockerd.log; the socket is the default /var/run/docker.sock;
#   - cgroupfs cgroup driver (`--exec-opt native.cgroupdriver=cgroupfs`), as kubelet's dockershim expects;
#   - default runtime `kubelora-runc`: a wrapper around runc that rewrites a negative "oomScoreAdj" in
#     the bundle's config.json to 0. Some VMs (these included) deny a negative oom_score_adj even to root,
#     and runc then fails with "can't get final child's PID from pipe: EOF"; kubelet asks -998 for every
#     pod sandbox. A score of 0 only means the kernel's OOM killer treats those processes like any other.
set -euo pipefail

ROOT="${KUBELORA_DOCKER_ROOT:-$HOME/.cache/kubelora/docker}"
DATA="$ROOT/data"
LOG="$ROOT/dockerd.log"
WRAPPER="$ROOT/kubelora-runc"
RUNTIME=kubelora-runc
PIDFILE=/var/run/docker.pid
PACKAGES=(docker.io debootstrap containernetworking-plugins dnsmasq-base conntrack)
# Debian's client (same version as the daemon, with its built-in BuildKit) before any other on PATH.
DOCKER="$(command -v /usr/bin/docker || command -v docker || true)"

say() { echo "docker-engine: $*" >&2; }
die() { say "$*"; exit 2; }

need_root() {
  [ "$(id -u)" = 0 ] || die "must run as root (it installs packages, starts dockerd and changes iptables)"
}

engine_up() { [ -n "$DOCKER" ] && "$DOCKER" info >/dev/null 2>&1; }

missing_packages() {
  local p
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"
  done
}

install_packages() {
  local missing
  mapfile -t missing < <(missing_packages)
  [ "${#missing[@]}" -eq 0 ] && return 0
  say "installing ${missing[*]} with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  # Another apt run on the machine holds the dpkg lock: wait for it rather than fail.
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  DOCKER="$(command -v /usr/bin/docker || command -v docker)"
}

write_wrapper() {
  local runc
  runc="$(command -v runc || true)"
  [ -n "$runc" ] || runc=/usr/sbin/runc
  [ -x "$runc" ] || die "runc not found (the docker.io package should have installed it)"
  mkdir -p "$ROOT"
  # Rewritten on every start, so a change here reaches the next engine without a manual step.
  cat > "$WRAPPER.tmp" <<EOF
#!/bin/sh
# Written by scripts/docker-engine.sh: negative oomScoreAdj -> 0 in the OCI bundle, then the real runc.
bundle=""
prev=""
for a in "\$@"; do
  case "\$prev" in --bundle|-b) bundle="\$a" ;; esac
  case "\$a" in --bundle=*) bundle="\${a#--bundle=}" ;; esac
  prev="\$a"
done
if [ -n "\$bundle" ] && [ -f "\$bundle/config.json" ]; then
  sed -i -E 's/"oomScoreAdj"([[:space:]]*):([[:space:]]*)-[0-9]+/"oomScoreAdj"\1:\20/' "\$bundle/config.json"
fi
exec $runc "\$@"
EOF
  chmod 0755 "$WRAPPER.tmp"
  mv -f "$WRAPPER.tmp" "$WRAPPER"
}

start() {
  need_root
  say "this starts a container engine (Debian's docker.io, installed with apt-get if missing) and changes"
  say "iptables (dockerd adds its chains and sets the FORWARD policy to DROP); data root $DATA"
  if engine_up; then
    if "$DOCKER" info --format '{{.DefaultRuntime}}' 2>/dev/null | grep -qx "$RUNTIME"; then
      say "already running (default runtime $RUNTIME)"
      return 0
    fi
    die "a Docker engine without the $RUNTIME runtime is already running; stop it first (pods' negative oom_score_adj would fail)"
  fi
  install_packages
  write_wrapper
  mkdir -p "$DATA"
  # A pidfile left by a killed dockerd makes the next one refuse to start.
  if [ -f "$PIDFILE" ] && ! kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then rm -f "$PIDFILE"; fi
  say "starting dockerd (log: $LOG)"
  # setsid: dockerd outlives the shell that started it and gets none of its signals.
  setsid dockerd \
    --data-root "$DATA" \
    --pidfile "$PIDFILE" \
    --exec-opt native.cgroupdriver=cgroupfs \
    --add-runtime "$RUNTIME=$WRAPPER" \
    --default-runtime "$RUNTIME" \
    --storage-driver overlay2 \
    >>"$LOG" 2>&1 < /dev/null &
  local pid=$! i
  for i in $(seq 1 120); do
    if engine_up; then
      say "running: pid $pid, $("$DOCKER" version --format 'Docker {{.Server.Version}}' 2>/dev/null)"
      return 0
    fi
    kill -0 "$pid" 2>/dev/null || { tail -n 20 "$LOG" >&2; die "dockerd exited; see $LOG"; }
    sleep 0.5
  done
  tail -n 20 "$LOG" >&2
  die "dockerd did not answer within 60 s; see $LOG"
}

stop() {
  need_root
  if [ ! -f "$PIDFILE" ] || ! kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
    say "not running"
    return 0
  fi
  local pid i
  pid="$(cat "$PIDFILE")"
  say "stopping dockerd (pid $pid); running containers stop with it"
  kill -TERM "$pid"
  for i in $(seq 1 60); do
    kill -0 "$pid" 2>/dev/null || { say "stopped"; return 0; }
    sleep 0.5
  done
  die "dockerd (pid $pid) still running after 30 s"
}

status() {
  if engine_up; then
    echo "running: $("$DOCKER" info --format 'Docker {{.ServerVersion}}, data root {{.DockerRootDir}}, cgroup driver {{.CgroupDriver}}, default runtime {{.DefaultRuntime}}')"
  else
    echo "not running"
    return 1
  fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
