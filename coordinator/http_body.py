"""Request bodies read under the server's limits (NOTE [ HTTP limits ] in http_guard.py): the size cap,
the deadline, the stall between pieces, and one budget for all connections' bodies together."""

from __future__ import annotations

import asyncio

from starlette.requests import Request

from layerstream.coordinator.http_guard import BodyBudget, Limits
from layerstream.coordinator.openai_api import ApiError


class BodyReader:
    """The server's request bodies: `budget` holds their bytes, `reads` the readings still under way
    (the server's stop cancels them)."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self.budget = BodyBudget(limits.bodies_bytes)
        self.reads: set[asyncio.Task] = set()

    async def read(self, request: Request) -> tuple[bytes, int]:
        """The body, read as it comes, and the bytes it holds of the budget (the caller gives them back):
        415 unless JSON, 413 past the size cap, 503 past the budget, 408 past the deadline or where it
        stalls. A reading cancelled from outside raises CancelledError, its bytes given back."""
        lim = self.limits
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise ApiError(415, f"the body must be JSON, sent with 'Content-Type: application/json' (got "
                                f"{ctype[:60] or 'none'!r})", code="unsupported_media_type")
        declared = request.headers.get("content-length", "")
        too_big = ApiError(413, f"the request body is larger than {lim.body_bytes >> 20} MiB", code="request_too_large",
                           headers={"Connection": "close"})
        busy = ApiError(503, f"the server holds {lim.bodies_bytes >> 20} MiB of request bodies already; retry later",
                        kind="server_error", code="server_busy", headers={"Connection": "close", "Retry-After": "1"})
        if declared.isdigit() and int(declared) > lim.body_bytes:
            raise too_big
        # a declared length that would not fit beside the bytes held now is refused unread; the budget itself
        # takes bytes as they come (NOTE [ HTTP limits ]: declared lengths taken at once let 16 connections
        # that each declared 16 MiB and sent nothing shut every other POST out)
        if declared.isdigit() and self.budget.held + int(declared) > self.budget.total:
            raise busy
        chunks, held = [], 0  # (the bytes read, each taken from the budget as it comes)

        async def pull(pieces):
            nonlocal held
            while True:  # each piece within body_stall_s of the last (NOTE [ HTTP limits ])
                try:
                    chunk = await asyncio.wait_for(pieces.__anext__(), lim.body_stall_s)
                except StopAsyncIteration:
                    return
                except asyncio.TimeoutError:
                    raise ApiError(408, f"the body stalled: no byte of it came for {lim.body_stall_s:g} s",
                                   code="request_timeout", headers={"Connection": "close"}) from None
                if held + len(chunk) > lim.body_bytes:
                    raise too_big
                if not self.budget.take(len(chunk)):
                    raise busy
                held += len(chunk)
                chunks.append(chunk)

        reading = asyncio.ensure_future(asyncio.wait_for(pull(request.stream().__aiter__()), lim.body_timeout_s))
        self.reads.add(reading)
        try:
            await reading
        except BaseException as e:
            self.budget.give(held)
            if isinstance(e, asyncio.TimeoutError):
                raise ApiError(408, f"the body did not arrive within {lim.body_timeout_s:g} s",
                               code="request_timeout", headers={"Connection": "close"}) from None
            raise
        finally:
            self.reads.discard(reading)
        return b"".join(chunks), held
