"""What the backup VM sees of a backup (SECURITY.md section 4): the manifest's length is a size bucket."""

from __future__ import annotations

from qubes_backup_dom0.format import crypto, manifest

from .harness import World


def test_manifest_length_is_a_bucket(world: World) -> None:
    """The encrypted manifest is IV + a padded plaintext whose length is one of the buckets of
    FORMAT.md section 6, so its length tells the backup VM the bucket, not the number of files."""
    for members in (world.a, world.b):
        sealed = dict(members)["manifest"]
        plain = len(sealed) - crypto.IV_SIZE
        assert plain % 4096 == 0, f"manifest plaintext of {plain} bytes is not a bucket size"
        assert plain == manifest.padded_size(plain)
