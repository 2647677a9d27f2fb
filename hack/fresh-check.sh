#!/usr/bin/env bash
# A newcomer's first run, checked: clone the committed tree into a new directory and run the
# README's two commands there (`make demo`, then `make test`) with a PATH that hides every tool the
# project installs itself. A tool that some step only finds because an earlier session or CI put it
# on this machine makes this check fail here, instead of failing the next newcomer.
#
#   hack/fresh-check.sh                 keep Go's module and build caches (tools are re-linked from
#                                       them, the project's own cache starts empty)
#   FRESH_GO_CACHE=1 hack/fresh-check.sh    also start Go's caches empty: a truly cold first run
#   KEEP=1 hack/fresh-check.sh          keep the clone afterwards (its path is printed)
#
# Prints the wall time of each command: the README's first-run figures come from here.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# The tools the project builds or unpacks into its cache (hack/build-binaries.sh), and the
# virtualenv's console scripts: none of them may come from the machine.
hidden=(etcd kube-apiserver kubectl helm promtool prometheus wrk kubelet kube-controller-manager
  kube-scheduler kube-proxy coredns pause captchatask kubectl-captchatask ruff mypy pytest)

work=$(mktemp -d "${TMPDIR:-/tmp}/captchatask-fresh.XXXXXX")
cleanup() {
  if [ "${KEEP:-0}" = 1 ]; then
    echo "fresh-check: clone kept in $work/clone"
  else
    rm -rf "$work"
  fi
}
trap cleanup EXIT

# A PATH of links to every command on the current PATH except the hidden ones: directories such as
# /usr/bin cannot simply be dropped, they hold the compilers and git.
shims="$work/path"
mkdir -p "$shims"
IFS=: read -r -a dirs <<<"$PATH"
for dir in "${dirs[@]}"; do
  [ -d "$dir" ] || continue
  for exe in "$dir"/*; do
    name=$(basename "$exe")
    [ -x "$exe" ] && [ ! -d "$exe" ] || continue
    [ -e "$shims/$name" ] && continue
    for h in "${hidden[@]}"; do [ "$name" = "$h" ] && continue 2; done
    ln -s "$exe" "$shims/$name"
  done
done
for h in "${hidden[@]}"; do
  if PATH=$shims command -v "$h" >/dev/null; then
    echo "fresh-check: could not hide $h" >&2
    exit 1
  fi
done

git clone -q --no-hardlinks "$repo" "$work/clone"
cd "$work/clone"
echo "fresh-check: clone of $(git rev-parse --short HEAD) in $work/clone; hidden: ${hidden[*]}"

env_args=(-u TESTBIN_DIR -u VIRTUAL_ENV PATH="$shims")
if [ "${FRESH_GO_CACHE:-0}" = 1 ]; then
  env_args+=(GOCACHE="$work/gocache" GOMODCACHE="$work/gomodcache")
fi

run() {
  local t0 rc=0
  t0=$(date +%s)
  echo "fresh-check: == $*"
  env "${env_args[@]}" "$@" </dev/null || rc=$?
  echo "fresh-check: == $* -> exit $rc after $(( $(date +%s) - t0 )) s"
  return "$rc"
}

run make demo
run make test
echo "fresh-check: both commands passed"
