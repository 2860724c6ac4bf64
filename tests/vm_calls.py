"""Admin API calls made as a VM (not dom0), as qrexec hands them to qubesd after its policy allowed them:
the simulated qubesd checks them against the policy files' rules (qubes_backup_sim/policy.py)."""

from __future__ import annotations

from qubes_backup_dom0.qubes.adminapi import AdminAPI, PolicyDenied, QubesdError, parse_reply
from qubes_backup_dom0.qubes.system import System


def call_as(system: System, src: str, method: str, dest: str, arg: str = "", payload: bytes = b"") -> bytes:
    """One call by VM ``src`` (the source in the request header); the reply's data."""
    api = AdminAPI(system.admin_socket())
    raw = api._exchange(f"{method}+{arg} {src} name {dest}\0".encode() + payload, method, dest)
    return parse_reply(raw, method, dest)


def refused(system: System, src: str, method: str, dest: str, arg: str = "", payload: bytes = b"") -> bool:
    """True when the call is refused as a policy refuses it: no answer, the connection closed (qubesd does
    that with a PermissionDenied; the simulated one too)."""
    try:
        call_as(system, src, method, dest, arg, payload)
    except PolicyDenied:
        return True
    except QubesdError as e:
        return e.exc_type == "PermissionDenied"
    return False
