"""Frame formats shared by the qubes-backup dom0 controller and the VM agent.

Both directions of both services (qubes.Backup, qubes.Restore) use one frame layout, declared with
construct in :mod:`.frames`; member names follow the grammar in :mod:`.names`.  Nothing here knows about
keys: the agent depends on this package only.
"""

__version__ = "0.1.0"  # the same in every package of the project (tests/test_packages.py checks)
