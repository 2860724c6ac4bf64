"""The tamper suite: real backups bent as a hostile backup VM could, and dom0's answer to each (issue #4)."""
