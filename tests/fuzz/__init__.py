"""Fuzzing of everything dom0 parses from the backup VM (frames, header) or after decryption (manifest)."""
