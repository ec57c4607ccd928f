#!/usr/bin/env python3
"""Drive one MCP scenario against a Streamable HTTP endpoint with the official MCP Python SDK.

Usage:
    client_driver.py URL SCENARIO [--header 'Name: value']... [--protocol VERSION] [--timeout SECONDS]
                     [--url-elicitation]

SCENARIO is one of: basic, everything, progress, logging, sampling, elicitation, stateless, unauthorized,
connect (interactive: one command per stdin line, `list`, `call NAME` or `end`, one JSON event per stdout
line; see scenario_connect).

--protocol selects how the SDK client connects:
    legacy (default)  the initialize handshake (the SDK offers its newest handshake revision, 2025-11-25)
    2025-06-18 ...    the initialize handshake, offering that handshake-era revision instead
    2026-07-28        the stateless revision: an explicit server/discover, then every request carries
                      `_meta` io.modelcontextprotocol/protocolVersion, clientInfo and clientCapabilities
                      and the MCP-Protocol-Version / Mcp-Method headers; no initialize, no session
    auto              the SDK's own choice: server/discover first, falling back to initialize
The `stateless` scenario always uses 2026-07-28.

--url-elicitation: the connect scenario declares elicitation (this SDK declares form and URL mode
together, never URL mode alone); without it, it declares none. Every other scenario always declares both.
For the connect scenario, --timeout bounds each request and each command, not the whole run.

Output: exactly one JSON object, on the last line of stdout, in every case. On success it carries
"ok": true and the scenario's results; on failure "ok": false and "error", and the error is also
written to stderr.

Exit codes: 0 success; 1 the scenario failed; 2 bad usage; 3 the installed SDK does not support the
2026-07-28 revision.

Only the given URL is contacted, and only if its host is a loopback address (127.0.0.0/8, ::1 or
localhost); environment proxy settings are ignored.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import re
import sys
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any, NoReturn
from urllib.parse import urlsplit

import anyio
import httpx2
import mcp
from mcp import Client
from mcp import types
from mcp.client import ClientRequestContext
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPDeprecationWarning, MCPError
from mcp.types import version as mcp_versions

# The driver exercises deprecated-but-valid protocol features (logging/setLevel, sampling) on purpose.
warnings.simplefilter("ignore", MCPDeprecationWarning)

STATELESS_VERSION = "2026-07-28"
SCENARIOS = (
    "basic",
    "everything",
    "progress",
    "logging",
    "sampling",
    "elicitation",
    "stateless",
    "unauthorized",
    "connect",
)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNSUPPORTED = 3

# Answer values for the elicitation callback, used when the requested schema asks for these fields.
ELICIT_KNOWN_VALUES: dict[str, Any] = {"username": "alice", "email": "alice@example.com"}


class ScenarioError(Exception):
    """The scenario ran but what came back is not what it expects."""


class Unsupported(Exception):
    """The installed SDK cannot do what was asked (exit code 3)."""


def sdk_supports_stateless() -> bool:
    return STATELESS_VERSION in getattr(mcp_versions, "MODERN_PROTOCOL_VERSIONS", ())


# --------------------------------------------------------------------------------------------
# HTTP plumbing: one httpx2 client per run, with the --header values, no proxies, and a log of
# every exchange (JSON-RPC method sent, status, session id) so scenarios can report the wire.
# --------------------------------------------------------------------------------------------


@dataclass
class WireLog:
    exchanges: list[dict[str, Any]] = field(default_factory=list)

    async def on_request(self, request: httpx2.Request) -> None:
        entry: dict[str, Any] = {"http_method": request.method, "rpc_method": None}
        if request.method == "POST":
            try:
                body = json.loads(request.content or b"null")
            except Exception:  # noqa: BLE001 - a streamed or non-JSON body is just not logged
                body = None
            if isinstance(body, dict):
                entry["rpc_method"] = body.get("method") or ("response" if "id" in body else None)
                params = body.get("params")
                meta = params.get("_meta") if isinstance(params, dict) else None
                entry["meta_keys"] = sorted(meta) if isinstance(meta, dict) else []
        entry["sent_session_id"] = request.headers.get("mcp-session-id")
        entry["sent_protocol_version"] = request.headers.get("mcp-protocol-version")
        request.extensions["driver_log_entry"] = entry
        self.exchanges.append(entry)

    async def on_response(self, response: httpx2.Response) -> None:
        entry = response.request.extensions.get("driver_log_entry")
        if entry is not None:
            entry["status"] = response.status_code
            entry["session_id"] = response.headers.get("mcp-session-id")

    def summary(self) -> dict[str, Any]:
        session_ids = sorted({e["session_id"] for e in self.exchanges if e.get("session_id")})
        return {
            "rpc_methods": [e["rpc_method"] for e in self.exchanges if e["rpc_method"] is not None],
            "statuses": [e.get("status") for e in self.exchanges],
            "session_ids": session_ids,
            # The `_meta` keys each JSON-RPC request carried, in order (2026-07-28 stamps its envelope there).
            "request_meta_keys": [
                [e["rpc_method"], e.get("meta_keys", [])]
                for e in self.exchanges
                if e["rpc_method"] not in (None, "response")
            ],
            "protocol_version_headers": sorted(
                {e["sent_protocol_version"] for e in self.exchanges if e["sent_protocol_version"]}
            ),
        }


def make_http_client(headers: list[tuple[str, str]], wire: WireLog, timeout: float) -> httpx2.AsyncClient:
    return httpx2.AsyncClient(
        headers=headers,
        timeout=httpx2.Timeout(timeout),
        follow_redirects=False,
        trust_env=False,  # never route loopback traffic through an environment proxy
        event_hooks={"request": [wire.on_request], "response": [wire.on_response]},
    )


# --------------------------------------------------------------------------------------------
# Client callbacks
# --------------------------------------------------------------------------------------------


def content_text(blocks: Any) -> str:
    """Concatenate the text of text content blocks (a single block or a list)."""
    if not isinstance(blocks, list):
        blocks = [blocks]
    return "".join(getattr(b, "text", "") for b in blocks if getattr(b, "type", None) == "text")


def dump(model: Any) -> Any:
    return model.model_dump(by_alias=True, mode="json", exclude_none=True)


@dataclass
class Recorder:
    progress: list[dict[str, Any]] = field(default_factory=list)
    logs: list[dict[str, Any]] = field(default_factory=list)
    sampling_requests: list[dict[str, Any]] = field(default_factory=list)
    elicitation_requests: list[dict[str, Any]] = field(default_factory=list)

    async def on_progress(self, progress: float, total: float | None, message: str | None) -> None:
        self.progress.append({"progress": progress, "total": total, "message": message})

    async def on_log(self, params: types.LoggingMessageNotificationParams) -> None:
        self.logs.append({"level": params.level, "logger": params.logger, "data": params.data})

    async def on_sampling(
        self, context: ClientRequestContext, params: types.CreateMessageRequestParams
    ) -> types.CreateMessageResult:
        user_texts = [content_text(m.content) for m in params.messages if m.role == "user"]
        prompt = user_texts[-1] if user_texts else ""
        answer = f"sampled: {prompt}"
        self.sampling_requests.append({"prompt": prompt, "max_tokens": params.max_tokens, "answer": answer})
        return types.CreateMessageResult(
            role="assistant",
            content=types.TextContent(type="text", text=answer),
            model="portcullis-test-driver",
            stop_reason="endTurn",
        )

    async def on_elicitation(
        self, context: ClientRequestContext, params: types.ElicitRequestParams
    ) -> types.ElicitResult:
        if isinstance(params, types.ElicitRequestURLParams):
            self.elicitation_requests.append({"mode": "url", "message": params.message, "url": params.url})
            return types.ElicitResult(action="accept")
        schema = params.requested_schema
        content = fill_schema(schema)
        self.elicitation_requests.append(
            {"mode": "form", "message": params.message, "requested_schema": schema, "content": content}
        )
        return types.ElicitResult(action="accept", content=content)


def fill_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """Build form content that satisfies an elicitation's flat requested schema.

    Known fields (username, email) get realistic values; otherwise strings are "x" (or a value valid
    for their format), numbers 1 (clamped into range), booleans true, enums their first option.
    """
    content: dict[str, Any] = {}
    for name, prop in (schema.get("properties") or {}).items():
        content[name] = fill_property(name, prop if isinstance(prop, dict) else {})
    return content


def first_option(prop: dict[str, Any]) -> Any:
    if prop.get("enum"):
        return prop["enum"][0]
    for key in ("oneOf", "anyOf"):
        for option in prop.get(key) or []:
            if isinstance(option, dict) and "const" in option:
                return option["const"]
    return None


def fill_property(name: str, prop: dict[str, Any]) -> Any:
    kind = prop.get("type")
    if kind == "array":
        items = prop.get("items") if isinstance(prop.get("items"), dict) else {}
        option = first_option(items)
        return [option] if option is not None else ["x"]
    option = first_option(prop)
    if option is not None:
        return option
    if kind in ("number", "integer"):
        value: float | int = 1
        if "minimum" in prop and value < prop["minimum"]:
            value = prop["minimum"]
        if "maximum" in prop and value > prop["maximum"]:
            value = prop["maximum"]
        return int(value) if kind == "integer" else value
    if kind == "boolean":
        return True
    # string (or untyped)
    if name in ELICIT_KNOWN_VALUES and isinstance(ELICIT_KNOWN_VALUES[name], str):
        return ELICIT_KNOWN_VALUES[name]
    fmt = prop.get("format")
    value_s = {
        "email": "x@example.com",
        "uri": "https://example.com/x",
        "date": "2000-01-01",
        "date-time": "2000-01-01T00:00:00Z",
    }.get(fmt, "x")
    min_len = prop.get("minLength")
    if isinstance(min_len, int) and len(value_s) < min_len:
        value_s = value_s + "x" * (min_len - len(value_s))
    return value_s


# --------------------------------------------------------------------------------------------
# Connecting
# --------------------------------------------------------------------------------------------


@dataclass
class Options:
    url: str
    scenario: str
    headers: list[tuple[str, str]]
    protocol: str
    timeout: float
    url_elicitation: bool = False


def is_stateless(protocol: str) -> bool:
    return protocol not in ("legacy", "auto") and protocol not in mcp_versions.HANDSHAKE_PROTOCOL_VERSIONS


class Connection:
    """An entered SDK `Client` on the Streamable HTTP transport, negotiated as `protocol` asks."""

    def __init__(
        self,
        opts: Options,
        recorder: Recorder,
        *,
        protocol: str | None = None,
        log_level: str | None = None,
        elicitation: bool = True,
    ):
        self.opts = opts
        self.elicitation = elicitation
        self.protocol = protocol or opts.protocol
        self.recorder = recorder
        self.wire = WireLog()
        self.log_level = log_level
        self.discover_result: types.DiscoverResult | None = None
        self._stack: Any = None

    async def __aenter__(self) -> Client:
        from contextlib import AsyncExitStack

        protocol = self.protocol
        if is_stateless(protocol):
            if not sdk_supports_stateless():
                raise Unsupported(
                    f"mcp {mcp_version()} does not support protocol {protocol} "
                    f"(its modern revisions: {list(getattr(mcp_versions, 'MODERN_PROTOCOL_VERSIONS', ()))})"
                )
            if protocol not in mcp_versions.MODERN_PROTOCOL_VERSIONS:
                raise Unsupported(f"mcp {mcp_version()} does not know protocol {protocol}")
            mode = protocol
        elif protocol == "auto":
            mode = "auto"
        else:
            mode = "legacy"
            if protocol != "legacy":
                # The SDK's initialize() always offers LATEST_HANDSHAKE_VERSION; to act as an older
                # client, offer the requested handshake-era revision instead.
                import mcp.client.session as session_module

                session_module.LATEST_HANDSHAKE_VERSION = protocol  # type: ignore[misc]

        stack = AsyncExitStack()
        await stack.__aenter__()
        self._stack = stack
        try:
            http = await stack.enter_async_context(make_http_client(self.opts.headers, self.wire, self.opts.timeout))
            transport = streamable_http_client(self.opts.url, http_client=http)
            client = Client(
                transport,
                mode=mode,
                read_timeout_seconds=self.opts.timeout,
                client_info=types.Implementation(name="portcullis-python-driver", version=mcp_version()),
                sampling_callback=self.recorder.on_sampling,
                # The SDK declares the elicitation capability (form and URL) only with a callback.
                elicitation_callback=self.recorder.on_elicitation if self.elicitation else None,
                logging_callback=self.recorder.on_log,
                log_level=self.log_level,  # only used on 2026-07-28 connections (per-request opt-in)
                cache=None,  # every call must reach the server under test
            )
            await stack.enter_async_context(client)
            if is_stateless(protocol):
                # Client(mode=VERSION) adopts that version without traffic; do the explicit
                # server/discover so the server's answer (and its support) is checked, then adopt it.
                try:
                    raw = await client.session.send_discover(protocol)
                except MCPError as exc:
                    raise ScenarioError(
                        f"server/discover at {protocol} was rejected ({describe_exception(exc)}): "
                        "the server does not speak the stateless revision"
                    ) from exc
                self.discover_result = types.DiscoverResult.model_validate(raw)
                client.session.adopt(self.discover_result)
            elif client.session.discover_result is not None:
                self.discover_result = client.session.discover_result
            return client
        except BaseException:
            await stack.__aexit__(*sys.exc_info())
            raise

    async def __aexit__(self, *exc: Any) -> None:
        await self._stack.__aexit__(*exc)

    def describe(self, client: Client) -> dict[str, Any]:
        info = client.server_info
        out: dict[str, Any] = {
            "protocol_version": client.protocol_version,
            "mode": "stateless" if client.session.discover_result is not None else "initialize",
            "server_info": dump(info) if info is not None else None,
        }
        if self.discover_result is not None:
            out["supported_versions"] = list(self.discover_result.supported_versions)
        return out


def mcp_version() -> str:
    from importlib.metadata import version

    return version("mcp")


# --------------------------------------------------------------------------------------------
# Scenarios
# --------------------------------------------------------------------------------------------


def tool_result(result: types.CallToolResult) -> dict[str, Any]:
    out: dict[str, Any] = {"is_error": bool(result.is_error), "text": content_text(result.content)}
    if result.structured_content is not None:
        out["structured_content"] = result.structured_content
    return out


def expect_ok(name: str, result: types.CallToolResult) -> None:
    if result.is_error:
        raise ScenarioError(f"tool {name} returned isError: {content_text(result.content)!r}")


async def arguments_for(client: Client, name: str, preferred: dict[str, Any]) -> dict[str, Any]:
    """Arguments for tool `name` that satisfy its listed input schema.

    `preferred` values are used for the properties the schema has; any other required property is
    filled generically (see `fill_property`).
    """
    tools = await client.list_tools()
    tool = next((t for t in tools.tools if t.name == name), None)
    if tool is None:
        raise ScenarioError(f"tool {name} is not listed (tools: {[t.name for t in tools.tools]})")
    schema = tool.input_schema or {}
    props = schema.get("properties") or {}
    arguments = {key: value for key, value in preferred.items() if key in props}
    for key in schema.get("required") or []:
        if key not in arguments:
            prop = props.get(key)
            arguments[key] = fill_property(key, prop if isinstance(prop, dict) else {})
    return arguments


async def scenario_basic(opts: Options) -> dict[str, Any]:
    conn = Connection(opts, Recorder())
    async with conn as client:
        out = conn.describe(client)
        tools = await client.list_tools()
        out["tools"] = [t.name for t in tools.tools]
        echo = await client.call_tool("echo", {"text": "hello"})
        expect_ok("echo", echo)
        out["echo"] = content_text(echo.content)
        resource = await client.read_resource("test://static-text")
        out["resource"] = [
            {"uri": str(c.uri), "mime_type": c.mime_type, "text": getattr(c, "text", None)} for c in resource.contents
        ]
        prompt = await client.get_prompt("test_simple_prompt")
        out["prompt"] = [{"role": m.role, "text": content_text(m.content)} for m in prompt.messages]
    out["wire"] = conn.wire.summary()
    if out["echo"] != "hello":
        raise ScenarioError(f"echo returned {out['echo']!r}, expected 'hello'")
    return out


async def scenario_everything(opts: Options) -> dict[str, Any]:
    """Against @modelcontextprotocol/server-everything: list its tools and call its echo."""
    conn = Connection(opts, Recorder())
    async with conn as client:
        out = conn.describe(client)
        tools = await client.list_tools()
        out["tools"] = [t.name for t in tools.tools]
        echo = await client.call_tool("echo", {"message": "hello"})
        expect_ok("echo", echo)
        out["echo"] = content_text(echo.content)
    out["wire"] = conn.wire.summary()
    return out


async def scenario_progress(opts: Options) -> dict[str, Any]:
    recorder = Recorder()
    conn = Connection(opts, recorder)
    async with conn as client:
        out = conn.describe(client)
        result = await client.call_tool("test_tool_with_progress", {}, progress_callback=recorder.on_progress)
        expect_ok("test_tool_with_progress", result)
        out["result"] = tool_result(result)
    out["progress"] = [p["progress"] for p in recorder.progress]
    out["progress_notifications"] = recorder.progress
    out["wire"] = conn.wire.summary()
    if not recorder.progress:
        raise ScenarioError("no progress notification was received")
    return out


async def scenario_logging(opts: Options) -> dict[str, Any]:
    recorder = Recorder()
    conn = Connection(opts, recorder, log_level="debug")
    async with conn as client:
        out = conn.describe(client)
        if client.session.discover_result is None:
            out["set_level"] = {"via": "logging/setLevel", "level": "debug", "error": None}
            try:
                await client.set_logging_level("debug")
            except MCPError as exc:
                # Reported, not fatal: whether log notifications arrive is what this scenario checks.
                out["set_level"]["error"] = describe_exception(exc)
        else:
            out["set_level"] = {"via": "_meta io.modelcontextprotocol/logLevel", "level": "debug", "error": None}
        result = await client.call_tool("test_tool_with_logging", {})
        expect_ok("test_tool_with_logging", result)
        out["result"] = tool_result(result)
    out["logs"] = [log["data"] for log in recorder.logs]
    out["log_notifications"] = recorder.logs
    out["wire"] = conn.wire.summary()
    if not recorder.logs:
        raise ScenarioError("no log notification was received")
    return out


async def scenario_sampling(opts: Options) -> dict[str, Any]:
    recorder = Recorder()
    conn = Connection(opts, recorder)
    async with conn as client:
        out = conn.describe(client)
        result = await client.call_tool("test_sampling", {"prompt": "hi"})
        expect_ok("test_sampling", result)
        out["result"] = tool_result(result)
    out["sampling_requests"] = recorder.sampling_requests
    out["wire"] = conn.wire.summary()
    if not recorder.sampling_requests:
        raise ScenarioError("the server sent no sampling/createMessage request")
    if "sampled: hi" not in out["result"]["text"]:
        raise ScenarioError(f"tool result does not carry the sampled text: {out['result']['text']!r}")
    return out


async def scenario_elicitation(opts: Options) -> dict[str, Any]:
    recorder = Recorder()
    conn = Connection(opts, recorder)
    async with conn as client:
        out = conn.describe(client)
        arguments = await arguments_for(client, "test_elicitation", {"message": "Please provide your information"})
        out["arguments"] = arguments
        result = await client.call_tool("test_elicitation", arguments)
        expect_ok("test_elicitation", result)
        out["result"] = tool_result(result)
    out["elicitation_requests"] = recorder.elicitation_requests
    out["wire"] = conn.wire.summary()
    if not recorder.elicitation_requests:
        raise ScenarioError("the server sent no elicitation/create request")
    return out


async def scenario_stateless(opts: Options) -> dict[str, Any]:
    if not sdk_supports_stateless():
        raise Unsupported(
            f"mcp {mcp_version()} does not support the stateless {STATELESS_VERSION} revision "
            f"(known revisions: {list(getattr(mcp_versions, 'KNOWN_PROTOCOL_VERSIONS', ()))})"
        )
    conn = Connection(opts, Recorder(), protocol=STATELESS_VERSION)
    async with conn as client:
        out = conn.describe(client)
        echo = await client.call_tool("echo", {"text": "hello"})
        expect_ok("echo", echo)
        out["echo"] = content_text(echo.content)
    wire = conn.wire.summary()
    out["wire"] = wire
    if out["protocol_version"] != STATELESS_VERSION:
        raise ScenarioError(f"negotiated {out['protocol_version']!r}, expected {STATELESS_VERSION}")
    if "initialize" in wire["rpc_methods"]:
        raise ScenarioError("an initialize request was sent in stateless mode")
    if wire["session_ids"]:
        raise ScenarioError(f"the server issued a session id in stateless mode: {wire['session_ids']}")
    if out["echo"] != "hello":
        raise ScenarioError(f"echo returned {out['echo']!r}, expected 'hello'")
    return out


async def scenario_unauthorized(opts: Options) -> dict[str, Any]:
    out: dict[str, Any] = {}
    # 1. Through the SDK: the connection must fail. The SDK turns a bare HTTP 4xx into a
    #    JSON-RPC error and does not expose the status, so 2. asks again with httpx2 directly.
    connected_with: str | None = None
    try:
        async with Connection(opts, Recorder()) as client:
            connected_with = client.protocol_version
    except Exception as exc:  # noqa: BLE001 - any failure to connect is the expected outcome here
        out["sdk_error"] = describe_exception(exc)
    if connected_with is not None:
        raise ScenarioError(f"the SDK connected (protocol {connected_with}); expected HTTP 401")

    stateless = is_stateless(opts.protocol)
    if stateless:
        body = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "server/discover",
            "params": {
                "_meta": {
                    "io.modelcontextprotocol/protocolVersion": opts.protocol,
                    "io.modelcontextprotocol/clientInfo": {"name": "portcullis-python-driver", "version": "0"},
                    "io.modelcontextprotocol/clientCapabilities": {},
                }
            },
        }
        extra = {"MCP-Protocol-Version": opts.protocol, "Mcp-Method": "server/discover"}
    else:
        body = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "initialize",
            "params": {
                "protocolVersion": mcp_versions.LATEST_HANDSHAKE_VERSION,
                "capabilities": {},
                "clientInfo": {"name": "portcullis-python-driver", "version": "0"},
            },
        }
        extra = {}
    wire = WireLog()
    async with make_http_client(opts.headers, wire, opts.timeout) as http:
        response = await http.post(
            opts.url,
            json=body,
            headers={"Accept": "application/json, text/event-stream", **extra},
        )
        await response.aread()
    out["status"] = response.status_code
    out["www_authenticate"] = response.headers.get("www-authenticate")
    out["resource_metadata"] = resource_metadata_param(out["www_authenticate"])
    if response.status_code != 401:
        raise ScenarioError(f"expected HTTP 401, got {response.status_code}: {response.text[:500]!r}")
    return out


def resource_metadata_param(header: str | None) -> str | None:
    """The resource_metadata parameter of a Bearer challenge, if present."""
    if not header:
        return None
    import re

    match = re.search(r'resource_metadata\s*=\s*"([^"]*)"', header) or re.search(
        r"resource_metadata\s*=\s*([^\s,]+)", header
    )
    return match.group(1) if match else None


# --------------------------------------------------------------------------------------------
# The interactive connect scenario
# --------------------------------------------------------------------------------------------

URL_PATTERN = re.compile(r"https?://[^\s\"'<>]+")


def first_url(text: str | None) -> str | None:
    """The first http(s) URL in `text`, without trailing punctuation."""
    match = URL_PATTERN.search(text or "")
    return match.group(0).rstrip(".,;:)]") if match else None


def sent_session(wire: WireLog, start: int, rpc_method: str) -> str | None:
    """The session id the last `rpc_method` request since exchange `start` carried."""
    sent = [e for e in wire.exchanges[start:] if e["rpc_method"] == rpc_method]
    return sent[-1]["sent_session_id"] if sent else None


def failure(exc: BaseException) -> dict[str, Any]:
    """An SDK exception as event fields: its message, its JSON-RPC code, and a -32042 error's link."""
    leaf = find_leaf(exc, MCPError)
    link = None
    data = leaf.data if isinstance(leaf, MCPError) else None
    elicitations = data.get("elicitations") if isinstance(data, dict) else None
    if isinstance(elicitations, list) and elicitations and isinstance(elicitations[0], dict):
        link = elicitations[0].get("url")
    code = leaf.code if isinstance(leaf, MCPError) else None
    return {"isError": False, "error": describe_exception(exc), "code": code, "link": link}


async def connect_list(conn: Connection, client: Client) -> dict[str, Any]:
    """`list`: the tool names, or what went wrong."""
    start = len(conn.wire.exchanges)
    event: dict[str, Any] = {"event": "list", "tools": None, "error": None, "code": None}
    try:
        event["tools"] = [t.name for t in (await client.list_tools()).tools]
    except Exception as exc:  # noqa: BLE001 - reported in the event, not fatal
        fields = failure(exc)
        event["error"], event["code"] = fields["error"], fields["code"]
    event["session"] = sent_session(conn.wire, start, "tools/list")
    return event


async def connect_call(conn: Connection, client: Client, name: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
    """`call NAME [ARGS]`: calls NAME with ARGS (a JSON object, `{}` when absent); the first text,
    and the link in it or in a -32042 error."""
    start = len(conn.wire.exchanges)
    event: dict[str, Any] = {"event": "call", "isError": False, "text": None, "link": None, "error": None, "code": None}
    try:
        result = await client.call_tool(name, args or {})
        first = next((b for b in result.content if getattr(b, "type", None) == "text"), None)
        event["isError"] = bool(result.is_error)
        event["text"] = first.text if first is not None else None
        event["link"] = first_url(event["text"])
    except Exception as exc:  # noqa: BLE001 - reported in the event, not fatal
        event.update(failure(exc))
    event["session"] = sent_session(conn.wire, start, "tools/call")
    return event


async def scenario_connect(opts: Options) -> dict[str, Any]:
    """Interactive: connect, then one command per stdin line (`list`, `call NAME`, `end`), one JSON
    event per stdout line; the report counts the initialize requests and the session ids seen."""
    conn = Connection(opts, Recorder(), elicitation=opts.url_elicitation)
    commands = 0
    async with conn as client:
        while True:
            line = await anyio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
            command, *rest = line.split() or [""]
            if not line or command == "end":  # end of input, or `end`
                break
            if not command:
                continue
            with anyio.fail_after(opts.timeout):
                if command == "list" and not rest:
                    event = await connect_list(conn, client)
                elif command == "call" and len(rest) >= 1:
                    args = json.loads(" ".join(rest[1:])) if len(rest) > 1 else {}
                    event = await connect_call(conn, client, rest[0], args)
                else:
                    raise ScenarioError(f"unknown command {line.strip()!r} (list, call NAME [ARGS], end)")
            emit(event)
            commands += 1
        out = conn.describe(client)
    wire = conn.wire.summary()
    seen = {s for e in conn.wire.exchanges for s in (e.get("sent_session_id"), e.get("session_id")) if s}
    out.update(
        url_elicitation=opts.url_elicitation,
        commands=commands,
        initialize_requests=wire["rpc_methods"].count("initialize"),
        session_ids=sorted(seen),
        wire=wire,
    )
    return out


SCENARIO_FUNCS = {
    "basic": scenario_basic,
    "everything": scenario_everything,
    "progress": scenario_progress,
    "logging": scenario_logging,
    "sampling": scenario_sampling,
    "elicitation": scenario_elicitation,
    "stateless": scenario_stateless,
    "unauthorized": scenario_unauthorized,
    "connect": scenario_connect,
}


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def describe_exception(exc: BaseException) -> str:
    """A one-line description, unwrapping exception groups (anyio task groups raise them)."""
    leaves: list[BaseException] = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for sub in e.exceptions:
                walk(sub)
        else:
            leaves.append(e)

    walk(exc)
    parts = []
    for e in leaves:
        if isinstance(e, MCPError):
            parts.append(f"MCPError {e.code}: {e.message}")
        elif isinstance(e, (ScenarioError, Unsupported)):
            parts.append(str(e))
        else:
            parts.append(f"{type(e).__name__}: {e}")
    return "; ".join(parts) or repr(exc)


def find_leaf(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    if isinstance(exc, kind):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            found = find_leaf(sub, kind)
            if found is not None:
                return found
    return None


def parse_header(value: str) -> tuple[str, str]:
    name, sep, val = value.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"header must look like 'Name: value', got {value!r}")
    return name.strip(), val.strip()


def check_loopback(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    host = parts.hostname
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise ValueError(f"refusing to contact {host!r}: only loopback addresses are allowed")


class ArgumentParser(argparse.ArgumentParser):
    """Usage errors still end with the one JSON line on stdout (exit code 2)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        sys.stderr.write(f"client_driver: {message}\n")
        emit({"ok": False, "error": f"usage: {message}", "exit_code": EXIT_USAGE})
        sys.exit(EXIT_USAGE)


def parse_args(argv: list[str]) -> Options:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url")
    parser.add_argument("scenario", choices=SCENARIOS)
    parser.add_argument("--header", action="append", type=parse_header, default=[], metavar="'Name: value'")
    parser.add_argument("--protocol", default="legacy", help="legacy (default), auto, a handshake revision, or 2026-07-28")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds for the whole scenario (default 30)")
    parser.add_argument("--url-elicitation", action="store_true", help="connect: declare URL-mode elicitation")
    args = parser.parse_args(argv)
    known = ("legacy", "auto", *getattr(mcp_versions, "KNOWN_PROTOCOL_VERSIONS", ()), STATELESS_VERSION)
    if args.protocol not in known:
        parser.error(f"--protocol must be one of {sorted(set(known))}")
    try:
        check_loopback(args.url)
    except ValueError as exc:
        parser.error(str(exc))
    return Options(
        url=args.url,
        scenario=args.scenario,
        headers=args.header,
        protocol=args.protocol,
        timeout=args.timeout,
        url_elicitation=args.url_elicitation,
    )


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


async def run(opts: Options) -> dict[str, Any]:
    if opts.scenario == "connect":
        # It waits for its commands as long as they take; it bounds each one itself.
        return await scenario_connect(opts)
    with anyio.fail_after(opts.timeout):
        return await SCENARIO_FUNCS[opts.scenario](opts)


def main(argv: list[str]) -> int:
    opts = parse_args(argv)
    requested = STATELESS_VERSION if opts.scenario == "stateless" else opts.protocol
    base = {"scenario": opts.scenario, "url": opts.url, "sdk": f"mcp {mcp_version()}", "requested_protocol": requested}
    try:
        result = anyio.run(run, opts)
    except BaseException as exc:  # noqa: BLE001 - report everything, including groups and timeouts
        if isinstance(exc, KeyboardInterrupt):
            raise
        unsupported = find_leaf(exc, Unsupported)
        code = EXIT_UNSUPPORTED if unsupported is not None else EXIT_FAILED
        message = str(unsupported) if unsupported is not None else describe_exception(exc)
        timed_out = unsupported is None and find_leaf(exc, TimeoutError) is not None
        if timed_out:
            message = f"timed out after {opts.timeout}s"
        sys.stderr.write(f"client_driver: {opts.scenario} failed: {message}\n")
        if code == EXIT_FAILED and not timed_out and find_leaf(exc, ScenarioError) is None:
            traceback.print_exception(exc, file=sys.stderr)
        emit({**base, "ok": False, "error": message, "exit_code": code})
        return code
    emit({**base, "ok": True, **result})
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
