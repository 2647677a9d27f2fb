#!/usr/bin/env bash
# Build the operator, sidecar and emulator images from the repository's Dockerfile without a
# Docker engine and without a registry, and write each as an OCI archive.
#
#   hack/build-images.sh              build what is missing; print one line per image on stdout:
#                                       <fully qualified image name> <absolute path of its OCI archive>
#   IMAGE_TAG=ci hack/build-images.sh another tag (default: dev)
#   TESTBIN_DIR=/some/dir hack/...    the cache lives in $TESTBIN_DIR/images (IMAGES_DIR overrides)
#
# Everything else goes to stderr, so `hack/build-images.sh | while read -r name archive; do ...`
# is the whole interface. The images are named as in charts/captchatask/values.yaml:
#   ghcr.io/captchatask/captchatask-operator:$IMAGE_TAG
#   ghcr.io/captchatask/captchatask-sidecar:$IMAGE_TAG   (the standalone receiver too)
#   ghcr.io/captchatask/captchatask-emulator:$IMAGE_TAG
# Fully qualified on purpose: containerd looks `x:1` up as `docker.io/library/x:1`. Each archive's
# index names its image (annotation org.opencontainers.image.ref.name), so
#   ctr -n k8s.io images import <archive>
# creates exactly that name. Next to the archives: images.txt (the stdout lines) and
# values-local-images.yaml (chart values selecting these images with pullPolicy Never).
#
# How: no base image can be pulled here, so python:3.11-slim-bookworm is stood in for by a root
# filesystem made from Debian bookworm packages with mmdebstrap (bookworm's python3 is 3.11) and
# committed with buildah under that exact name, so the Dockerfile is the one Docker users build.
# The wheels are made on the host (`pip wheel -c constraints.txt`) and the images are built with
# `buildah bud --build-arg WHEELS=context --network none`: the build itself never touches a network.
# As root, missing tools (buildah, mmdebstrap, runc, podman) are installed from Debian.
#
# The archives are cached under a hash of every input (Dockerfile, sources, pins, base recipe,
# this script), so a second run with nothing changed takes about a second.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)

TESTBIN_DIR=${TESTBIN_DIR:-$repo/.testbin}
IMAGES_DIR=${IMAGES_DIR:-$TESTBIN_DIR/images}
IMAGE_TAG=${IMAGE_TAG:-dev}
REGISTRY_PREFIX=ghcr.io/captchatask
TARGETS=(operator sidecar emulator)
# The name the Dockerfile's FROM resolves to (buildah normalises it the same way).
BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm
DEBIAN_SUITE=bookworm
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
DEBIAN_SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
# What python:3.11-slim-bookworm offers that the images use: Python with venv/ensurepip, the CA
# bundle, /etc/services and friends, time zones. Documentation and translations are left out as
# in Debian's slim images.
BASE_PACKAGES=python3,python3-venv,python-is-python3,ca-certificates,netbase,tzdata
BASE_DPKG_OPTS=(
  'path-exclude=/usr/share/man/*'
  'path-exclude=/usr/share/info/*'
  'path-exclude=/usr/share/locale/*'
  'path-exclude=/usr/share/doc/*'
  'path-include=/usr/share/doc/*/copyright'
)
# Host tools and the Debian packages that provide them.
start_all=$(date +%s)
log() { printf '[build-images %4ss] %s\n' "$(( $(date +%s) - start_all ))" "$*" >&2; }
die() { printf 'build-images: %s\n' "$*" >&2; exit 1; }

# Run a long command, printing a heartbeat every 30 s so CI logs show it is alive.
with_progress() {
  local what=$1; shift
  local t0; t0=$(date +%s)
  "$@" &
  local pid=$!
  CHILD=$pid
  while kill -0 "$pid" 2>/dev/null; do
    for _ in $(seq 1 30); do
      sleep 1
      kill -0 "$pid" 2>/dev/null || break
    done
    if kill -0 "$pid" 2>/dev/null; then
      log "  ... still $what ($(( $(date +%s) - t0 ))s)"
    fi
  done
  local rc=0
  wait "$pid" || rc=$?
  CHILD=
  LAST_SECONDS=$(( $(date +%s) - t0 ))
  if [ "$rc" -ne 0 ]; then
    die "$what failed (exit $rc) after ${LAST_SECONDS}s; its output is above"
  fi
  log "  $what took ${LAST_SECONDS}s"
}

human() { numfmt --to=si --suffix=B --format='%.1f' "$1"; }

ensure_tools() {
  # The same installer as the node's packages: installs as root, or names what is missing.
  "$repo/hack/system-packages.sh" images || die "the images need buildah, mmdebstrap, runc and podman"
}

# One storage for everything this script builds, apart from the host's default container store.
# runc, not crun: crun refuses this machine's hybrid cgroup v1 hierarchy.
BUILDAH=(buildah --root "$IMAGES_DIR/storage" --runroot "$IMAGES_DIR/runroot" --storage-driver overlay)

# A digest over the files a build reads. `find` output is sorted, so the order is stable.
hash_inputs() {
  (
    cd "$repo"
    find Dockerfile pyproject.toml constraints.txt README.md src operator sidecar \
      charts/captchatask/crds hack/build-images.sh \
      -type f ! -path '*/__pycache__/*' ! -name '*.pyc' -print0 \
      | LC_ALL=C sort -z | xargs -0 sha256sum
    printf 'base %s\ntag %s\nprefix %s\n' "$base_key" "$IMAGE_TAG" "$REGISTRY_PREFIX"
  ) | sha256sum | cut -c1-16
}

wheel_python() {
  local py=${WHEEL_PYTHON:-}
  if [ -z "$py" ]; then
    if [ -x "$repo/.venv/bin/python" ]; then py=$repo/.venv/bin/python; else py=python3; fi
  fi
  # The wheels are installed into the base's Python: the same interpreter version and platform.
  "$py" -c 'import sys, platform; sys.exit(not (sys.version_info[:2] == (3, 11) and platform.machine() == "x86_64" and sys.implementation.name == "cpython"))' 2>/dev/null \
    || die "the wheels must be made by CPython 3.11 on x86_64 (the base image's Python); $py is not: set WHEEL_PYTHON"
  "$py" -m pip --version >/dev/null 2>&1 || die "$py has no pip: run \`make venv\` or set WHEEL_PYTHON"
  echo "$py"
}

build_base() {
  local have
  have=$("${BUILDAH[@]}" inspect --type image --format '{{index .ImageAnnotations "io.captchatask.base-recipe"}}' "$BASE_IMAGE" 2>/dev/null || true)
  if [ "$have" = "$base_key" ]; then
    log "base $BASE_IMAGE (Debian $DEBIAN_SUITE, recipe $base_key): cached"
    return
  fi
  local tarball="$IMAGES_DIR/base/$base_key.tar"
  if [ ! -f "$tarball" ]; then
    log "base: mmdebstrap $DEBIAN_SUITE with $BASE_PACKAGES (cold: about a minute)"
    mkdir -p "$IMAGES_DIR/base"
    local args=(--variant=minbase --format=tar "--include=$BASE_PACKAGES"
      --aptopt='Acquire::Languages "none"')
    local opt
    for opt in "${BASE_DPKG_OPTS[@]}"; do args+=("--dpkgopt=$opt"); done
    # stdin from /dev/null: mmdebstrap would read a sources list from a non-terminal stdin.
    with_progress "making the base root filesystem" mmdebstrap --quiet "${args[@]}" \
      "$DEBIAN_SUITE" "$tarball.partial.tar" \
      "deb $DEBIAN_MIRROR $DEBIAN_SUITE main" \
      "deb $DEBIAN_MIRROR $DEBIAN_SUITE-updates main" \
      "deb $DEBIAN_SECURITY_MIRROR $DEBIAN_SUITE-security main" </dev/null
    mv "$tarball.partial.tar" "$tarball"
    TIMES+=("base-rootfs ${LAST_SECONDS}s")
  fi
  log "base: committing $(human "$(stat -c %s "$tarball")") of root filesystem as $BASE_IMAGE"
  local t0; t0=$(date +%s)
  local ctr; ctr=$("${BUILDAH[@]}" from scratch)
  "${BUILDAH[@]}" add --quiet "$ctr" "$tarball" / >/dev/null
  # The configuration python:3.11-slim-bookworm has, as far as the images rely on it.
  "${BUILDAH[@]}" config --os linux --arch amd64 \
    --env LANG=C.UTF-8 --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --cmd python3 --annotation "io.captchatask.base-recipe=$base_key" \
    --label "io.captchatask.base=Debian $DEBIAN_SUITE packages standing in for python:3.11-slim-bookworm" \
    "$ctr"
  "${BUILDAH[@]}" commit --quiet --rm "$ctr" "$BASE_IMAGE" >/dev/null
  TIMES+=("base-commit $(( $(date +%s) - t0 ))s")
  log "base: $BASE_IMAGE ready ($(( $(date +%s) - t0 ))s)"
}

make_wheelhouse() {
  local ctx=$1 py; py=$(wheel_python)
  rm -rf "$ctx"; mkdir -p "$ctx/.wheelhouse"
  cp "$repo/Dockerfile" "$ctx/Dockerfile"
  log "wheelhouse: pip wheel -c constraints.txt '.[operator]' with $("$py" --version)"
  with_progress "making the wheelhouse" "$py" -m pip wheel --quiet --disable-pip-version-check \
    -c "$repo/constraints.txt" --wheel-dir "$ctx/.wheelhouse" "$repo[operator]"
  TIMES+=("wheelhouse ${LAST_SECONDS}s")
  log "wheelhouse: $(find "$ctx/.wheelhouse" -name '*.whl' | wc -l) wheels, $(du -sh "$ctx/.wheelhouse" | cut -f1)"
}

build_image() {
  local target=$1 ctx=$2 out=$3
  local name="$REGISTRY_PREFIX/captchatask-$target:$IMAGE_TAG"
  log "image $name: buildah bud --target $target --network none"
  with_progress "building $target" "${BUILDAH[@]}" bud --quiet --runtime runc --pull-never \
    --network none --layers --build-arg WHEELS=context --target "$target" \
    -f "$ctx/Dockerfile" -t "$name" "$ctx" >/dev/null
  local built=$LAST_SECONDS
  with_progress "exporting $target" "${BUILDAH[@]}" push --quiet "$name" \
    "oci-archive:$out/captchatask-$target.oci.tar:$name"
  local packed unpacked
  packed=$(stat -c %s "$out/captchatask-$target.oci.tar")
  unpacked=$("${BUILDAH[@]}" images --noheading --format '{{.Size}}' "$name")
  printf '%s\tbuilt %ss\texported %ss\tarchive %s\tunpacked %s\n' "$target" "$built" \
    "$LAST_SECONDS" "$(human "$packed")" "$unpacked" >>"$out/sizes.txt.tmp"
  printf '%s %s\n' "$name" "$out/captchatask-$target.oci.tar" >>"$out/images.txt.tmp"
}

write_values() {
  local out=$1
  cat >"$out/values-local-images.yaml" <<EOF
# Chart values selecting the images built by hack/build-images.sh; never pulled from a registry.
operator:
  image:
    repository: $REGISTRY_PREFIX/captchatask-operator
    tag: "$IMAGE_TAG"
    pullPolicy: Never
receiver:
  image:
    repository: $REGISTRY_PREFIX/captchatask-sidecar
    tag: "$IMAGE_TAG"
    pullPolicy: Never
sidecar:
  image:
    repository: $REGISTRY_PREFIX/captchatask-sidecar
    tag: "$IMAGE_TAG"
EOF
}

report() {
  local out=$1
  while IFS=$'\t' read -r target built exported packed unpacked; do
    log "  $target: $packed, $unpacked ($built, $exported)"
  done <"$out/sizes.txt"
  log "archives in $out (images.txt, values-local-images.yaml)"
  cat "$out/images.txt"
}

# Keep the newest few outputs; each is a few hundred megabytes.
prune_outputs() {
  local keep=$1
  find "$IMAGES_DIR" -mindepth 1 -maxdepth 1 -type d -name 'out-*' -printf '%T@ %p\n' \
    | sort -rn | tail -n +4 | cut -d' ' -f2- | while read -r old; do
      [ "$old" = "$keep" ] || { log "pruning old output $old"; rm -rf "$old"; }
    done
}

# buildah 1.28 leaves the working container of a stage that is only a FROM (`FROM python AS
# python`, `FROM wheels-context AS wheels`) behind, mounted. The store is this script's alone (and
# locked), so removing every working container is safe; it also lets the store unmount itself.
cleanup_store() {
  [ -d "$IMAGES_DIR/storage" ] || return 0
  "${BUILDAH[@]}" rm --all >/dev/null 2>&1 || log "warning: buildah rm --all failed; check mounts under $IMAGES_DIR/storage"
}

main() {
  mkdir -p "$IMAGES_DIR"
  # One build at a time per cache: the test suite and a developer may start this together.
  exec 9>"$IMAGES_DIR/.lock"
  if ! flock -n 9; then
    log "another build-images run holds $IMAGES_DIR/.lock; waiting"
    flock 9
  fi
  local base_recipe
  base_recipe="$DEBIAN_SUITE $BASE_PACKAGES ${BASE_DPKG_OPTS[*]} $DEBIAN_MIRROR $DEBIAN_SECURITY_MIRROR"
  base_key=$(printf '%s' "$base_recipe" | sha256sum | cut -c1-16)
  local key; key=$(hash_inputs)
  local out="$IMAGES_DIR/out-$key"
  if [ -f "$out/images.txt" ] && [ -f "$out/sizes.txt" ]; then
    log "images for inputs $key: cached"
    touch "$out"
    report "$out"
    return
  fi
  ensure_tools
  trap cleanup_store EXIT
  # An interrupted run stops its running step too (the EXIT trap then cleans the store).
  trap '[ -z "${CHILD:-}" ] || kill "$CHILD" 2>/dev/null; exit 130' INT TERM
  log "inputs $key: building ${TARGETS[*]} (cold: a few minutes)"
  TIMES=()
  build_base
  local ctx="$IMAGES_DIR/context"
  make_wheelhouse "$ctx"
  rm -rf "$out"; mkdir -p "$out"
  rm -f "$out/images.txt.tmp" "$out/sizes.txt.tmp"
  local target
  for target in "${TARGETS[@]}"; do build_image "$target" "$ctx" "$out"; done
  write_values "$out"
  printf '%s\n' "${TIMES[@]}" >"$out/times.txt"
  mv "$out/sizes.txt.tmp" "$out/sizes.txt"
  mv "$out/images.txt.tmp" "$out/images.txt"
  # Intermediate images of older inputs: their layers are never reused once the inputs change.
  "${BUILDAH[@]}" rmi --prune >/dev/null 2>&1 || true
  rm -rf "$ctx"
  prune_outputs "$out"
  log "done in $(( $(date +%s) - start_all ))s"
  report "$out"
}

main "$@"
