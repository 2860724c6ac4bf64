"""qubes-backup dom0 controller: encrypts and authenticates backups, verifies before it parses on restore."""
