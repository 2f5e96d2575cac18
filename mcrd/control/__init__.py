"""The control socket: a pure protocol, an asyncio server (mcrd) and a
blocking client (mcrctl).

`protocol` and `client` import no asyncio and no pydantic, so that mcrctl
starts fast; only mcrd imports `server`. This package re-exports the client's
names only, for the same reason.
"""

from mcrd.control.client import call
from mcrd.control.protocol import PROTOCOL_VERSION, ControlError

__all__ = ["PROTOCOL_VERSION", "ControlError", "call"]
