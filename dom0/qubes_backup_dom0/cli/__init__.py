"""The commands qvm-backup and qvm-backup-restore, and what only they need: reports, progress, profiles."""
