"""qubesd's exception replies: ``2\\0EXCTYPE\\0TRACEBACK\\0MESSAGE\\0`` for a QubesException; for a
PermissionDenied, a ProtocolError (a malformed or unknown call) or any other exception qubesd closes the
connection without a reply (qubes/api/__init__.py ``respond``), and so does the simulation."""

from __future__ import annotations


class ApiError(Exception):
    """A refused call; ``exc_type`` is the Qubes exception class name the client sees."""

    def __init__(self, exc_type: str, message: str) -> None:
        super().__init__(message)
        self.exc_type = exc_type
        self.message = message

    @property
    def closes(self) -> bool:
        """qubesd answers these by closing the connection without a reply (``transport.abort()``): a
        PermissionDenied, a ProtocolError (also: no such method), or an exception that is no QubesException."""
        return self.exc_type in CLOSING

    def reply(self) -> bytes:
        if self.closes:
            return b""
        return b"2\0" + self.exc_type.encode() + b"\0\0" + self.message.encode("utf-8", "replace") + b"\0"


CLOSING = frozenset({"ProtocolError", "PermissionDenied"})


def value_error(message: str) -> ApiError:
    return ApiError("QubesValueError", message)


def prop_value_error(message: str) -> ApiError:
    return ApiError("QubesPropertyValueError", message)


def no_such_property(name: str) -> ApiError:
    return ApiError("QubesNoSuchPropertyError", f"Invalid property {name!r}")


def vm_not_found(name: str) -> ApiError:
    return ApiError("QubesVMNotFoundError", f"No such domain: {name!r}")


def protocol_error(message: str) -> ApiError:
    return ApiError("ProtocolError", message)
