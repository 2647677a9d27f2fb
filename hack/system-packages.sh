#!/usr/bin/env bash
# The few Debian packages the project cannot build or unpack into its own cache, by purpose:
#
#   hack/system-packages.sh test     zsh (the completion tests run the real shell)
#   hack/system-packages.sh node     containerd, runc, the CNI plugins, iptables, conntrack: the
#                                    test bed's node runs them as plain processes
#   hack/system-packages.sh images   buildah, mmdebstrap, runc, podman: the images are built and
#                                    checked without Docker
#   ... --check                      only check; exit 1 naming what is missing
#
# As root, what is missing is installed (`apt-get update` first) with every service start
# refused while apt runs (the test bed starts its own containerd with its own config, root,
# state and socket); otherwise the script stops with one line naming the packages. Present
# packages are never touched, so a warm machine spends milliseconds here.
set -euo pipefail

# package:a file that proves it is installed
declare -A sets=(
  [test]="zsh:/usr/bin/zsh"
  [node]="containerd:/usr/bin/containerd runc:/usr/sbin/runc containernetworking-plugins:/usr/lib/cni/bridge iptables:/usr/sbin/iptables conntrack:/usr/sbin/conntrack"
  [images]="buildah:/usr/bin/buildah mmdebstrap:/usr/bin/mmdebstrap runc:/usr/sbin/runc podman:/usr/bin/podman"
)

check_only=0
wanted=()
for arg in "$@"; do
  case $arg in
    --check) check_only=1 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *)
      [ -n "${sets[$arg]+x}" ] || { echo "system-packages: unknown set $arg (test, node, images)" >&2; exit 2; }
      wanted+=("$arg") ;;
  esac
done
[ ${#wanted[@]} -gt 0 ] || { echo "system-packages: name a set: test, node, images" >&2; exit 2; }

missing=()
for set in "${wanted[@]}"; do
  for entry in ${sets[$set]}; do
    pkg=${entry%%:*} probe=${entry#*:}
    if [ ! -x "$probe" ] && [[ " ${missing[*]} " != *" $pkg "* ]]; then
      missing+=("$pkg")
    fi
  done
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$check_only" = 1 ] || [ "$(id -u)" != 0 ]; then
  echo "system-packages: missing Debian packages ${missing[*]} (${wanted[*]}); as root: apt-get install ${missing[*]}" >&2
  exit 1
fi

echo "system-packages: installing ${missing[*]} from Debian (${wanted[*]}; about a minute)" >&2
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy"
  chmod +x "$policy"
  created_policy=1
fi
cleanup() { if [ "$created_policy" = 1 ]; then rm -f "$policy"; fi; }
trap cleanup EXIT
apt-get -o DPkg::Lock::Timeout=600 update -qq
DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
  --no-install-recommends "${missing[@]}" >/dev/null
for set in "${wanted[@]}"; do
  for entry in ${sets[$set]}; do
    [ -x "${entry#*:}" ] || { echo "system-packages: ${entry%%:*} installed but ${entry#*:} is missing" >&2; exit 1; }
  done
done
echo "system-packages: installed ${missing[*]}" >&2
