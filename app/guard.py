"""ASGI middleware in front of Gradio: bounds what one request can make the server hold or fetch."""
from __future__ import annotations

import json

MAX_BODY_BYTES = 1 << 20
"""The largest request body taken, uploads aside (Gradio's upload route has its own `max_file_size`). The largest
legitimate one is a link's state or a question, a few KB. Gradio kept each call's body in its session: 200 MB
queries, each refused by the app, pinned about 195 MB of server memory per session (a review of 2026-12-05)."""


class RequestGuard:
    """Refuses a POST body over MAX_BODY_BYTES (413) and a body that names a file by an http(s) URL (400), before
    Gradio reads it. Gradio downloads such a "path" into its cache before any check of ours, with no size limit:
    two API calls stored 400 MB from a public address, refused as uploads afterwards but kept on disk, and every
    call made the server fetch what the caller named (until 2026-12-05). The explorer has no input that takes a
    URL: pictures come from the dataset or an upload."""

    def __init__(self, app, upload_path: str = "/upload"):
        self.app, self.upload_path = app, upload_path

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"].endswith(self.upload_path):
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length", b"0")
        too_long = (f"above the {MAX_BODY_BYTES:,} bytes this server takes; send less (uploads go through the upload "
                    "route).")
        if length.isdigit() and int(length) > MAX_BODY_BYTES:
            await _drain(receive)
            return await _refuse(send, 413, f"the request is {int(length):,} bytes, {too_long}")
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > MAX_BODY_BYTES:
                if more:
                    await _drain(receive)
                return await _refuse(send, 413, f"the request is {too_long}")
        if _names_a_url(body):
            return await _refuse(send, 400, "a file given by URL is not fetched by this server; upload the image "
                                            "(gradio_client's handle_file on a local file) or give a dataset index.")
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)


def _names_a_url(body: bytes) -> bool:
    """Whether a JSON body holds an object whose "path" is an http(s) URL (as Gradio's FileData would carry it)."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return False  # not JSON: Gradio refuses it itself
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            path = item.get("path")
            if isinstance(path, str) and path.lstrip().lower().startswith(("http://", "https://")):
                return True
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


DRAIN_BYTES = 64 << 20
"""A refused body is read and dropped up to this many bytes before the answer, so that the client, still sending,
reads the refusal (answered at once, it met a broken pipe); past this the connection is just closed."""


async def _drain(receive) -> None:
    seen, more = 0, True
    while more and seen <= DRAIN_BYTES:
        message = await receive()
        if message["type"] != "http.request":
            return
        seen += len(message.get("body", b""))
        more = message.get("more_body", False)


async def _refuse(send, status: int, message: str) -> None:
    body = json.dumps({"error": message, "detail": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
