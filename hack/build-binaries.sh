#!/usr/bin/env bash
# Build the tools the project runs into a cache keyed by version, the way envtest ships them,
# because the build machines have no Docker engine and cannot download release tarballs. Nothing
# here needs root: everything lands under $TESTBIN_DIR.
#
#   hack/build-binaries.sh            the control plane `make demo` needs: etcd, kube-apiserver,
#                                     kubectl (from the Go module proxy)
#   hack/build-binaries.sh --test     also what `make test` needs: helm, promtool and prometheus
#                                     (Go module proxy) and the load generator wrk (the Debian
#                                     package, unpacked into the cache: no root, no system change)
#   hack/build-binaries.sh --node     also the node: kubelet, kube-controller-manager, kube-scheduler,
#                                     kube-proxy, CoreDNS and the pause program (NODE=1 too)
#   TESTBIN_DIR=/some/dir hack/...    use another cache (default: the checkout's .testbin/)
#
# A warm cache is detected per binary (it exists and reports the pinned version), so a second run
# takes seconds. Cold builds print an estimate first and a heartbeat while they run; independent
# builds run side by side so module downloads overlap with compiling. Prints the bin dir.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
# shellcheck source=versions.env
source "$here/versions.env"


TESTBIN_DIR=${TESTBIN_DIR:-$repo/.testbin}
mkdir -p "$TESTBIN_DIR"
build_root="$TESTBIN_DIR/.build"
export CGO_ENABLED=0
export GOFLAGS=${GOFLAGS:--mod=mod}

with_test=0
NODE=${NODE:-0}
for arg in "$@"; do
  case $arg in
    --test) with_test=1 ;;
    --node) NODE=1 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "build-binaries: unknown argument $arg (see --help)" >&2; exit 2 ;;
  esac
done

start_all=$(date +%s)
log() { printf '[build-binaries %4ss] %s\n' "$(( $(date +%s) - start_all ))" "$*" >&2; }

# Run a command with its output kept in a log file, shown only if it fails: `go get` lists every
# module it adds (hundreds of lines for Kubernetes), which buries the progress lines.
quietly() {
  local logfile=$1; shift
  if ! "$@" >"$logfile" 2>&1; then
    cat "$logfile" >&2
    return 1
  fi
}

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

# Like reports, for a tool that exits non-zero after printing its version (wrk --version).
prints() {
  local want=$1; shift
  [ -x "$1" ] || return 1
  local out
  out=$("$@" 2>/dev/null || true)
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
# commands: VERSION CMD... (a plain `go install` fails: its go.mod points the k8s.io staging
# modules at local directories, which a module download does not have).
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
  with_progress "resolving modules" quietly "$PWD/go-get.log" go get "${targets[@]}"
}

build_kubernetes() {
  local v=$KUBERNETES_VERSION
  local out; out=$(bin_dir kubernetes "$v")
  if reports "v$v" "$out/kube-apiserver" --version \
     && reports "v$v" "$out/kubectl" version --client; then
    log "kube-apiserver and kubectl v$v: cached in $out"
    return
  fi
  log "kube-apiserver and kubectl v$v: building (cold on 2 cores: about 5 min; with a warm Go cache: about 1 min)"
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
  log "etcd v$v: building (cold: about 1 min)"
  local wd="$build_root/etcd-$v"
  rm -rf "$wd"; mkdir -p "$wd" "$out"
  (
    cd "$wd"
    go mod init captchatask.dev/testbin/etcd >/dev/null 2>&1
    with_progress "resolving modules" quietly "$PWD/go-get.log" go get "go.etcd.io/etcd/server/v3@v$v"
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
  log "helm v$v: building (cold: about 1.5 min)"
  mkdir -p "$out"
  local major=${v%%.*}
  with_progress "building helm" env GOBIN="$out" go install -trimpath \
    -ldflags "-s -w -X helm.sh/helm/v$major/internal/version.version=v$v -X helm.sh/helm/v$major/internal/version.gitTreeState=clean" \
    "helm.sh/helm/v$major/cmd/helm@v$v"
}

build_prometheus() {
  local v=$PROMETHEUS_VERSION
  local out; out=$(bin_dir prometheus "$v")
  if reports "version $v" "$out/promtool" --version && reports "version $v" "$out/prometheus" --version; then
    log "promtool and prometheus v$v: cached in $out"
    return
  fi
  # Prometheus 3.x is tagged v0.3MM.P as a Go module (v3.16.0 is v0.316.0).
  local minor=${v#*.}; minor=${minor%%.*}
  local patch=${v##*.}
  local module=github.com/prometheus/prometheus
  log "promtool and prometheus v$v: building (cold on 2 cores: about 8 min; warm Go cache: about 1 min)"
  mkdir -p "$out"
  local ld="-s -w -X github.com/prometheus/common/version.Version=$v"
  ld+=" -X github.com/prometheus/common/version.Branch=HEAD"
  with_progress "building promtool and prometheus" env GOBIN="$out" go install -trimpath -ldflags "$ld" \
    "$module/cmd/promtool@v0.3${minor}.${patch}" "$module/cmd/prometheus@v0.3${minor}.${patch}"
}

# wrk is C (epoll, LuaJIT): a Go load generator costs several times more CPU per request and would
# become the bottleneck of the framework-ceiling benchmark it measures. Debian ships it; its .deb
# (and LuaJIT's) are fetched with `apt-get download` and unpacked into the cache, which needs no
# root and changes nothing on the system. A wrapper points the loader at the unpacked LuaJIT.
build_wrk() {
  local v=$WRK_DEBIAN_VERSION
  local out; out=$(bin_dir wrk "$v")
  if prints "wrk debian/$v" "$out/wrk" --version; then
    log "wrk $v: cached in $out"
    return
  fi
  command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null || {
    echo "build-binaries: wrk comes from Debian's package \`wrk\` and this machine has no apt-get;" \
      "install wrk ${v%%-*} with your package manager and put it in $TESTBIN_DIR/bin" >&2
    exit 1
  }
  log "wrk $v: fetching Debian's packages wrk and $LUAJIT_DEBIAN_PACKAGE (seconds)"
  local wd="$build_root/wrk-$v"
  rm -rf "$wd" "$out"; mkdir -p "$wd/root" "$out"
  (
    cd "$wd"
    # _apt cannot write into a root-owned temp dir; the download then runs unsandboxed (harmless).
    fetch() {
      apt-get download -qq "wrk=$v" "$LUAJIT_DEBIAN_PACKAGE" 2>&1 \
        | grep -v '^W: Download is performed unsandboxed' >&2 || true
      ls ./*.deb >/dev/null 2>&1
    }
    # A machine whose package index was never fetched knows no wrk; as root, fetch it once.
    if ! fetch && [ "$(id -u)" = 0 ]; then
      log "wrk $v: the package index does not know it; apt-get update first"
      apt-get -o DPkg::Lock::Timeout=600 update -qq >&2 || true
      fetch || true
    fi
    ls ./*.deb >/dev/null 2>&1 || {
      echo "build-binaries: apt-get download wrk=$v failed (is the package index current? \`apt-get update\` as root)" >&2
      exit 1
    }
    for deb in ./*.deb; do dpkg-deb -x "$deb" root; done
  )
  mkdir -p "$out/lib"
  cp "$wd/root/usr/bin/wrk" "$out/wrk.real"
  cp -P "$wd"/root/usr/lib/x86_64-linux-gnu/libluajit-5.1.so.* "$out/lib/" 2>/dev/null \
    || cp -P "$wd"/root/usr/lib/*/libluajit-5.1.so.* "$out/lib/"
  cat > "$out/wrk" <<'WRAPPER'
#!/bin/sh
# wrk unpacked from Debian's package into the captchatask tool cache; LuaJIT lies beside it.
here=$(dirname "$(readlink -f "$0")")  # the cache's bin/ holds a link to this file
LD_LIBRARY_PATH="$here/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$here/wrk.real" "$@"
WRAPPER
  chmod +x "$out/wrk"
  rm -rf "$wd"
  prints "wrk debian/$v" "$out/wrk" --version || { echo "build-binaries: the unpacked wrk does not run" >&2; exit 1; }
}

# Run the builders side by side (downloads overlap with compiling), each logging with its own
# prefix; fail if any failed, after all have finished so no half-written cache is left behind.
run_all() {
  local pids=() names=() failed=()
  for builder in "$@"; do
    "$builder" &
    pids+=("$!"); names+=("$builder")
  done
  for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || failed+=("${names[$i]#build_}")
  done
  if [ ${#failed[@]} -gt 0 ]; then
    echo "build-binaries: failed: ${failed[*]}" >&2
    exit 1
  fi
}

link() { ln -sf "$1" "$TESTBIN_DIR/bin/$(basename "$1")"; }

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
# The node binaries reuse what kube-apiserver's build put into Go's cache, so they come after it
# in the same builder rather than compiling the same packages side by side.
build_kubernetes_and_node() {
  build_kubernetes
  if [ "$NODE" = 1 ]; then build_node; fi
}
builders=(build_etcd build_kubernetes_and_node)
if [ "$with_test" = 1 ]; then
  builders+=(build_helm build_prometheus build_wrk)
fi
run_all "${builders[@]}"
# One stable folder of links, so PATH and the testbed need no version arithmetic.
mkdir -p "$TESTBIN_DIR/bin"
link "$(bin_dir etcd "$ETCD_VERSION")/etcd"
link "$(bin_dir kubernetes "$KUBERNETES_VERSION")/kube-apiserver"
link "$(bin_dir kubernetes "$KUBERNETES_VERSION")/kubectl"
if [ "$with_test" = 1 ]; then
  link "$(bin_dir helm "$HELM_VERSION")/helm"
  link "$(bin_dir prometheus "$PROMETHEUS_VERSION")/promtool"
  link "$(bin_dir prometheus "$PROMETHEUS_VERSION")/prometheus"
  link "$(bin_dir wrk "$WRK_DEBIAN_VERSION")/wrk"
fi
log "done: binaries in $TESTBIN_DIR/bin"
echo "$TESTBIN_DIR/bin"
