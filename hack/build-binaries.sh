#!/usr/bin/env bash
# Build the control-plane binaries (etcd, kube-apiserver, kubectl, helm) from the Go module proxy
# into a cache keyed by version, the way envtest ships them, because the build machines have no
# Docker engine and cannot download release tarballs.
#
#   hack/build-binaries.sh            build what is missing, print the bin dir
#   hack/build-binaries.sh --node     also the node set: kubelet, kube-controller-manager,
#                                     kube-scheduler, kube-proxy and the pause program (NODE=1 too)
#   TESTBIN_DIR=/some/dir hack/...    use another cache (CI points this outside the clone)
#
# A warm cache is detected per binary (it exists and reports the pinned version), so a second run
# takes seconds. Progress is printed while the Go builds run: a cold build is minutes of work.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
# shellcheck source=versions.env
source "$here/versions.env"

NODE=${NODE:-0}
for arg in "$@"; do
  case $arg in
    --node) NODE=1 ;;
    *) echo "usage: $0 [--node]" >&2; exit 2 ;;
  esac
done

TESTBIN_DIR=${TESTBIN_DIR:-$repo/.testbin}
mkdir -p "$TESTBIN_DIR"
build_root="$TESTBIN_DIR/.build"
export CGO_ENABLED=0
export GOFLAGS=${GOFLAGS:--mod=mod}

start_all=$(date +%s)
log() { printf '[build-binaries %4ss] %s\n' "$(( $(date +%s) - start_all ))" "$*" >&2; }

# Run a long command, printing a heartbeat every 30 s so CI logs show it is alive.
with_progress() {
  local what=$1; shift
  local t0; t0=$(date +%s)
  "$@" &
  local pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    for _ in $(seq 1 30); do
      sleep 1
      kill -0 "$pid" 2>/dev/null || break
    done
    if kill -0 "$pid" 2>/dev/null; then
      log "  ... still $what ($(( $(date +%s) - t0 ))s)"
    fi
  done
  wait "$pid"
  log "  $what took $(( $(date +%s) - t0 ))s"
}

bin_dir() { echo "$TESTBIN_DIR/$1-$2"; }

# reports VERSION-STRING COMMAND...: the command runs and its output names the version.
# The output is captured before matching: with pipefail, `cmd | grep -q` fails whenever grep
# exits early and cmd dies of SIGPIPE, which made a warm cache look cold now and then.
reports() {
  local want=$1; shift
  local out
  out=$("$@" 2>/dev/null) || return 1
  [[ $out == *"$want"* ]]
}

check_toolchain() {
  command -v go >/dev/null || { echo "go is not installed: the control-plane build needs Go >= 1.26" >&2; exit 1; }
  log "toolchain: $(go version), GOPROXY=$(go env GOPROXY)"
}

# The -ldflags that stamp the real version the way hack/lib/version.sh does, in both version
# packages, so `kubectl version`, the kubelet's node status and helm's kubeVersion checks see
# v$v instead of v0.0.0-master.
kubernetes_ldflags() {
  local v=$1
  local minor=${v#*.}; minor=${minor%%.*}
  local info commit date
  info=$(go mod download -json "k8s.io/kubernetes@v$v" | sed -n 's/.*"Info": "\(.*\)".*/\1/p')
  commit=$(sed -n 's/.*"Hash":"\([0-9a-f]*\)".*/\1/p' "$info")
  date=$(sed -n 's/.*"Time":"\([^"]*\)".*/\1/p' "$info")
  local ld="-s -w"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X $pkg.gitVersion=v$v -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ld+=" -X $pkg.gitCommit=${commit:-unknown} -X $pkg.gitTreeState=clean"
    ld+=" -X $pkg.buildDate=${date:-1970-01-01T00:00:00Z}"
  done
  echo "$ld"
}

# In the current (empty) directory, make a wrapper module that can build k8s.io/kubernetes
# commands: VERSION CMD... (control-plane.md section 2 explains why a plain go install fails).
kubernetes_wrapper_module() {
  local v=$1; shift
  go mod init captchatask.dev/testbin/kubernetes >/dev/null 2>&1
  # Derive the staging replace list from k8s.io/kubernetes's own go.mod: each
  # `k8s.io/<m> => ./staging/src/k8s.io/<m>` becomes `k8s.io/<m> => k8s.io/<m> v0.<minor>.<patch>`.
  local gomod
  gomod=$(go mod download -json "k8s.io/kubernetes@v$v" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
  local staging
  staging=$(sed -n 's#^[[:space:]]*\(k8s.io/[^[:space:]]*\)[[:space:]]*=>[[:space:]]*\./staging/src/.*#\1#p' "$gomod")
  local n=0
  for m in $staging; do
    go mod edit -replace "$m=$m@v0.${v#*.}"
    n=$((n + 1))
  done
  log "  derived $n staging replaces from k8s.io/kubernetes@v$v go.mod"
  [ "$n" -gt 0 ] || { echo "no staging replaces found in $gomod" >&2; exit 1; }
  local targets=("k8s.io/kubernetes@v$v")
  for cmd in "$@"; do targets+=("k8s.io/kubernetes/cmd/$cmd@v$v"); done
  with_progress "resolving modules" go get "${targets[@]}"
}

build_kubernetes() {
  local v=$KUBERNETES_VERSION
  local out; out=$(bin_dir kubernetes "$v")
  if reports "v$v" "$out/kube-apiserver" --version \
     && reports "v$v" "$out/kubectl" version --client; then
    log "kube-apiserver and kubectl v$v: cached in $out"
    return
  fi
  log "kube-apiserver and kubectl v$v: building (cold: several minutes)"
  local wd="$build_root/kubernetes-$v"
  rm -rf "$wd"; mkdir -p "$wd" "$out"
  (
    cd "$wd"
    kubernetes_wrapper_module "$v" kube-apiserver kubectl
    # Stamp the real version the way hack/lib/version.sh does, in both version packages, so
    # `kubectl version` and helm's kubeVersion checks see v$v instead of v0.0.0-master.
    local ld; ld=$(kubernetes_ldflags "$v")
    with_progress "building kube-apiserver" go build -trimpath -ldflags "$ld" \
      -o "$out/kube-apiserver.tmp" k8s.io/kubernetes/cmd/kube-apiserver
    with_progress "building kubectl" go build -trimpath -ldflags "$ld" \
      -o "$out/kubectl.tmp" k8s.io/kubernetes/cmd/kubectl
  )
  mv "$out/kube-apiserver.tmp" "$out/kube-apiserver"
  mv "$out/kubectl.tmp" "$out/kubectl"
  "$out/kube-apiserver" --version >&2
}

build_etcd() {
  local v=$ETCD_VERSION
  local out; out=$(bin_dir etcd "$v")
  if reports "etcd Version: $v" "$out/etcd" --version; then
    log "etcd v$v: cached in $out"
    return
  fi
  log "etcd v$v: building"
  local wd="$build_root/etcd-$v"
  rm -rf "$wd"; mkdir -p "$wd" "$out"
  (
    cd "$wd"
    go mod init captchatask.dev/testbin/etcd >/dev/null 2>&1
    with_progress "resolving modules" go get "go.etcd.io/etcd/server/v3@v$v"
    with_progress "building etcd" go build -trimpath -ldflags "-s -w" -o "$out/etcd.tmp" \
      go.etcd.io/etcd/server/v3
  )
  mv "$out/etcd.tmp" "$out/etcd"
}

build_helm() {
  local v=$HELM_VERSION
  local out; out=$(bin_dir helm "$v")
  if reports "v$v" "$out/helm" version --short; then
    log "helm v$v: cached in $out"
    return
  fi
  log "helm v$v: building"
  mkdir -p "$out"
  local major=${v%%.*}
  with_progress "building helm" env GOBIN="$out" go install -trimpath \
    -ldflags "-s -w -X helm.sh/helm/v$major/internal/version.version=v$v -X helm.sh/helm/v$major/internal/version.gitTreeState=clean" \
    "helm.sh/helm/v$major/cmd/helm@v$v"
}

# The node set, built only on request (`--node`): `make demo` and `make test` need none of it.
NODE_COMMANDS=(kubelet kube-controller-manager kube-scheduler kube-proxy)

build_node() {
  local v=$KUBERNETES_VERSION
  local out; out=$(bin_dir kubernetes "$v")
  local todo=()
  for cmd in "${NODE_COMMANDS[@]}"; do
    if reports "v$v" "$out/$cmd" --version; then
      log "$cmd v$v: cached in $out"
    else
      todo+=("$cmd")
    fi
  done
  if [ ${#todo[@]} -gt 0 ]; then
    # They share most packages with kube-apiserver (built just before, so in Go's build cache):
    # the kubelet took 75 s on 2 cores with a warm cache; each further one adds less.
    log "node binaries v$v: building ${todo[*]} (estimate: 1-2 min each on 2 cores with" \
        "kube-apiserver already built, 10+ min in total from a cold Go cache)"
    local wd="$build_root/kubernetes-node-$v"
    rm -rf "$wd"; mkdir -p "$wd" "$out"
    (
      cd "$wd"
      kubernetes_wrapper_module "$v" "${todo[@]}"
      local ld; ld=$(kubernetes_ldflags "$v")
      for cmd in "${todo[@]}"; do
        with_progress "building $cmd" go build -trimpath -ldflags "$ld" \
          -o "$out/$cmd.tmp" "k8s.io/kubernetes/cmd/$cmd"
      done
    )
    for cmd in "${todo[@]}"; do mv "$out/$cmd.tmp" "$out/$cmd"; done
  fi
  # CoreDNS answers pods' DNS (Services by name) the way a real cluster's does.
  local dns_out; dns_out=$(bin_dir coredns "$COREDNS_VERSION")
  if reports "CoreDNS-$COREDNS_VERSION" "$dns_out/coredns" -version; then
    log "coredns v$COREDNS_VERSION: cached in $dns_out"
  else
    log "coredns v$COREDNS_VERSION: building (cold on 2 cores: several minutes, it has many plugins)"
    mkdir -p "$dns_out"
    with_progress "building coredns" env GOBIN="$dns_out" go install -trimpath -ldflags "-s -w" \
      "github.com/coredns/coredns@v$COREDNS_VERSION"
  fi
  # The pod sandbox ("pause") program: no registry to pull one from, so it is built here and
  # packaged as an image by the testbed. Keyed by the hash of its source.
  local src="$here/pause"
  local sum; sum=$(cat "$src/go.mod" "$src/main.go" | sha256sum | cut -c1-12)
  local pause_out; pause_out=$(bin_dir pause "$sum")
  if [ -x "$pause_out/pause" ]; then
    log "pause $sum: cached in $pause_out"
  else
    mkdir -p "$pause_out"
    (cd "$src" && go build -trimpath -ldflags "-s -w" -o "$pause_out/pause.tmp" .)
    mv "$pause_out/pause.tmp" "$pause_out/pause"
    log "pause $sum: built in $pause_out"
  fi
  mkdir -p "$TESTBIN_DIR/bin"
  ln -sf "$pause_out/pause" "$TESTBIN_DIR/bin/pause"
  for cmd in "${NODE_COMMANDS[@]}"; do
    ln -sf "$out/$cmd" "$TESTBIN_DIR/bin/$cmd"
  done
  ln -sf "$dns_out/coredns" "$TESTBIN_DIR/bin/coredns"
}

check_toolchain
build_etcd
build_helm
build_kubernetes
# One stable folder of links, so PATH and the testbed need no version arithmetic.
mkdir -p "$TESTBIN_DIR/bin"
ln -sf "$(bin_dir etcd "$ETCD_VERSION")/etcd" "$TESTBIN_DIR/bin/etcd"
ln -sf "$(bin_dir kubernetes "$KUBERNETES_VERSION")/kube-apiserver" "$TESTBIN_DIR/bin/kube-apiserver"
ln -sf "$(bin_dir kubernetes "$KUBERNETES_VERSION")/kubectl" "$TESTBIN_DIR/bin/kubectl"
ln -sf "$(bin_dir helm "$HELM_VERSION")/helm" "$TESTBIN_DIR/bin/helm"
[ "$NODE" = 1 ] && build_node
log "done: binaries in $TESTBIN_DIR/bin"
echo "$TESTBIN_DIR/bin"
