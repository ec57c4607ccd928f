#!/usr/bin/env python3
"""A fixture MCP server that speaks ONLY the stateless 2026-07-28 revision, on the official Python SDK.

Usage:
    stateless_server.py [--port PORT]       (PORT 0, the default, picks a free port)

Binds 127.0.0.1 only, serves Streamable HTTP at /mcp and prints exactly one line,
`listening http://127.0.0.1:<port>/mcp`, on stdout once it accepts requests (logs go to stderr).
Stops on SIGTERM / SIGINT.

What it serves (lowlevel `Server`, so schemas go out exactly as written):
    tools      echo {text}   returns `text` as text content
               whoami        returns, as text, the JSON object of the `_meta` entries of the call
                             whose keys start with `io.modelcontextprotocol/` (protocolVersion,
                             clientCapabilities, clientInfo, ...), so tests can see what a gateway
                             put in the per-request envelope
    prompt     test_simple_prompt
    resource   test://static-text
plus `server/discover`, which the SDK answers itself (supportedVersions ["2026-07-28"]).

Modern only. The SDK's session manager routes a request by its MCP-Protocol-Version header: a
2026-07-28 (or unknown) value goes to its per-request-envelope entry, and no header or a
handshake-era value goes to the legacy stateful transport, which would accept `initialize`. The
SDK has no switch to turn that legacy path off, so `ModernOnly` below answers everything that
would take it instead:
    POST initialize         HTTP 400, JSON-RPC error -32022 (UNSUPPORTED_PROTOCOL_VERSION) with
                            data {"supported": ["2026-07-28"], "requested": <params.protocolVersion>}
                            -- what the SDK's own dual-era loop answers an initialize on a
                            2026-07-28 connection, and what 2026-07-28 clients in "auto" mode
                            recognise as "modern-only server"
    any other POST          the same -32022 error, `requested` being the header's value (absent:
                            2025-03-26, the revision the spec assumes without the header)
    GET, DELETE, ...        HTTP 405 with Allow: POST, as the SDK's 2026-07-28 entry answers them
Requests at 2026-07-28 get the SDK's own checks (envelope `_meta`, header/body agreement, Host and
Origin restricted to loopback).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
from collections.abc import Mapping
from typing import Any

import uvicorn
from mcp import types
from mcp.server.lowlevel import Server
from mcp.server.context import ServerRequestContext
from mcp.shared.exceptions import MCPError
from mcp.shared.inbound import ERROR_CODE_HTTP_STATUS, MCP_PROTOCOL_VERSION_HEADER, unsupported_protocol_version_rejection
from mcp.types.version import HANDSHAKE_PROTOCOL_VERSIONS, MODERN_PROTOCOL_VERSIONS
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

HOST = "127.0.0.1"
MCP_PATH = "/mcp"
RESERVED_META_PREFIX = "io.modelcontextprotocol/"

# ---------------------------------------------------------------------------------------------
# Tools, prompt, resource

TOOLS = [
    types.Tool(
        name="echo",
        description="Returns `text` as text content",
        input_schema={"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
    ),
    types.Tool(
        name="whoami",
        description="Returns the JSON of the call's `_meta` entries whose keys start with io.modelcontextprotocol/",
        input_schema={"type": "object", "properties": {}},
    ),
]

PROMPT = types.Prompt(name="test_simple_prompt", description="A simple prompt without arguments")

RESOURCE = types.Resource(
    uri="test://static-text", name="static-text", description="A static text resource", mime_type="text/plain"
)
RESOURCE_TEXT = "This is the content of the static text resource."


def text_result(text: str) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(type="text", text=text)])


def reserved_meta(params: Mapping[str, Any] | None) -> dict[str, Any]:
    """The raw `_meta` entries of a request whose keys carry the reserved io.modelcontextprotocol/ prefix."""
    meta = (params or {}).get("_meta")
    if not isinstance(meta, Mapping):
        return {}
    return {key: value for key, value in meta.items() if isinstance(key, str) and key.startswith(RESERVED_META_PREFIX)}


async def list_tools(ctx: ServerRequestContext, params: types.PaginatedRequestParams | None) -> types.ListToolsResult:
    return types.ListToolsResult(tools=TOOLS)


async def call_tool(ctx: ServerRequestContext, params: types.CallToolRequestParams) -> types.CallToolResult:
    arguments = params.arguments or {}
    if params.name == "echo":
        return text_result(str(arguments.get("text", "")))
    if params.name == "whoami":
        # ctx.params: the request's params exactly as received, `_meta` included.
        return text_result(json.dumps(reserved_meta(ctx.params), sort_keys=True))
    raise MCPError(code=types.INVALID_PARAMS, message=f"Unknown tool: {params.name}")


async def list_prompts(ctx: ServerRequestContext, params: types.PaginatedRequestParams | None) -> types.ListPromptsResult:
    return types.ListPromptsResult(prompts=[PROMPT])


async def get_prompt(ctx: ServerRequestContext, params: types.GetPromptRequestParams) -> types.GetPromptResult:
    if params.name != PROMPT.name:
        raise MCPError(code=types.INVALID_PARAMS, message=f"Unknown prompt: {params.name}")
    return types.GetPromptResult(
        messages=[
            types.PromptMessage(role="user", content=types.TextContent(type="text", text="This is a simple prompt for testing."))
        ]
    )


async def list_resources(
    ctx: ServerRequestContext, params: types.PaginatedRequestParams | None
) -> types.ListResourcesResult:
    return types.ListResourcesResult(resources=[RESOURCE])


async def read_resource(ctx: ServerRequestContext, params: types.ReadResourceRequestParams) -> types.ReadResourceResult:
    if str(params.uri) != RESOURCE.uri:
        raise MCPError(code=-32002, message=f"Resource not found: {params.uri}")
    return types.ReadResourceResult(
        contents=[types.TextResourceContents(uri=RESOURCE.uri, mime_type="text/plain", text=RESOURCE_TEXT)]
    )


def make_server() -> Server[Any]:
    return Server(
        "portcullis-stateless-fixture",
        version="1.0.0",
        on_list_tools=list_tools,
        on_call_tool=call_tool,
        on_list_prompts=list_prompts,
        on_get_prompt=get_prompt,
        on_list_resources=list_resources,
        on_read_resource=read_resource,
    )


# ---------------------------------------------------------------------------------------------
# Refusing the handshake era


class ModernOnly:
    """ASGI middleware: requests to /mcp that the SDK would hand to its legacy transport are refused."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != MCP_PATH:
            await self.app(scope, receive, send)
            return
        header = MCP_PROTOCOL_VERSION_HEADER.encode("ascii")
        version = next((v.decode("latin-1") for k, v in scope["headers"] if k == header), None)
        # The SDK's own routing rule (StreamableHTTPSessionManager): these go to the legacy path.
        if version is not None and version not in HANDSHAKE_PROTOCOL_VERSIONS:
            await self.app(scope, receive, send)
            return

        if scope["method"] != "POST":
            await Response(status_code=405, headers={"Allow": "POST"})(scope, receive, send)
            return
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        try:
            decoded = json.loads(body)
        except (ValueError, RecursionError):
            await json_rpc_error(None, types.PARSE_ERROR, "Parse error", None)(scope, receive, send)
            return
        request = decoded if isinstance(decoded, dict) else {}
        request_id = request.get("id")
        if not isinstance(request_id, (str, int)) or isinstance(request_id, bool):
            request_id = None
        if request.get("method") == "initialize":
            params = request.get("params")
            requested = params.get("protocolVersion") if isinstance(params, dict) else None
            message_text = (
                f"this server serves only the {'/'.join(MODERN_PROTOCOL_VERSIONS)} protocol; "
                "the initialize handshake is not accepted"
            )
        else:
            requested = version if version is not None else types.DEFAULT_NEGOTIATED_VERSION
            message_text = "Unsupported protocol version"
        if isinstance(requested, str):
            rejection = unsupported_protocol_version_rejection(requested)
            data = rejection.data if rejection is not None else None
        else:
            data = {"supported": list(MODERN_PROTOCOL_VERSIONS)}
        await json_rpc_error(request_id, types.UNSUPPORTED_PROTOCOL_VERSION, message_text, data)(scope, receive, send)


def json_rpc_error(request_id: str | int | None, code: int, message: str, data: Any) -> Response:
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    body = {"jsonrpc": "2.0", "id": request_id, "error": error}
    return Response(
        json.dumps(body, separators=(",", ":")),
        status_code=ERROR_CODE_HTTP_STATUS.get(code, 400),
        media_type="application/json",
    )


# ---------------------------------------------------------------------------------------------
# Entry point


async def serve(port: int) -> None:
    app = ModernOnly(make_server().streamable_http_app(streamable_http_path=MCP_PATH, host=HOST))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((HOST, port))
    sock.listen(128)
    bound_port = sock.getsockname()[1]

    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            await task  # startup failed: raise its error
            raise SystemExit("stateless_server: the server stopped before it started")
        await asyncio.sleep(0.02)
    sys.stdout.write(f"listening http://{HOST}:{bound_port}{MCP_PATH}\n")
    sys.stdout.flush()
    await task


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0: any free port)")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"bad port: {args.port}")
    asyncio.run(serve(args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
