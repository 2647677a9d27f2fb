#!/usr/bin/env bash
# Install the host packages a testbed node needs (containerd, runc, the CNI plugins, iptables,
# conntrack) from Debian, because the node runs them as plain processes: there is no Docker engine
# and no kind node image on the build machines.
#
#   hack/node-packages.sh          install what is missing (as root), or name it and fail
#   hack/node-packages.sh --check  only check; exit 1 with the apt-get line if anything is missing
#
# Installing never starts a system service: a policy-rc.d refuses every start while apt runs,
# and the testbed later starts its own containerd with its own config, root, state and socket.
set -euo pipefail

check_only=0
[ "${1:-}" = "--check" ] && check_only=1

# package -> a file that proves it is installed
declare -A probe=(
  [containerd]=/usr/bin/containerd
  [runc]=/usr/sbin/runc
  [containernetworking-plugins]=/usr/lib/cni/bridge
  [iptables]=/usr/sbin/iptables
  [conntrack]=/usr/sbin/conntrack
)
missing=()
for pkg in containerd runc containernetworking-plugins iptables conntrack; do
  [ -x "${probe[$pkg]}" ] || missing+=("$pkg")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "node packages: all present" >&2
  exit 0
fi
if [ "$check_only" = 1 ] || [ "$(id -u)" != 0 ]; then
  echo "node packages missing: ${missing[*]}; install them as root with: apt-get install ${missing[*]} (or run hack/node-packages.sh as root)" >&2
  exit 1
fi

echo "node packages: installing ${missing[*]} from Debian" >&2
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy"
  chmod +x "$policy"
  created_policy=1
fi
cleanup() { [ "$created_policy" = 1 ] && rm -f "$policy"; }
trap cleanup EXIT
apt-get -o DPkg::Lock::Timeout=600 update -qq
DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
  --no-install-recommends "${missing[@]}" >/dev/null
echo "node packages: installed ${missing[*]}" >&2
