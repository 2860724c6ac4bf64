"""qubes-backup VM agent: the qubes.Backup and qubes.Restore qrexec services of the backup VM."""

__version__ = "0.1.0"  # the same in every package of the project (tests/test_packages.py checks)
