"""Where a node keeps what its ranks share (the model copy, tokenized examples): a folder per
kind under the pod's scratch volume (XWIN_WORKDIR), else under the system's temporary folder,
and one name per source URI in it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .store_uri import as_folder


def node_root(kind: str, env: dict[str, str] | None = None) -> Path:
    """XWIN_WORKDIR/<kind> (a pod's scratch volume), else xwin-<kind> in the temporary folder."""
    env = os.environ if env is None else env
    if env.get("XWIN_WORKDIR"):
        return Path(env["XWIN_WORKDIR"]) / kind
    return Path(tempfile.gettempdir()) / f"xwin-{kind}"


def copy_name(uri: str) -> str:
    """The file-system name of a source URI's copy (its folder's URI, flattened)."""
    return as_folder(uri).rstrip("/").replace("://", "/").replace("/", "_")
