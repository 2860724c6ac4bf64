"""DisposableVMs in the simulated qubesd: ``admin.vm.CreateDisposable`` and auto-cleanup, as qubesd does them.

``admin.vm.CreateDisposable`` (R4.2 and R4.3: qubes/api/admin.py ``create_disposable``) creates a DispVM from the
destination AppVM (dom0 as destination: the caller's ``default_dispvm``, i.e. the global one for dom0), which
must have ``template_for_dispvms``; it is named ``dispN`` (N a free dispid in 1..9999), has ``auto_cleanup``,
the tags ``created-by-dom0`` and ``disp-created-by-dom0``, and the reply is its name (R4.3 with payload
``uuid``: ``uuid:UUID``).  A DispVM with ``auto_cleanup`` is removed when it stops (``admin.vm.Kill`` /
``Shutdown``), as qubes/vm/dispvm.py ``_auto_cleanup`` does.

In the simulation a VM is also a directory, ``DIR/vms/NAME``, the root of the processes that run "in" it
(transport.py SimTransport): a disposable gets a fresh, empty one, removed with the VM.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

from lxml import etree
from qubes_backup_dom0.qubes.qubesxml import Domain

from . import props
from .exc import ApiError, vm_not_found
from .handlers import HANDLERS, Api, Spec, _create, api


def _root(self: Api, name: str) -> Path:
    return self.store.sim_dir / "vms" / name


@api("admin.vm.CreateDisposable", payload=True, write=True)
def create_disposable(self: Api, dom: Domain, arg: str, payload: bytes) -> str:
    if payload and getattr(self, "release", "4.3") == "4.2":  # R4.2's create_disposable takes no payload
        raise ApiError("ProtocolError", "unexpected payload")
    if payload not in (b"", b"uuid"):
        raise ApiError("QubesValueError", "Invalid payload for admin.vm.CreateDisposable: expected the empty "
                       "string or 'uuid'")  # fmt: skip
    appvm_name = props.global_value(self.coll, "default_dispvm") if dom.is_admin else dom.name
    appvm = self.coll.get(appvm_name or "")
    if appvm is None:
        raise vm_not_found(appvm_name or "")
    if props.value_text(self.coll, appvm, "template_for_dispvms") != "True":
        raise ApiError("QubesException", "Refusing to create DispVM out of this AppVM, because "
                       "template_for_dispvms=False")  # fmt: skip
    taken = {d.name for d in self.coll.domains}
    free = [n for n in range(1, 10000) if f"disp{n}" not in taken]
    if not free:
        raise ApiError("QubesException", "no free dispid")
    dispid = random.choice(free)
    name = f"disp{dispid}"
    _create(self, "DispVM", appvm.name, f"name={name} label={appvm.label or 'red'}".encode(), False)
    new = self.coll[name]
    new.set_property("dispid", str(dispid))
    new.set_property("auto_cleanup", "True")
    tags = new.element.find("tags")
    assert tags is not None
    etree.SubElement(tags, "tag", name="disp-created-by-dom0")
    root = _root(self, name)
    shutil.rmtree(root, ignore_errors=True)
    (root / "home" / "user").mkdir(parents=True)
    return f"uuid:{new.raw_property('uuid')}" if payload else name


def _auto_cleanup(self: Api, dom: Domain) -> None:
    if dom.klass == "DispVM" and dom.raw_property("auto_cleanup") == "True" and dom.name in self.coll:
        self.storage.remove_data(dom)
        self.coll.remove_domain(dom.name)
        shutil.rmtree(_root(self, dom.name), ignore_errors=True)


def _with_cleanup(method: str) -> None:
    """Wrap a stopping call: the stopped auto-cleanup DispVM is removed in the same change."""
    spec = HANDLERS[method]
    inner = spec.func

    def handler(self: Api, dom: Domain, arg: str, payload: bytes) -> str:
        out = inner(self, dom, arg, payload)
        _auto_cleanup(self, dom)
        return out

    HANDLERS[method] = Spec(handler, spec.arg, spec.payload, spec.admin_dest, spec.write)


def _remove_root(method: str) -> None:
    """admin.vm.Remove of a DispVM also removes its simulated root directory."""
    spec = HANDLERS[method]
    inner = spec.func

    def handler(self: Api, dom: Domain, arg: str, payload: bytes) -> str:
        name, klass = dom.name, dom.klass
        out = inner(self, dom, arg, payload)
        if klass == "DispVM":
            shutil.rmtree(_root(self, name), ignore_errors=True)
        return out

    HANDLERS[method] = Spec(handler, spec.arg, spec.payload, spec.admin_dest, spec.write)


for _method in ("admin.vm.Kill", "admin.vm.Shutdown"):
    _with_cleanup(_method)
_remove_root("admin.vm.Remove")
