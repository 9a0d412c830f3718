#!/usr/bin/env bash
# Build kubelora's container images with a local Docker engine (scripts/docker-engine.sh start).
#
#   bash scripts/build-images.sh [--tag T] [--base-image IMG] [--offline] [--with-demo-model] [--only LIST]
#
#   --tag T            image tag (default: appVersion of charts/kubelora/Chart.yaml)
#   --base-image IMG   Debian 12 + python3 base for operator and trainer-cpu (env BASE_IMAGE)
#   --offline          never pull: make the base with debootstrap (needs root) and serve torch's CPU wheel
#                      from a local PEP 503 index on 127.0.0.1 (what happens anyway when the upstream
#                      base python:3.11-slim-bookworm cannot be pulled)
#   --with-demo-model  trainer-cpu with the bundled SmolLM2-135M (INCLUDE_DEMO_MODEL=1); the real-node
#                      end-to-end test (scripts/e2e-real-node.sh) uses it
#   --only LIST        comma list of operator,trainer-cpu,pause,trainer-xpu (default: all)
# An image whose inputs (Dockerfile, sources, constraints, build args, base image id) did not change is
# not rebuilt: each carries the label dev.kubelora.inputs=<sha256 of its inputs>.
set -euo pipefail
cd "$(dirname "$0")/.."

TAG="$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' charts/kubelora/Chart.yaml)"
BASE_IMAGE="${BASE_IMAGE:-}"
OFFLINE=0
DEMO=0
ONLY="operator,trainer-cpu,pause,trainer-xpu"
UPSTREAM_BASE=python:3.11-slim-bookworm
XPU_BASE=ubuntu:24.04
TORCH_VERSION="$(sed -n 's/^ARG TORCH_VERSION=//p' docker/trainer-cpu.Dockerfile)"
CACHE="${KUBELORA_IMAGE_CACHE:-$HOME/.cache/kubelora/images}"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
while [ $# -gt 0 ]; do
  case "$1" in
    --tag) TAG="$2"; shift 2 ;;
    --base-image) BASE_IMAGE="$2"; shift 2 ;;
    --offline) OFFLINE=1; shift ;;
    --with-demo-model) DEMO=1; shift ;;
    --only) ONLY="$2"; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "build-images: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
say() { echo "build-images: $*" >&2; }
die() { say "$*"; exit 2; }
wants() { case ",$ONLY," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

DOCKER="$(command -v /usr/bin/docker || command -v docker || true)"
[ -n "$DOCKER" ] && "$DOCKER" info >/dev/null 2>&1 \
  || die "no Docker engine answers; start one: sudo bash scripts/docker-engine.sh start"
export DOCKER_BUILDKIT=1
mkdir -p "$CACHE/logs"
BUILT=()

have_image() { "$DOCKER" image inspect "$1" >/dev/null 2>&1; }
pullable() { [ "$OFFLINE" = 0 ] && timeout 120 "$DOCKER" pull -q "$1" >/dev/null 2>&1; }

# The offline base: debootstrap bookworm (minbase) with python3 + venv + CA certificates, the host's
# locally installed CA certificates added (outbound HTTPS may be re-signed by a local CA), cached under
# a tag named by the hash of this recipe.
local_base() {
  local hash tag rootfs
  hash="$( { declare -f local_base; echo "$DEBIAN_MIRROR"; cat /usr/local/share/ca-certificates/* 2>/dev/null || true; } | sha256sum | cut -c1-12)"
  tag="kubelora/base-bookworm:$hash"
  if have_image "$tag"; then echo "$tag"; return; fi
  [ "$(id -u)" = 0 ] || die "making the offline base image needs root (debootstrap); or pass --base-image"
  command -v debootstrap >/dev/null || die "debootstrap missing: sudo bash scripts/docker-engine.sh start installs it"
  rootfs="$CACHE/rootfs-$hash"
  rm -rf "$rootfs"
  say "making base image $tag with debootstrap (a few minutes, once)"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" "$DEBIAN_MIRROR" \
    >"$CACHE/logs/debootstrap.log" 2>&1 || { tail -n 20 "$CACHE/logs/debootstrap.log" >&2; die "debootstrap failed"; }
  printf 'deb %s bookworm main\ndeb %s bookworm-updates main\ndeb %s-security bookworm-security main\n' \
    "$DEBIAN_MIRROR" "$DEBIAN_MIRROR" "$DEBIAN_MIRROR" > "$rootfs/etc/apt/sources.list"
  cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/" 2>/dev/null || true
  chroot "$rootfs" update-ca-certificates >/dev/null
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb
  tar -C "$rootfs" -c . | "$DOCKER" import -c 'CMD ["/bin/bash"]' \
    -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' - "$tag" >/dev/null
  rm -rf "$rootfs"
  echo "$tag"
}

# torch's CPU wheel as a PEP 503 index on 127.0.0.1 (pip download of torch here gives the CPU build).
TORCH_SERVER_PID=""
trap '[ -z "$TORCH_SERVER_PID" ] || kill "$TORCH_SERVER_PID" 2>/dev/null || true' EXIT
local_torch_index() {
  local dir="$CACHE/torch-index" wheel port
  mkdir -p "$dir/wheels" "$dir/simple/torch"
  wheel="$(ls "$dir/wheels"/torch-"$TORCH_VERSION"+cpu-*.whl 2>/dev/null | head -n1 || true)"
  if [ -z "$wheel" ]; then
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 -d "$dir/wheels" "torch==$TORCH_VERSION" >&2
    wheel="$(ls "$dir/wheels"/torch-"$TORCH_VERSION"+cpu-*.whl 2>/dev/null | head -n1 || true)"
    [ -n "$wheel" ] || die "pip download torch==$TORCH_VERSION gave no CPU build; set TORCH_INDEX_URL to an index that has one"
  fi
  wheel="$(basename "$wheel")"
  echo "<a href=\"../../wheels/$wheel#sha256=$(sha256sum "$dir/wheels/$wheel" | cut -d' ' -f1)\">$wheel</a>" > "$dir/simple/torch/index.html"
  # A fixed port where free, so the URL (a build argument) and with it Docker's layer cache stay the same.
  port="$(python3 -c 'import socket, sys
s = socket.socket()
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])' "${KUBELORA_TORCH_INDEX_PORT:-18765}")"
  python3 -m http.server --bind 127.0.0.1 --directory "$dir" "$port" >/dev/null 2>&1 &
  TORCH_SERVER_PID=$!
  echo "http://127.0.0.1:$port/simple"
}

inputs_hash() {  # Dockerfile + its .dockerignore + sources + constraints + build args
  { cat "docker/$1.Dockerfile" "docker/$1.Dockerfile.dockerignore" docker/constraints.txt pyproject.toml README.md
    find operator trainer -type f ! -path '*/__pycache__/*' ! -name '*.pyc' -print0 | sort -z | xargs -0 sha256sum
    shift; echo "$@"; } | sha256sum | cut -c1-16
}

build() {  # build NAME ARGS...: kubelora/NAME:$TAG unless its inputs are unchanged
  local name="$1" hash tag="kubelora/$1:$TAG" t0 log="$CACHE/logs/$1.log"; shift
  # The torch index URL is left out: the same torch version from another index is no change.
  hash="$(inputs_hash "$name" "${@//TORCH_INDEX_URL=*/}")"
  if [ "$("$DOCKER" image inspect -f '{{index .Config.Labels "dev.kubelora.inputs"}}' "$tag" 2>/dev/null)" = "$hash" ]; then
    say "$tag up to date (inputs $hash)"; BUILT+=("$tag"); return
  fi
  say "building $tag (log: $log)"
  t0=$SECONDS
  "$DOCKER" build --network host --progress plain -f "docker/$name.Dockerfile" -t "$tag" \
    --label "dev.kubelora.inputs=$hash" "$@" . >"$log" 2>&1 || { tail -n 30 "$log" >&2; die "$tag failed; see $log"; }
  say "$tag built in $((SECONDS - t0)) s"
  BUILT+=("$tag")
}

if wants operator || wants trainer-cpu; then
  if [ -z "$BASE_IMAGE" ]; then
    if have_image "$UPSTREAM_BASE" || pullable "$UPSTREAM_BASE"; then BASE_IMAGE="$UPSTREAM_BASE"
    else say "$UPSTREAM_BASE cannot be pulled: using the offline recipe"; OFFLINE=1; BASE_IMAGE="$(local_base)"; fi
  fi
  have_image "$BASE_IMAGE" || die "base image $BASE_IMAGE is not available locally"
  base_id="$("$DOCKER" image inspect -f '{{.Id}}' "$BASE_IMAGE")"
  pip_args=()
  [ -z "${PIP_INDEX_URL:-}" ] || pip_args=(--build-arg "PIP_INDEX_URL=$PIP_INDEX_URL")
  wants operator && build operator --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "BASE_ID=$base_id" "${pip_args[@]}"
  if wants trainer-cpu; then
    if [ -z "${TORCH_INDEX_URL:-}" ] && { [ "$OFFLINE" = 1 ] || ! timeout 20 python3 -c 'import urllib.request; urllib.request.urlopen("https://download.pytorch.org/whl/cpu/torch/")' 2>/dev/null; }; then
      TORCH_INDEX_URL="$(local_torch_index)"
    fi
    torch_args=()
    [ -z "${TORCH_INDEX_URL:-}" ] || torch_args=(--build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL")
    build trainer-cpu --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "BASE_ID=$base_id" \
      --build-arg "INCLUDE_DEMO_MODEL=$DEMO" "${pip_args[@]}" "${torch_args[@]}"
  fi
fi

if wants pause; then
  tag=kubelora/pause:3.2
  hash="$(cat docker/pause/pause.c docker/pause/Dockerfile | sha256sum | cut -c1-16)"
  if [ "$("$DOCKER" image inspect -f '{{index .Config.Labels "dev.kubelora.inputs"}}' "$tag" 2>/dev/null)" != "$hash" ]; then
    command -v gcc >/dev/null || die "gcc missing (apt-get install gcc libc6-dev) for the pause image"
    ctx="$(mktemp -d)"
    gcc -Os -static -s -o "$ctx/pause" docker/pause/pause.c
    "$DOCKER" build -q -f docker/pause/Dockerfile --label "dev.kubelora.inputs=$hash" -t "$tag" "$ctx" >/dev/null
    rm -rf "$ctx"
    say "$tag built"
  fi
  BUILT+=("$tag")
fi

if wants trainer-xpu; then
  if have_image "$XPU_BASE" || pullable "$XPU_BASE"; then
    build trainer-xpu
  else
    say "trainer-xpu skipped: its base $XPU_BASE (and Intel's graphics PPA) cannot be reached from here; build it where they can"
  fi
fi

for t in "${BUILT[@]}"; do
  echo "$t $("$DOCKER" image inspect -f '{{.Size}}' "$t" | awk '{printf "%.0f MB", $1/1e6}')"
done
