"""qubes-backup dom0 controller: encrypts and authenticates backups, verifies before it parses on restore."""

__version__ = "0.1.0"  # the same in every package of the project (tests/test_packages.py checks)
