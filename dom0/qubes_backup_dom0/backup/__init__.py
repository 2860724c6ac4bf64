"""Making a backup: planning (VMs, files, committed volume states) and the streaming pipeline to a target."""
