"""qubesd's exception replies: ``2\\0EXCTYPE\\0TRACEBACK\\0MESSAGE\\0``."""

from __future__ import annotations


class ApiError(Exception):
    """A refused call; ``exc_type`` is the Qubes exception class name the client sees."""

    def __init__(self, exc_type: str, message: str) -> None:
        super().__init__(message)
        self.exc_type = exc_type
        self.message = message

    def reply(self) -> bytes:
        return b"2\0" + self.exc_type.encode() + b"\0\0" + self.message.encode("utf-8", "replace") + b"\0"


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
