#!/usr/bin/env node
// Drive one MCP scenario against a Streamable HTTP endpoint with the official MCP TypeScript SDK.
//
// Usage:
//     client-driver.mjs URL SCENARIO [--header 'Name: value']... [--protocol VERSION] [--timeout SECONDS]
//                       [--debug-url URL] [--transport streamable-http|sse] [--url-elicitation]
//
// The TypeScript twin of tests/python/client_driver.py: same command line, same output, same exit
// codes, so the Rust integration tests can drive both SDKs the same way.
//
// SCENARIO is one of: basic, everything, progress, logging, sampling, elicitation, stateless,
// unauthorized (as in the Python driver), and roots, cancel, list-changed, resume, session,
// concurrent, big, passthrough, legacy-sse (TypeScript only; see the scenario functions below), and
// connect (as in the Python driver: interactive, commands on stdin, see scenarioConnect).
//
// --protocol selects how the SDK client connects:
//     legacy (default)  the initialize handshake (the SDK offers its newest revision, 2025-11-25)
//     2025-06-18 ...    the initialize handshake, offering that handshake-era revision instead
//     auto              the SDK's own choice (this SDK only knows the initialize handshake)
//     2026-07-28        the stateless revision: this SDK does not implement it (exit code 3)
// The `stateless` scenario always uses 2026-07-28.
//
// --debug-url points at the fixture server's /debug/requests (a loopback URL); the passthrough
// scenario then also checks what reached the fixture (through the gateway, the Rust tests know it).
//
// --url-elicitation: the connect scenario declares URL-mode elicitation (capabilities.elicitation.url);
// without it, it declares form mode only. Every other scenario always declares both.
// For the connect scenario, --timeout bounds connecting and each command, not the whole run.
//
// Output: exactly one JSON object, on the last line of stdout, in every case. On success it carries
// "ok": true and the scenario's results; on failure "ok": false and "error", and the error is also
// written to stderr.
//
// Exit codes: 0 success; 1 the scenario failed; 2 bad usage; 3 the installed SDK does not support
// the 2026-07-28 revision.
//
// Only the given URLs are contacted, and only if their host is a loopback address (127.0.0.0/8,
// ::1 or localhost); Node's fetch does not use environment proxy settings.

import { readFileSync } from 'node:fs';
import { createInterface } from 'node:readline';
import { isDeepStrictEqual } from 'node:util';
import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { StreamableHTTPClientTransport } from '@modelcontextprotocol/sdk/client/streamableHttp.js';
import { SSEClientTransport } from '@modelcontextprotocol/sdk/client/sse.js';
import {
  CallToolResultSchema,
  CreateMessageRequestSchema,
  ElicitRequestSchema,
  LATEST_PROTOCOL_VERSION,
  ListRootsRequestSchema,
  LoggingMessageNotificationSchema,
  McpError,
  ResultSchema,
  SUPPORTED_PROTOCOL_VERSIONS,
  ToolListChangedNotificationSchema,
} from '@modelcontextprotocol/sdk/types.js';

const STATELESS_VERSION = '2026-07-28';
const SCENARIOS = [
  'basic', 'everything', 'progress', 'logging', 'sampling', 'elicitation', 'stateless', 'unauthorized',
  'roots', 'cancel', 'list-changed', 'resume', 'session', 'concurrent', 'big', 'passthrough', 'legacy-sse',
  'connect',
];

const EXIT_OK = 0;
const EXIT_FAILED = 1;
const EXIT_USAGE = 2;
const EXIT_UNSUPPORTED = 3;

const SDK_VERSION = JSON.parse(
  readFileSync(new URL('./node_modules/@modelcontextprotocol/sdk/package.json', import.meta.url), 'utf8'),
).version;
const CLIENT_INFO = { name: 'portcullis-node-driver', version: SDK_VERSION };

// Answer values for the elicitation callback, used when the requested schema asks for these fields.
const ELICIT_KNOWN_VALUES = { username: 'alice', email: 'alice@example.com' };

// The roots the `roots` scenario declares.
const ROOTS = [{ uri: 'file:///tmp/portcullis-roots', name: 'r' }];

/** The scenario ran but what came back is not what it expects. */
class ScenarioError extends Error {}
/** The installed SDK cannot do what was asked (exit code 3). */
class Unsupported extends Error {}
class Timeout extends Error {}

// ---------------------------------------------------------------------------------------------
// HTTP plumbing: one fetch wrapper per connection, with the --header values, no redirects, and a
// log of every exchange (JSON-RPC method sent, status, session id) so scenarios can report the wire.
// ---------------------------------------------------------------------------------------------

class WireLog {
  exchanges = [];

  /** A fetch that records each request and its response status. */
  fetch = async (url, init = {}) => {
    const headers = new Headers(init.headers);
    const method = (init.method ?? 'GET').toUpperCase();
    const entry = { http_method: method, rpc_method: null };
    if (method === 'POST' && typeof init.body === 'string') {
      let body = null;
      try {
        body = JSON.parse(init.body);
      } catch {
        // a non-JSON body is just not logged
      }
      if (body && typeof body === 'object' && !Array.isArray(body)) {
        entry.rpc_method = body.method ?? ('id' in body ? 'response' : null);
        const meta = body.params?._meta;
        entry.meta_keys = meta && typeof meta === 'object' ? Object.keys(meta).sort() : [];
      }
    }
    entry.sent_session_id = headers.get('mcp-session-id');
    entry.sent_protocol_version = headers.get('mcp-protocol-version');
    entry.last_event_id = headers.get('last-event-id');
    this.exchanges.push(entry);
    const response = await fetch(url, { ...init, redirect: 'manual' });
    entry.status = response.status;
    entry.session_id = response.headers.get('mcp-session-id');
    return response;
  };

  summary() {
    const e = this.exchanges;
    return {
      rpc_methods: e.filter((x) => x.rpc_method !== null).map((x) => x.rpc_method),
      statuses: e.map((x) => x.status ?? null),
      session_ids: [...new Set(e.map((x) => x.session_id).filter(Boolean))].sort(),
      // The `_meta` keys each JSON-RPC request carried, in order.
      request_meta_keys: e
        .filter((x) => x.rpc_method !== null && x.rpc_method !== 'response')
        .map((x) => [x.rpc_method, x.meta_keys ?? []]),
      protocol_version_headers: [...new Set(e.map((x) => x.sent_protocol_version).filter(Boolean))].sort(),
    };
  }

  /** GET requests that resumed a stream (carried Last-Event-ID). */
  resumptions() {
    return this.exchanges
      .filter((x) => x.http_method === 'GET' && x.last_event_id)
      .map((x) => ({ last_event_id: x.last_event_id, status: x.status ?? null }));
  }
}

// ---------------------------------------------------------------------------------------------
// Client callbacks
// ---------------------------------------------------------------------------------------------

/** Concatenate the text of text content blocks (a single block or a list). */
function contentText(blocks) {
  const list = Array.isArray(blocks) ? blocks : [blocks];
  return list.filter((b) => b?.type === 'text').map((b) => b.text ?? '').join('');
}

class Recorder {
  progress = [];
  logs = [];
  samplingRequests = [];
  elicitationRequests = [];
  rootsRequests = 0;

  onProgress = (p) => {
    this.progress.push({ progress: p.progress, total: p.total ?? null, message: p.message ?? null });
  };

  onLog = ({ params }) => {
    this.logs.push({ level: params.level, logger: params.logger ?? null, data: params.data });
  };

  onSampling = ({ params }) => {
    const userTexts = params.messages.filter((m) => m.role === 'user').map((m) => contentText(m.content));
    const prompt = userTexts.length ? userTexts[userTexts.length - 1] : '';
    const answer = `sampled: ${prompt}`;
    this.samplingRequests.push({ prompt, max_tokens: params.maxTokens, answer });
    return {
      role: 'assistant',
      content: { type: 'text', text: answer },
      model: 'portcullis-test-driver',
      stopReason: 'endTurn',
    };
  };

  onElicitation = ({ params }) => {
    if (params.mode === 'url') {
      this.elicitationRequests.push({ mode: 'url', message: params.message, url: params.url });
      return { action: 'accept' };
    }
    const schema = params.requestedSchema;
    const content = fillSchema(schema);
    this.elicitationRequests.push({ mode: 'form', message: params.message, requested_schema: schema, content });
    return { action: 'accept', content };
  };

  onRoots = () => {
    this.rootsRequests += 1;
    return { roots: ROOTS };
  };
}

/**
 * Build form content that satisfies an elicitation's flat requested schema.
 *
 * Known fields (username, email) get realistic values; otherwise strings are "x" (or a value valid
 * for their format), numbers 1 (clamped into range), booleans true, enums their first option.
 */
function fillSchema(schema) {
  const content = {};
  for (const [name, prop] of Object.entries(schema?.properties ?? {})) {
    content[name] = fillProperty(name, prop && typeof prop === 'object' ? prop : {});
  }
  return content;
}

function firstOption(prop) {
  if (Array.isArray(prop.enum) && prop.enum.length) return prop.enum[0];
  for (const key of ['oneOf', 'anyOf']) {
    for (const option of prop[key] ?? []) {
      if (option && typeof option === 'object' && 'const' in option) return option.const;
    }
  }
  return undefined;
}

function fillProperty(name, prop) {
  const kind = prop.type;
  if (kind === 'array') {
    const items = prop.items && typeof prop.items === 'object' ? prop.items : {};
    const option = firstOption(items);
    return option !== undefined ? [option] : ['x'];
  }
  const option = firstOption(prop);
  if (option !== undefined) return option;
  if (kind === 'number' || kind === 'integer') {
    let value = 1;
    if (typeof prop.minimum === 'number' && value < prop.minimum) value = prop.minimum;
    if (typeof prop.maximum === 'number' && value > prop.maximum) value = prop.maximum;
    return kind === 'integer' ? Math.trunc(value) : value;
  }
  if (kind === 'boolean') return true;
  // string (or untyped)
  if (typeof ELICIT_KNOWN_VALUES[name] === 'string') return ELICIT_KNOWN_VALUES[name];
  let value = {
    email: 'x@example.com',
    uri: 'https://example.com/x',
    date: '2000-01-01',
    'date-time': '2000-01-01T00:00:00Z',
  }[prop.format] ?? 'x';
  if (Number.isInteger(prop.minLength) && value.length < prop.minLength) value += 'x'.repeat(prop.minLength - value.length);
  return value;
}

// ---------------------------------------------------------------------------------------------
// Connecting
// ---------------------------------------------------------------------------------------------

const isStateless = (protocol) => protocol !== 'legacy' && protocol !== 'auto' && !SUPPORTED_PROTOCOL_VERSIONS.includes(protocol);

/** An SDK `Client` connected over Streamable HTTP (or legacy SSE), negotiated as `protocol` asks. */
class Connection {
  constructor(opts, recorder, { protocol, roots = false, sse = false, urlElicitation = true } = {}) {
    this.opts = opts;
    this.protocol = protocol ?? opts.protocol;
    this.recorder = recorder;
    this.roots = roots;
    this.urlElicitation = urlElicitation;
    // --transport sse runs any scenario over the legacy HTTP+SSE transport.
    this.sse = sse || opts.transport === 'sse';
    this.wire = new WireLog();
    this.negotiated = null;
    this.client = null;
    this.transport = null;
  }

  async open() {
    const protocol = this.protocol;
    if (isStateless(protocol)) {
      throw new Unsupported(
        `@modelcontextprotocol/sdk ${SDK_VERSION} does not support protocol ${protocol} ` +
          `(its revisions: ${JSON.stringify(SUPPORTED_PROTOCOL_VERSIONS)})`,
      );
    }
    const elicitation = this.urlElicitation ? { form: {}, url: {} } : { form: {} };
    const capabilities = { sampling: {}, elicitation };
    if (this.roots) capabilities.roots = { listChanged: true };
    const client = new Client(CLIENT_INFO, { capabilities });
    client.setRequestHandler(CreateMessageRequestSchema, this.recorder.onSampling);
    client.setRequestHandler(ElicitRequestSchema, this.recorder.onElicitation);
    client.setNotificationHandler(LoggingMessageNotificationSchema, this.recorder.onLog);
    if (this.roots) client.setRequestHandler(ListRootsRequestSchema, this.recorder.onRoots);

    const transportOpts = {
      requestInit: { headers: Object.fromEntries(this.opts.headers) },
      fetch: this.wire.fetch,
    };
    const url = new URL(this.opts.url);
    const transport = this.sse
      ? new SSEClientTransport(url, transportOpts)
      : new StreamableHTTPClientTransport(url, transportOpts);

    // The SDK's initialize always offers LATEST_PROTOCOL_VERSION; to act as an older client,
    // offer the requested handshake-era revision instead.
    const offered = protocol === 'legacy' || protocol === 'auto' ? null : protocol;
    const send = transport.send.bind(transport);
    transport.send = (message, options) => {
      if (offered && message?.method === 'initialize') {
        message = { ...message, params: { ...message.params, protocolVersion: offered } };
      }
      return send(message, options);
    };
    // The client tells HTTP transports the negotiated version once initialize has succeeded.
    const setProtocolVersion = transport.setProtocolVersion?.bind(transport);
    transport.setProtocolVersion = (version) => {
      this.negotiated = version;
      setProtocolVersion?.(version);
    };

    this.client = client;
    this.transport = transport;
    await client.connect(transport, { timeout: this.opts.timeout * 1000 });
    return client;
  }

  async close() {
    await this.client?.close().catch(() => {});
  }

  describe() {
    return {
      protocol_version: this.negotiated,
      mode: 'initialize',
      server_info: this.client.getServerVersion() ?? null,
    };
  }

  /** Per-request options: the scenario timeout instead of the SDK's 60 s default. */
  get reqOpts() {
    return { timeout: this.opts.timeout * 1000 };
  }
}

/** Open a connection, run `body(client, conn)`, always close. */
async function withConnection(conn, body) {
  try {
    const client = await conn.open();
    return await body(client, conn);
  } finally {
    await conn.close();
  }
}

// ---------------------------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------------------------

function toolResult(result) {
  const out = { is_error: Boolean(result.isError), text: contentText(result.content ?? []) };
  if (result.structuredContent !== undefined) out.structured_content = result.structuredContent;
  return out;
}

function expectOk(name, result) {
  if (result.isError) throw new ScenarioError(`tool ${name} returned isError: ${JSON.stringify(contentText(result.content ?? []))}`);
}

async function callTool(conn, name, args, extra = {}) {
  return conn.client.callTool({ name, arguments: args }, CallToolResultSchema, { ...conn.reqOpts, ...extra });
}

/**
 * Arguments for tool `name` that satisfy its listed input schema: `preferred` values for the
 * properties the schema has, any other required property filled generically (see fillProperty).
 */
async function argumentsFor(conn, name, preferred) {
  const { tools } = await conn.client.listTools(undefined, conn.reqOpts);
  const tool = tools.find((t) => t.name === name);
  if (!tool) throw new ScenarioError(`tool ${name} is not listed (tools: ${JSON.stringify(tools.map((t) => t.name))})`);
  const props = tool.inputSchema?.properties ?? {};
  const args = Object.fromEntries(Object.entries(preferred).filter(([key]) => key in props));
  for (const key of tool.inputSchema?.required ?? []) {
    if (!(key in args)) args[key] = fillProperty(key, props[key] && typeof props[key] === 'object' ? props[key] : {});
  }
  return args;
}

async function scenarioBasic(opts) {
  const conn = new Connection(opts, new Recorder());
  const out = await withConnection(conn, async (client) => {
    const out = conn.describe();
    out.tools = (await client.listTools(undefined, conn.reqOpts)).tools.map((t) => t.name);
    const echo = await callTool(conn, 'echo', { text: 'hello' });
    expectOk('echo', echo);
    out.echo = contentText(echo.content);
    const resource = await client.readResource({ uri: 'test://static-text' }, conn.reqOpts);
    out.resource = resource.contents.map((c) => ({ uri: c.uri, mime_type: c.mimeType ?? null, text: c.text ?? null }));
    const prompt = await client.getPrompt({ name: 'test_simple_prompt' }, conn.reqOpts);
    out.prompt = prompt.messages.map((m) => ({ role: m.role, text: contentText(m.content) }));
    return out;
  });
  out.wire = conn.wire.summary();
  if (out.echo !== 'hello') throw new ScenarioError(`echo returned ${JSON.stringify(out.echo)}, expected 'hello'`);
  return out;
}

/** Against @modelcontextprotocol/server-everything: list its tools and call its echo. */
async function scenarioEverything(opts) {
  const conn = new Connection(opts, new Recorder());
  const out = await withConnection(conn, async (client) => {
    const out = conn.describe();
    out.tools = (await client.listTools(undefined, conn.reqOpts)).tools.map((t) => t.name);
    const echo = await callTool(conn, 'echo', { message: 'hello' });
    expectOk('echo', echo);
    out.echo = contentText(echo.content);
    return out;
  });
  out.wire = conn.wire.summary();
  return out;
}

async function scenarioProgress(opts) {
  const recorder = new Recorder();
  const conn = new Connection(opts, recorder);
  const out = await withConnection(conn, async () => {
    const out = conn.describe();
    const result = await callTool(conn, 'test_tool_with_progress', {}, { onprogress: recorder.onProgress });
    expectOk('test_tool_with_progress', result);
    out.result = toolResult(result);
    return out;
  });
  out.progress = recorder.progress.map((p) => p.progress);
  out.progress_notifications = recorder.progress;
  out.wire = conn.wire.summary();
  if (!recorder.progress.length) throw new ScenarioError('no progress notification was received');
  return out;
}

async function scenarioLogging(opts) {
  const recorder = new Recorder();
  const conn = new Connection(opts, recorder);
  const out = await withConnection(conn, async (client) => {
    const out = conn.describe();
    out.set_level = { via: 'logging/setLevel', level: 'debug', error: null };
    try {
      await client.setLoggingLevel('debug', conn.reqOpts);
    } catch (err) {
      // Reported, not fatal: whether log notifications arrive is what this scenario checks.
      out.set_level.error = describeError(err);
    }
    const result = await callTool(conn, 'test_tool_with_logging', {});
    expectOk('test_tool_with_logging', result);
    out.result = toolResult(result);
    return out;
  });
  out.logs = recorder.logs.map((l) => l.data);
  out.log_notifications = recorder.logs;
  out.wire = conn.wire.summary();
  if (!recorder.logs.length) throw new ScenarioError('no log notification was received');
  return out;
}

async function scenarioSampling(opts) {
  const recorder = new Recorder();
  const conn = new Connection(opts, recorder);
  const out = await withConnection(conn, async () => {
    const out = conn.describe();
    const result = await callTool(conn, 'test_sampling', { prompt: 'hi' });
    expectOk('test_sampling', result);
    out.result = toolResult(result);
    return out;
  });
  out.sampling_requests = recorder.samplingRequests;
  out.wire = conn.wire.summary();
  if (!recorder.samplingRequests.length) throw new ScenarioError('the server sent no sampling/createMessage request');
  if (!out.result.text.includes('sampled: hi')) {
    throw new ScenarioError(`tool result does not carry the sampled text: ${JSON.stringify(out.result.text)}`);
  }
  return out;
}

async function scenarioElicitation(opts) {
  const recorder = new Recorder();
  const conn = new Connection(opts, recorder);
  const out = await withConnection(conn, async () => {
    const out = conn.describe();
    const args = await argumentsFor(conn, 'test_elicitation', { message: 'Please provide your information' });
    out.arguments = args;
    const result = await callTool(conn, 'test_elicitation', args);
    expectOk('test_elicitation', result);
    out.result = toolResult(result);
    return out;
  });
  out.elicitation_requests = recorder.elicitationRequests;
  out.wire = conn.wire.summary();
  if (!recorder.elicitationRequests.length) throw new ScenarioError('the server sent no elicitation/create request');
  return out;
}

async function scenarioStateless() {
  throw new Unsupported(
    `@modelcontextprotocol/sdk ${SDK_VERSION} does not support the stateless ${STATELESS_VERSION} revision ` +
      `(known revisions: ${JSON.stringify(SUPPORTED_PROTOCOL_VERSIONS)})`,
  );
}

async function scenarioUnauthorized(opts) {
  const out = {};
  // 1. Through the SDK: the connection must fail. The SDK does not expose the HTTP status of a
  //    failed initialize, so 2. asks again with fetch directly.
  let connectedWith = null;
  const conn = new Connection(opts, new Recorder());
  try {
    await conn.open();
    connectedWith = conn.negotiated ?? 'unknown';
  } catch (err) {
    out.sdk_error = describeError(err);
  } finally {
    await conn.close();
  }
  if (connectedWith !== null) throw new ScenarioError(`the SDK connected (protocol ${connectedWith}); expected HTTP 401`);

  let body;
  let extra = {};
  if (isStateless(opts.protocol)) {
    body = {
      jsonrpc: '2.0',
      id: 1,
      method: 'server/discover',
      params: {
        _meta: {
          'io.modelcontextprotocol/protocolVersion': opts.protocol,
          'io.modelcontextprotocol/clientInfo': { name: CLIENT_INFO.name, version: '0' },
          'io.modelcontextprotocol/clientCapabilities': {},
        },
      },
    };
    extra = { 'MCP-Protocol-Version': opts.protocol, 'Mcp-Method': 'server/discover' };
  } else {
    body = {
      jsonrpc: '2.0',
      id: 1,
      method: 'initialize',
      params: { protocolVersion: LATEST_PROTOCOL_VERSION, capabilities: {}, clientInfo: { name: CLIENT_INFO.name, version: '0' } },
    };
  }
  const response = await rawPost(opts, new WireLog(), body, extra);
  const text = await response.text();
  out.status = response.status;
  out.www_authenticate = response.headers.get('www-authenticate');
  out.resource_metadata = resourceMetadataParam(out.www_authenticate);
  if (response.status !== 401) throw new ScenarioError(`expected HTTP 401, got ${response.status}: ${JSON.stringify(text.slice(0, 500))}`);
  return out;
}

/** A JSON-RPC POST to the scenario URL with fetch, outside the SDK. */
function rawPost(opts, wire, body, extraHeaders = {}) {
  return wire.fetch(opts.url, {
    method: 'POST',
    headers: {
      ...Object.fromEntries(opts.headers),
      'Content-Type': 'application/json',
      Accept: 'application/json, text/event-stream',
      ...extraHeaders,
    },
    body: JSON.stringify(body),
    signal: AbortSignal.timeout(opts.timeout * 1000),
  });
}

/** The resource_metadata parameter of a Bearer challenge, if present. */
function resourceMetadataParam(header) {
  if (!header) return null;
  const match = /resource_metadata\s*=\s*"([^"]*)"/.exec(header) ?? /resource_metadata\s*=\s*([^\s,]+)/.exec(header);
  return match ? match[1] : null;
}

/** The client declares roots; the server's `roots` tool asks for them with roots/list. */
async function scenarioRoots(opts) {
  const recorder = new Recorder();
  const conn = new Connection(opts, recorder, { roots: true });
  const out = await withConnection(conn, async () => {
    const out = conn.describe();
    const result = await callTool(conn, 'roots', {});
    expectOk('roots', result);
    out.result = toolResult(result);
    return out;
  });
  out.roots_declared = ROOTS;
  out.roots_seen = out.result.structured_content?.roots ?? null;
  out.roots_list_requests = recorder.rootsRequests;
  out.wire = conn.wire.summary();
  if (!recorder.rootsRequests) throw new ScenarioError('the server sent no roots/list request');
  if (!isDeepStrictEqual(out.roots_seen, ROOTS)) {
    throw new ScenarioError(`the server saw roots ${JSON.stringify(out.roots_seen)}, expected ${JSON.stringify(ROOTS)}`);
  }
  return out;
}

/** Cancel a `slow` call through an AbortSignal, then show the session still answers. */
async function scenarioCancel(opts) {
  const conn = new Connection(opts, new Recorder());
  const out = await withConnection(conn, async () => {
    const out = conn.describe();
    const abort = new AbortController();
    const started = Date.now();
    const reason = `cancelled by client-driver ${process.pid}`;
    const timer = setTimeout(() => abort.abort(reason), 300);
    let outcome;
    try {
      const result = await callTool(conn, 'slow', { ms: 5000 }, { signal: abort.signal });
      outcome = { resolved: toolResult(result) };
    } catch (err) {
      outcome = { rejected: err };
    } finally {
      clearTimeout(timer);
    }
    out.elapsed_ms = Date.now() - started;
    if (outcome.resolved) throw new ScenarioError(`the cancelled call resolved after ${out.elapsed_ms} ms: ${JSON.stringify(outcome.resolved)}`);
    out.rejection = describeError(outcome.rejected);
    // The SDK rejects with McpError(RequestTimeout, String(reason)) and sends the same reason in
    // notifications/cancelled; the reason string tells a cancellation from a real timeout.
    out.cancelled = abort.signal.aborted && String(outcome.rejected?.message ?? outcome.rejected).includes(reason);
    if (!out.cancelled) throw new ScenarioError(`the call failed, but not as cancelled: ${out.rejection}`);
    // Give the cancellation notification time to reach the server, then use the same session.
    await new Promise((resolve) => setTimeout(resolve, 100));
    const echo = await callTool(conn, 'echo', { text: 'after cancel' });
    expectOk('echo', echo);
    out.echo_after = contentText(echo.content);
    out.session_id = conn.transport.sessionId ?? null;
    return out;
  });
  const cancelPosts = conn.wire.exchanges.filter((e) => e.rpc_method === 'notifications/cancelled');
  out.cancelled_notification_statuses = cancelPosts.map((e) => e.status ?? null);
  out.wire = conn.wire.summary();
  if (!cancelPosts.length) throw new ScenarioError('the SDK sent no notifications/cancelled');
  if (out.echo_after !== 'after cancel') throw new ScenarioError(`echo after cancel returned ${JSON.stringify(out.echo_after)}`);
  return out;
}

/**
 * add_tool makes the server send notifications/tools/list_changed: to the caller (on the call's
 * own stream) and to every other live session (on its standalone GET stream). A second session,
 * the observer, reports the latter; only the caller's notification is required.
 */
async function scenarioListChanged(opts) {
  const waitFor = (promise, ms) =>
    Promise.race([promise.then(() => true), new Promise((resolve) => setTimeout(() => resolve(false), ms).unref())]);
  const notified = (client) =>
    new Promise((resolve) => client.setNotificationHandler(ToolListChangedNotificationSchema, () => resolve()));

  const observer = new Connection(opts, new Recorder());
  const conn = new Connection(opts, new Recorder());
  try {
    const observerClient = await observer.open();
    const observerNotified = notified(observerClient);
    const out = await withConnection(conn, async (client) => {
      const out = conn.describe();
      const callerNotified = notified(client);
      const name = `driver_tool_${process.pid}_${Date.now()}`;
      out.added_tool = name;
      const result = await callTool(conn, 'add_tool', { name });
      expectOk('add_tool', result);
      out.notification_received = await waitFor(callerNotified, 5000);
      out.tools = (await client.listTools(undefined, conn.reqOpts)).tools.map((t) => t.name);
      out.added_tool_listed = out.tools.includes(name);
      out.observer = { notification_received: await waitFor(observerNotified, 2000) };
      return out;
    });
    out.get_stream_statuses = conn.wire.exchanges.filter((e) => e.http_method === 'GET').map((e) => e.status ?? null);
    out.observer.get_stream_statuses = observer.wire.exchanges.filter((e) => e.http_method === 'GET').map((e) => e.status ?? null);
    out.wire = conn.wire.summary();
    if (!out.notification_received) throw new ScenarioError('no notifications/tools/list_changed within 5 s');
    if (!out.added_tool_listed) throw new ScenarioError(`tools/list does not show ${out.added_tool}: ${JSON.stringify(out.tools)}`);
    return out;
  } finally {
    await observer.close();
  }
}

/** test_reconnection: the server closes the POST stream mid-call, the SDK resumes with GET + Last-Event-ID. */
async function scenarioResume(opts) {
  const conn = new Connection(opts, new Recorder());
  const out = await withConnection(conn, async () => {
    const out = conn.describe();
    const result = await callTool(conn, 'test_reconnection', {});
    expectOk('test_reconnection', result);
    out.result = toolResult(result);
    return out;
  });
  out.resumptions = conn.wire.resumptions();
  out.resumed = out.resumptions.length > 0;
  out.wire = conn.wire.summary();
  const expected = 'Reconnection test completed successfully';
  if (out.result.text !== expected) throw new ScenarioError(`test_reconnection returned ${JSON.stringify(out.result.text)}`);
  return out;
}

/** Open a session, use it, DELETE it, and show that the old session id now gets 404. */
async function scenarioSession(opts) {
  const conn = new Connection(opts, new Recorder());
  const out = await withConnection(conn, async () => {
    const out = conn.describe();
    out.session_id = conn.transport.sessionId ?? null;
    if (!out.session_id) throw new ScenarioError('the server issued no Mcp-Session-Id');
    const echo = await callTool(conn, 'echo', { text: 'in session' });
    expectOk('echo', echo);
    out.echo = contentText(echo.content);
    await conn.transport.terminateSession();
    return out;
  });
  const deletes = conn.wire.exchanges.filter((e) => e.http_method === 'DELETE');
  out.delete_status = deletes.length ? deletes[deletes.length - 1].status ?? null : null;
  const wire = new WireLog();
  const after = await rawPost(opts, wire, { jsonrpc: '2.0', id: 99, method: 'tools/list', params: {} }, {
    'Mcp-Session-Id': out.session_id,
    'MCP-Protocol-Version': out.protocol_version ?? LATEST_PROTOCOL_VERSION,
  });
  out.after_status = after.status;
  out.after_body = (await after.text()).slice(0, 500);
  out.wire = conn.wire.summary();
  if (out.echo !== 'in session') throw new ScenarioError(`echo returned ${JSON.stringify(out.echo)}`);
  if (out.delete_status === null || out.delete_status < 200 || out.delete_status > 299) {
    throw new ScenarioError(`DELETE answered ${out.delete_status}, expected 2xx`);
  }
  if (out.after_status !== 404) {
    throw new ScenarioError(
      `a request with the terminated session id got ${out.after_status}, expected 404 ` +
        `(DELETE answered ${out.delete_status}; body ${JSON.stringify(out.after_body.slice(0, 200))})`,
    );
  }
  return out;
}

/** 20 concurrent echo calls on one session; every answer must match its own request. */
async function scenarioConcurrent(opts) {
  const N = 20;
  const conn = new Connection(opts, new Recorder());
  const out = await withConnection(conn, async () => {
    const out = conn.describe();
    const texts = Array.from({ length: N }, (_, i) => `concurrent-${i}-${Math.random().toString(36).slice(2, 10)}`);
    const results = await Promise.all(texts.map((text, i) => callTool(conn, 'echo', { text, i })));
    out.mismatches = [];
    results.forEach((result, i) => {
      const got = contentText(result.content);
      const structured = result.structuredContent;
      if (result.isError || got !== texts[i] || structured?.text !== texts[i] || structured?.i !== i) {
        out.mismatches.push({ index: i, sent: texts[i], got, structured_content: structured ?? null });
      }
    });
    out.calls = N;
    out.matched = N - out.mismatches.length;
    out.session_id = conn.transport.sessionId ?? null;
    return out;
  });
  out.session_ids_seen = [...new Set(conn.wire.exchanges.map((e) => e.sent_session_id).filter(Boolean))];
  out.wire = conn.wire.summary();
  if (out.mismatches.length) throw new ScenarioError(`${out.mismatches.length} of ${N} answers do not match their request`);
  return out;
}

async function scenarioBig(opts) {
  const BYTES = 1048576;
  const conn = new Connection(opts, new Recorder());
  const out = await withConnection(conn, async () => {
    const out = conn.describe();
    const started = Date.now();
    const result = await callTool(conn, 'big', { bytes: BYTES });
    out.elapsed_ms = Date.now() - started;
    expectOk('big', result);
    const text = contentText(result.content);
    out.requested = BYTES;
    out.received = text.length;
    out.all_x = /^x*$/.test(text);
    return out;
  });
  out.wire = conn.wire.summary();
  if (out.received !== BYTES || !out.all_x) throw new ScenarioError(`big returned ${out.received} bytes (all 'x': ${out.all_x}), expected ${BYTES}`);
  return out;
}

/**
 * A tools/call carrying fields nobody knows: an unknown params member, an unknown argument and an
 * unknown _meta key. The fixture's echo reflects the arguments in structuredContent and the request
 * _meta in result._meta.requestMeta; the params member is only visible in the fixture's request
 * record (--debug-url).
 */
async function scenarioPassthrough(opts) {
  const nonce = `passthrough-${process.pid}-${Date.now()}`;
  const vendorExt = { keep: true };
  const unknownArg = { nested: [1, 'two', { three: null }] };
  const vendorMeta = { kept: 'yes' };
  const conn = new Connection(opts, new Recorder());
  const out = await withConnection(conn, async (client) => {
    const out = conn.describe();
    const params = {
      name: 'echo',
      arguments: { text: nonce, 'x-unknown-arg': unknownArg },
      'x-vendor-ext': vendorExt,
      _meta: { 'x-vendor-meta': vendorMeta },
    };
    // request() with the loose base result schema: nothing in the answer is stripped or checked.
    const result = await client.request({ method: 'tools/call', params }, ResultSchema, conn.reqOpts);
    out.sent_params = params;
    out.result = result;
    return out;
  });
  out.echo = contentText(out.result.content ?? []);
  out.argument_reflected = isDeepStrictEqual(out.result.structuredContent?.['x-unknown-arg'], unknownArg);
  out.meta_reflected = isDeepStrictEqual(out.result._meta?.requestMeta?.['x-vendor-meta'], vendorMeta);
  out.params_field_upstream = null; // not observable without --debug-url
  if (opts.debugUrl) {
    const response = await fetch(opts.debugUrl, { signal: AbortSignal.timeout(opts.timeout * 1000), redirect: 'manual' });
    if (!response.ok) throw new ScenarioError(`--debug-url answered ${response.status}`);
    const recorded = await response.json();
    const call = recorded.find((r) => r.body?.method === 'tools/call' && r.body?.params?.arguments?.text === nonce);
    out.upstream_request = call ? { path: call.path, params: call.body.params } : null;
    out.params_field_upstream = call ? isDeepStrictEqual(call.body.params['x-vendor-ext'], vendorExt) : false;
  }
  out.wire = conn.wire.summary();
  if (out.echo !== nonce) throw new ScenarioError(`echo returned ${JSON.stringify(out.echo)}, expected ${nonce}`);
  const lost = [
    !out.argument_reflected && 'the unknown argument',
    !out.meta_reflected && 'the unknown _meta key',
    out.params_field_upstream === false && 'the unknown params field',
  ].filter(Boolean);
  if (lost.length) throw new ScenarioError(`lost on the way: ${lost.join(', ')}`);
  return out;
}

/** The legacy HTTP+SSE transport: GET the SSE endpoint, POST to the endpoint it names. */
async function scenarioLegacySse(opts) {
  const conn = new Connection(opts, new Recorder(), { sse: true });
  const out = await withConnection(conn, async (client) => {
    const out = conn.describe();
    out.transport = 'sse';
    out.endpoint = conn.transport._endpoint?.href ?? null; // where the server told us to POST
    out.tools = (await client.listTools(undefined, conn.reqOpts)).tools.map((t) => t.name);
    const echo = await callTool(conn, 'echo', { text: 'legacy' });
    expectOk('echo', echo);
    out.echo = contentText(echo.content);
    return out;
  });
  out.wire = conn.wire.summary();
  if (out.echo !== 'legacy') throw new ScenarioError(`echo returned ${JSON.stringify(out.echo)}, expected 'legacy'`);
  return out;
}

// ---------------------------------------------------------------------------------------------
// The interactive connect scenario
// ---------------------------------------------------------------------------------------------

/** The first http(s) URL in `text`, without trailing punctuation. */
function firstUrl(text) {
  const match = /https?:\/\/[^\s"'<>]+/.exec(text ?? '');
  return match ? match[0].replace(/[.,;:)\]]+$/, '') : null;
}

/** The session id the last `rpcMethod` request since exchange `from` carried. */
function sentSession(wire, from, rpcMethod) {
  const sent = wire.exchanges.slice(from).filter((e) => e.rpc_method === rpcMethod);
  return sent.length ? sent[sent.length - 1].sent_session_id ?? null : null;
}

/** An SDK exception as event fields: its message, its JSON-RPC code, and a -32042 error's link. */
function failure(err) {
  const rpc = err instanceof McpError;
  return {
    isError: false,
    error: describeError(err),
    code: rpc ? err.code : null,
    link: rpc ? err.data?.elicitations?.[0]?.url ?? null : null,
  };
}

/** `list`: the tool names, or what went wrong. */
async function connectList(conn) {
  const from = conn.wire.exchanges.length;
  const event = { event: 'list', tools: null, error: null, code: null };
  try {
    event.tools = (await conn.client.listTools(undefined, conn.reqOpts)).tools.map((t) => t.name);
  } catch (err) {
    const { error, code } = failure(err);
    Object.assign(event, { error, code });
  }
  event.session = sentSession(conn.wire, from, 'tools/list');
  return event;
}

/**
 * `call NAME [ARGS]`: calls NAME with ARGS (a JSON object, `{}` when absent); the first text, and
 * the link in it or in a -32042 error.
 */
async function connectCall(conn, name, args = {}) {
  const from = conn.wire.exchanges.length;
  const event = { event: 'call', isError: false, text: null, link: null, error: null, code: null };
  try {
    const result = await callTool(conn, name, args);
    const first = (result.content ?? []).find((b) => b?.type === 'text');
    event.isError = Boolean(result.isError);
    event.text = first?.text ?? null;
    event.link = firstUrl(event.text);
  } catch (err) {
    Object.assign(event, failure(err));
  }
  event.session = sentSession(conn.wire, from, 'tools/call');
  return event;
}

/**
 * Interactive: connect, then one command per stdin line (`list`, `call NAME`, `end`), one JSON
 * event per stdout line; the report counts the initialize requests and the session ids seen.
 */
async function scenarioConnect(opts) {
  const conn = new Connection(opts, new Recorder(), { urlElicitation: opts.urlElicitation });
  try {
    await withDeadline(conn.open(), opts.timeout);
    let commands = 0;
    for await (const line of createInterface({ input: process.stdin, crlfDelay: Infinity })) {
      const [command, ...rest] = line.trim().split(/\s+/);
      if (command === 'end') break;
      if (!command) continue;
      let act;
      if (command === 'list' && !rest.length) act = connectList(conn);
      else if (command === 'call' && rest.length >= 1) {
        act = connectCall(conn, rest[0], rest.length > 1 ? JSON.parse(rest.slice(1).join(' ')) : {});
      } else throw new ScenarioError(`unknown command ${JSON.stringify(line)} (list, call NAME [ARGS], end)`);
      await emit(await withDeadline(act, opts.timeout));
      commands += 1;
    }
    const wire = conn.wire.summary();
    const seen = conn.wire.exchanges.flatMap((e) => [e.sent_session_id, e.session_id]).filter(Boolean);
    return {
      ...conn.describe(),
      url_elicitation: opts.urlElicitation,
      commands,
      initialize_requests: wire.rpc_methods.filter((m) => m === 'initialize').length,
      session_ids: [...new Set(seen)].sort(),
      wire,
    };
  } finally {
    await conn.close();
  }
}

const SCENARIO_FUNCS = {
  basic: scenarioBasic,
  everything: scenarioEverything,
  progress: scenarioProgress,
  logging: scenarioLogging,
  sampling: scenarioSampling,
  elicitation: scenarioElicitation,
  stateless: scenarioStateless,
  unauthorized: scenarioUnauthorized,
  roots: scenarioRoots,
  cancel: scenarioCancel,
  'list-changed': scenarioListChanged,
  resume: scenarioResume,
  session: scenarioSession,
  concurrent: scenarioConcurrent,
  big: scenarioBig,
  passthrough: scenarioPassthrough,
  'legacy-sse': scenarioLegacySse,
  connect: scenarioConnect,
};

// ---------------------------------------------------------------------------------------------
// Entry point
// ---------------------------------------------------------------------------------------------

/** A one-line description of an error. */
function describeError(err) {
  if (err instanceof McpError) return `McpError ${err.code}: ${err.message.replace(/^MCP error -?\d+: /, '')}`;
  if (err instanceof ScenarioError || err instanceof Unsupported || err instanceof Timeout) return err.message;
  if (err instanceof Error) {
    const code = err.code !== undefined ? ` (code ${err.code})` : '';
    const cause = err.cause instanceof Error ? ` (cause: ${err.cause.message})` : '';
    return `${err.name}: ${err.message}${code}${cause}`;
  }
  return String(err);
}

function parseHeader(value) {
  const sep = value.indexOf(':');
  const name = sep < 0 ? '' : value.slice(0, sep).trim();
  if (!name) throw new UsageError(`header must look like 'Name: value', got ${JSON.stringify(value)}`);
  return [name, value.slice(sep + 1).trim()];
}

function isLoopbackHost(host) {
  if (host === 'localhost') return true;
  if (host === '[::1]') return true;
  const m = /^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})$/.exec(host);
  return Boolean(m) && m.slice(1).every((o) => Number(o) <= 255) && Number(m[1]) === 127;
}

function checkLoopback(url) {
  let parsed;
  try {
    parsed = new URL(url);
  } catch {
    throw new UsageError(`not an http(s) URL: ${JSON.stringify(url)}`);
  }
  if (!['http:', 'https:'].includes(parsed.protocol) || !parsed.hostname) throw new UsageError(`not an http(s) URL: ${JSON.stringify(url)}`);
  if (!isLoopbackHost(parsed.hostname.toLowerCase())) {
    throw new UsageError(`refusing to contact ${JSON.stringify(parsed.hostname)}: only loopback addresses are allowed`);
  }
}

class UsageError extends Error {}

const USAGE =
  "usage: client-driver.mjs URL SCENARIO [--header 'Name: value']... [--protocol VERSION] [--timeout SECONDS] [--debug-url URL] [--transport streamable-http|sse] [--url-elicitation]";

function parseArgs(argv) {
  const positional = [];
  const opts = {
    headers: [], protocol: 'legacy', timeout: 30, debugUrl: null, transport: 'streamable-http', urlElicitation: false,
  };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    const value = () => {
      if (i + 1 >= argv.length) throw new UsageError(`argument ${arg}: expected one argument`);
      return argv[++i];
    };
    if (arg === '--header') opts.headers.push(parseHeader(value()));
    else if (arg.startsWith('--header=')) opts.headers.push(parseHeader(arg.slice(9)));
    else if (arg === '--protocol') opts.protocol = value();
    else if (arg.startsWith('--protocol=')) opts.protocol = arg.slice(11);
    else if (arg === '--timeout' || arg.startsWith('--timeout=')) {
      const raw = arg === '--timeout' ? value() : arg.slice(10);
      opts.timeout = Number(raw);
      if (!Number.isFinite(opts.timeout) || opts.timeout <= 0) throw new UsageError(`argument --timeout: invalid value ${JSON.stringify(raw)}`);
    } else if (arg === '--transport') {
      opts.transport = value();
      if (!['streamable-http', 'sse'].includes(opts.transport)) throw new UsageError(`--transport must be streamable-http or sse`);
    } else if (arg === '--url-elicitation') opts.urlElicitation = true;
    else if (arg === '--debug-url') opts.debugUrl = value();
    else if (arg.startsWith('--debug-url=')) opts.debugUrl = arg.slice(12);
    else if (arg === '-h' || arg === '--help') {
      process.stdout.write(`${USAGE}\n`);
      process.exit(EXIT_OK);
    } else if (arg.startsWith('--') && arg.length > 2) throw new UsageError(`unrecognized arguments: ${arg}`);
    else positional.push(arg);
  }
  if (positional.length < 2) throw new UsageError('the following arguments are required: url, scenario');
  if (positional.length > 2) throw new UsageError(`unrecognized arguments: ${positional.slice(2).join(' ')}`);
  [opts.url, opts.scenario] = positional;
  if (!SCENARIOS.includes(opts.scenario)) {
    throw new UsageError(`argument scenario: invalid choice: ${JSON.stringify(opts.scenario)} (choose from ${SCENARIOS.join(', ')})`);
  }
  const known = new Set(['legacy', 'auto', ...SUPPORTED_PROTOCOL_VERSIONS, STATELESS_VERSION]);
  if (!known.has(opts.protocol)) throw new UsageError(`--protocol must be one of ${JSON.stringify([...known].sort())}`);
  checkLoopback(opts.url);
  if (opts.debugUrl) checkLoopback(opts.debugUrl);
  return opts;
}

/** JSON as Python's json.dumps(sort_keys=True) writes it: sorted keys, ", " and ": ", ASCII only. */
function pyJson(value) {
  const walk = (v) => {
    if (v === null || v === undefined || typeof v === 'function') return 'null';
    if (typeof v === 'number') return Number.isFinite(v) ? JSON.stringify(v) : 'null';
    if (typeof v === 'bigint') return v.toString();
    if (typeof v === 'string' || typeof v === 'boolean') return JSON.stringify(v);
    if (v instanceof Error) return JSON.stringify(describeError(v));
    if (Array.isArray(v)) return `[${v.map(walk).join(', ')}]`;
    if (typeof v.toJSON === 'function') return walk(v.toJSON());
    const keys = Object.keys(v).filter((k) => v[k] !== undefined && typeof v[k] !== 'function').sort();
    return `{${keys.map((k) => `${JSON.stringify(k)}: ${walk(v[k])}`).join(', ')}}`;
  };
  return walk(value).replace(/[\u007f-\uffff]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`);
}

function emit(obj) {
  return new Promise((resolve) => process.stdout.write(`${pyJson(obj)}\n`, resolve));
}

const pySeconds = (s) => (Number.isInteger(s) ? `${s}.0` : String(s));

/** `promise`, or a Timeout after `seconds`. */
function withDeadline(promise, seconds) {
  let timer;
  const deadline = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Timeout(`timed out after ${pySeconds(seconds)}s`)), seconds * 1000);
  });
  return Promise.race([promise, deadline]).finally(() => clearTimeout(timer));
}

async function main(argv) {
  let opts;
  try {
    opts = parseArgs(argv);
  } catch (err) {
    if (!(err instanceof UsageError)) throw err;
    process.stderr.write(`${USAGE}\nclient-driver: ${err.message}\n`);
    await emit({ ok: false, error: `usage: ${err.message}`, exit_code: EXIT_USAGE });
    return EXIT_USAGE;
  }
  const requested = opts.scenario === 'stateless' ? STATELESS_VERSION : opts.protocol;
  const base = { scenario: opts.scenario, url: opts.url, sdk: `@modelcontextprotocol/sdk ${SDK_VERSION}`, requested_protocol: requested };
  try {
    const run = SCENARIO_FUNCS[opts.scenario](opts);
    // The connect scenario waits for its commands as long as they take; it bounds each one itself.
    const result = opts.scenario === 'connect' ? await run : await withDeadline(run, opts.timeout);
    await emit({ ...base, ok: true, ...result });
    return EXIT_OK;
  } catch (err) {
    const code = err instanceof Unsupported ? EXIT_UNSUPPORTED : EXIT_FAILED;
    const message = describeError(err);
    process.stderr.write(`client-driver: ${opts.scenario} failed: ${message}\n`);
    if (code === EXIT_FAILED && !(err instanceof ScenarioError) && !(err instanceof Timeout) && err?.stack) {
      process.stderr.write(`${err.stack}\n`);
    }
    await emit({ ...base, ok: false, error: message, exit_code: code });
    return code;
  }
}

// Exit explicitly: a stream the SDK left open (or a timed-out scenario) must not keep us alive.
process.exit(await main(process.argv.slice(2)));
