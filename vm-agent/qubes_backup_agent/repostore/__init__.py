"""Repository stores other than a directory in the backup VM: ssh and S3 (base.py describes the interface)."""

from __future__ import annotations

from pathlib import Path

from .base import RemoteStore


def open_remote(location: str, root: Path, create: bool) -> RemoteStore:
    """The ssh:// or s3:// repository ``location``; ``create``: a backup may start one where none is."""
    store: RemoteStore
    if location.startswith("ssh://"):
        from .ssh import SshStore

        store = SshStore(location, root, create)
    else:
        from .s3 import S3Store

        store = S3Store(location, create)
    try:
        store.check_contents(create)
    except BaseException:
        store.close()
        raise
    return store
