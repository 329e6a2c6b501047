"""The token bus: where a request's answer travels from the run that produces it to
every client that reads it. One Redis Stream per request, read from any position
at each reader's own pace (``reader``); written only by the run that owns the
request's current attempt (``producer``, ``fencing``); beside it, the request's
record (``bus``). Redis failures become ``ServiceUnavailable`` (``shared_redis``).
"""

from pipeline.tokenbus.bus import TERMINAL_EVENTS, BusEvent, RequestStatus, TokenBus, get_bus, set_bus

__all__ = ["TERMINAL_EVENTS", "BusEvent", "RequestStatus", "TokenBus", "get_bus", "set_bus"]
