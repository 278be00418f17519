"""One copy of a stage's model per node (issue 23, item 1).

A training pod runs one rank per GPU, and each used to download the whole base model into its
own temporary folder: 8 x 13.5 GB per node for a 7B model, 8 x 140 GB for a 70B, until the
kubelet evicted the pod. `node_model_copy` keeps one copy per node in the pod's scratch volume
(`XWIN_WORKDIR`, /scratch/work in a pod; the system's temporary folder elsewhere, which
`xwin run` does not clean):

* the ranks of a node take a node-local file lock (`fcntl.flock` on the scratch volume) in
  turn; the first finds no copy and downloads it, the others wait on the lock, then find the
  verified copy and read it. The lock is not a collective, so a long download is not bounded
  by `training.collectiveTimeoutMinutes`, and a rank that dies while downloading releases it
  (the next rank then downloads);
* a copy is named by the URI and the stage's input digest, downloaded into `<name>.partial`
  and renamed when complete, with `COPY_RECORD` (every file and its size) written last; it is
  reused only when that record matches the files on disk and the store's file list, so a
  restarted stage (a container restart keeps its emptyDir) reuses it without downloading, and
  copies of other inputs of the same URI are deleted before a new download.

Local paths (file://, plain paths) are read in place and hf:// ids go to from_pretrained, as
`modeling.resolve_model_source` does.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import shutil
from pathlib import Path

from .modeling import HF_SCHEME, resolve_model_source
from .node_scratch import copy_name, node_root
from .store import Store, as_folder, check_model_folder

log = logging.getLogger(__name__)

COPY_RECORD = ".xwin-copy.json"


def cache_root(env: dict[str, str] | None = None) -> Path:
    """Where a node's model copies live (node_scratch: XWIN_WORKDIR/models, else xwin-models)."""
    return node_root("models", env)


@contextlib.contextmanager
def _node_lock(path: Path):
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def verified(dest: Path, remote: list[str]) -> bool:
    """Whether `dest` is a complete copy: its record (written last) lists exactly the store's
    files `remote` (paths under the folder) and every file on disk has the recorded size."""
    try:
        record = json.loads((dest / COPY_RECORD).read_text())
        files = record["files"]
        return sorted(files) == sorted(remote) and all(
            (dest / rel).stat().st_size == size for rel, size in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def node_model_copy(store: Store, uri: str, digest: str, root: Path | None = None) -> str:
    """A local folder with the model at `uri` that every rank of this node shares (or a Hub id
    for hf://, or the path itself for local URIs); downloads at most once per node and input
    digest. See the module docstring."""
    root = root or cache_root()
    if uri.startswith(HF_SCHEME) or store.local_path(uri) is not None:
        return resolve_model_source(store, uri, root)  # nothing to download
    check_model_folder(store, uri)
    root.mkdir(parents=True, exist_ok=True)
    name = copy_name(uri)
    dest = root / f"{name}-{(digest or 'nodigest')[:16]}"
    base = as_folder(uri)
    with _node_lock(root / f"{name}.lock"):
        remote = [f[len(base):] for f in store.list_files(uri)]
        if verified(dest, remote):
            log.info("model %s: reusing this node's verified copy %s", uri, dest)
            return str(dest)
        for stale in root.glob(f"{name}-*"):  # other inputs' copies, a partial download
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
        partial = root / f"{dest.name}.partial"
        log.info("model %s: downloading into %s (one copy for this node's ranks)", uri, dest)
        store.download_dir(uri, partial)
        files = {rel: (partial / rel).stat().st_size for rel in remote}
        (partial / COPY_RECORD).write_text(json.dumps({"uri": uri, "digest": digest, "files": files}))
        partial.rename(dest)
        log.info("model %s: %d file(s), %.2f GB on this node", uri, len(files), sum(files.values()) / 1e9)
    return str(dest)
