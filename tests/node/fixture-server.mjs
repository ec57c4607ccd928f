#!/usr/bin/env node
// Fixture MCP server used as a real upstream by Portcullis' integration tests and by the
// official conformance suite (server scenarios of @modelcontextprotocol/conformance).
//
//   node fixture-server.mjs --stdio [--protocol VERSION]
//   node fixture-server.mjs --http PORT [--require-header NAME=VALUE]... [--protocol VERSION]
//
// HTTP mode binds 127.0.0.1 only, prints `listening http://127.0.0.1:<port>/mcp` once ready and
// serves Streamable HTTP at /mcp (stateful sessions, resumable SSE streams), the legacy HTTP+SSE
// transport at /sse + /messages, and /debug/requests: GET returns every request received so far
// as [{method, path, headers, body?}] (body = parsed JSON of a POST), DELETE forgets them;
// /debug/streams: GET returns {legacy, streamable}, the open legacy SSE streams and sessions.
// Every request whose Host/Origin is not loopback gets 403; with --require-header, every request
// lacking that exact header gets 401 (/debug/* excepted, so tests can always read the record).
//
// With --protocol VERSION (one the SDK supports, e.g. 2025-03-26) the server answers every
// `initialize` with exactly `protocolVersion: VERSION`, whatever the client asked, so tests can
// put an old-revision upstream behind the gateway: the request's params.protocolVersion is
// rewritten before the SDK sees it (HTTP: the parsed body, after /debug/requests recorded the
// original; stdio: the transport's onmessage), so the SDK's transports also behave as for that
// revision (e.g. no SSE priming events below 2025-11-25).
//
// The low-level `Server` is used on purpose: tools must be listed with their JSON Schemas exactly
// as written (json-schema-2020-12) and arguments must reach handlers untouched (echo).

import http from 'node:http';
import { Server } from '@modelcontextprotocol/sdk/server/index.js';
import { StdioServerTransport } from '@modelcontextprotocol/sdk/server/stdio.js';
import { StreamableHTTPServerTransport } from '@modelcontextprotocol/sdk/server/streamableHttp.js';
import { SSEServerTransport } from '@modelcontextprotocol/sdk/server/sse.js';
import {
  CallToolRequestSchema,
  CompleteRequestSchema,
  CreateMessageResultSchema,
  ElicitResultSchema,
  ErrorCode,
  GetPromptRequestSchema,
  ListPromptsRequestSchema,
  ListResourcesRequestSchema,
  ListResourceTemplatesRequestSchema,
  ListRootsResultSchema,
  ListToolsRequestSchema,
  LoggingLevelSchema,
  McpError,
  ReadResourceRequestSchema,
  SUPPORTED_PROTOCOL_VERSIONS,
  SetLevelRequestSchema,
  SubscribeRequestSchema,
  UnsubscribeRequestSchema,
  isInitializeRequest,
} from '@modelcontextprotocol/sdk/types.js';

const log = (...args) => console.error('[fixture]', ...args); // stdout is the stdio transport

// --protocol VERSION: the revision every initialize is answered with (undefined: the SDK's choice).
let pinnedProtocol;

// Returns `message` (a JSON-RPC message or a batch array) with every initialize request's
// params.protocolVersion replaced by the pinned revision; the SDK then answers with exactly it.
function pinProtocol(message) {
  if (pinnedProtocol === undefined) return message;
  if (Array.isArray(message)) return message.map(pinProtocol);
  if (!isInitializeRequest(message)) return message;
  return { ...message, params: { ...message.params, protocolVersion: pinnedProtocol } };
}

// ---------------------------------------------------------------------------------------------
// Static content

// 1x1 red PNG.
const PNG_B64 =
  'iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg==';

// 0.1 s of 8 kHz, 8-bit mono silence as a WAV file.
const WAV_B64 = (() => {
  const samples = 800;
  const b = Buffer.alloc(44 + samples, 0x80);
  b.write('RIFF', 0);
  b.writeUInt32LE(36 + samples, 4);
  b.write('WAVEfmt ', 8);
  b.writeUInt32LE(16, 16); // fmt chunk size
  b.writeUInt16LE(1, 20); // PCM
  b.writeUInt16LE(1, 22); // mono
  b.writeUInt32LE(8000, 24); // sample rate
  b.writeUInt32LE(8000, 28); // byte rate
  b.writeUInt16LE(1, 32); // block align
  b.writeUInt16LE(8, 34); // bits per sample
  b.write('data', 36);
  b.writeUInt32LE(samples, 40);
  return b.toString('base64');
})();

const text = (t) => ({ type: 'text', text: t });
const sleep = (ms, signal) =>
  new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(signal.reason);
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener('abort', () => {
      clearTimeout(timer);
      reject(signal.reason);
    }, { once: true });
  });
const noArgs = { type: 'object', properties: {} };

// ---------------------------------------------------------------------------------------------
// Tools. `run(args, ctx)` gets ctx = { extra, server, session } and returns a CallToolResult.

const TOOLS = [
  {
    name: 'test_simple_text',
    description: 'Returns a simple text content',
    inputSchema: noArgs,
    run: () => ({ content: [text('This is a simple text response for testing.')] }),
  },
  {
    name: 'test_image_content',
    description: 'Returns an image content (1x1 PNG)',
    inputSchema: noArgs,
    run: () => ({ content: [{ type: 'image', data: PNG_B64, mimeType: 'image/png' }] }),
  },
  {
    name: 'test_audio_content',
    description: 'Returns an audio content (short WAV)',
    inputSchema: noArgs,
    run: () => ({ content: [{ type: 'audio', data: WAV_B64, mimeType: 'audio/wav' }] }),
  },
  {
    name: 'test_embedded_resource',
    description: 'Returns an embedded resource content',
    inputSchema: noArgs,
    run: () => ({
      content: [{
        type: 'resource',
        resource: { uri: 'test://embedded-resource', mimeType: 'text/plain', text: 'This is an embedded resource content.' },
      }],
    }),
  },
  {
    name: 'test_multiple_content_types',
    description: 'Returns text, image and resource contents',
    inputSchema: noArgs,
    run: () => ({
      content: [
        text('Multiple content types test:'),
        { type: 'image', data: PNG_B64, mimeType: 'image/png' },
        {
          type: 'resource',
          resource: { uri: 'test://mixed-content-resource', mimeType: 'application/json', text: '{"test":"data","value":123}' },
        },
      ],
    }),
  },
  {
    name: 'test_tool_with_logging',
    description: 'Sends three info log notifications while running',
    inputSchema: noArgs,
    run: async (_args, { extra, session }) => {
      for (const [i, data] of ['Tool execution started', 'Tool processing data', 'Tool execution completed'].entries()) {
        if (i > 0) await sleep(50, extra.signal);
        await session.log(extra, 'info', data);
      }
      return { content: [text('Tool with logging executed successfully')] };
    },
  },
  {
    name: 'test_tool_with_progress',
    description: 'Reports progress 0, 50, 100 of 100 when given a progressToken',
    inputSchema: noArgs,
    run: async (_args, { extra }) => {
      const token = extra._meta?.progressToken;
      for (const [i, progress] of [0, 50, 100].entries()) {
        if (i > 0) await sleep(50, extra.signal);
        if (token !== undefined) {
          await extra.sendNotification({ method: 'notifications/progress', params: { progressToken: token, progress, total: 100 } });
        }
      }
      return { content: [text('Tool with progress executed successfully')] };
    },
  },
  {
    name: 'test_error_handling',
    description: 'Always fails with isError: true',
    inputSchema: noArgs,
    run: () => ({ isError: true, content: [text('This tool intentionally returns an error for testing')] }),
  },
  {
    name: 'test_sampling',
    description: 'Asks the client to sample an LLM with the given prompt',
    inputSchema: { type: 'object', properties: { prompt: { type: 'string' } }, required: ['prompt'] },
    run: async ({ prompt }, { extra, server }) => {
      if (!server.getClientCapabilities()?.sampling) return toolError('Client does not support sampling');
      const result = await extra.sendRequest(
        { method: 'sampling/createMessage', params: { messages: [{ role: 'user', content: text(String(prompt)) }], maxTokens: 100 } },
        CreateMessageResultSchema,
      );
      const reply = result.content?.type === 'text' ? result.content.text : JSON.stringify(result.content);
      return { content: [text(`LLM response: ${reply}`)] };
    },
  },
  {
    name: 'test_elicitation',
    description: 'Asks the user (elicitation) for a username and an email',
    inputSchema: { type: 'object', properties: { message: { type: 'string' } }, required: ['message'] },
    run: ({ message }, ctx) =>
      elicit(ctx, String(message), {
        type: 'object',
        properties: {
          username: { type: 'string', description: "User's response" },
          email: { type: 'string', description: "User's email address" },
        },
        required: ['username', 'email'],
      }, 'User response'),
  },
  {
    name: 'test_elicitation_sep1034_defaults',
    description: 'Elicitation whose schema has defaults for every primitive type (SEP-1034)',
    inputSchema: noArgs,
    run: (_args, ctx) =>
      elicit(ctx, 'Please review and update the form fields with defaults', {
        type: 'object',
        properties: {
          name: { type: 'string', description: 'User name', default: 'John Doe' },
          age: { type: 'integer', description: 'User age', default: 30 },
          score: { type: 'number', description: 'User score', default: 95.5 },
          status: { type: 'string', description: 'User status', enum: ['active', 'inactive', 'pending'], default: 'active' },
          verified: { type: 'boolean', description: 'Verification status', default: true },
        },
        required: [],
      }),
  },
  {
    name: 'test_elicitation_sep1330_enums',
    description: 'Elicitation with the five enum schema variants (SEP-1330)',
    inputSchema: noArgs,
    run: (_args, ctx) =>
      elicit(ctx, 'Please pick from the enum fields', {
        type: 'object',
        properties: {
          untitledSingle: { type: 'string', enum: ['option1', 'option2', 'option3'] },
          titledSingle: {
            type: 'string',
            oneOf: [
              { const: 'value1', title: 'First Option' },
              { const: 'value2', title: 'Second Option' },
              { const: 'value3', title: 'Third Option' },
            ],
          },
          legacyEnum: { type: 'string', enum: ['opt1', 'opt2', 'opt3'], enumNames: ['Option One', 'Option Two', 'Option Three'] },
          untitledMulti: { type: 'array', items: { type: 'string', enum: ['option1', 'option2', 'option3'] } },
          titledMulti: {
            type: 'array',
            items: {
              anyOf: [
                { const: 'value1', title: 'First Choice' },
                { const: 'value2', title: 'Second Choice' },
                { const: 'value3', title: 'Third Choice' },
              ],
            },
          },
        },
        required: [],
      }),
  },
  {
    name: 'json_schema_2020_12_tool',
    description: 'Tool with JSON Schema 2020-12 features',
    inputSchema: {
      $schema: 'https://json-schema.org/draft/2020-12/schema',
      type: 'object',
      $defs: {
        address: { type: 'object', properties: { street: { type: 'string' }, city: { type: 'string' } } },
      },
      properties: { name: { type: 'string' }, address: { $ref: '#/$defs/address' } },
      additionalProperties: false,
    },
    run: (args) => ({ content: [text(JSON.stringify(args))] }),
  },
  {
    name: 'test_reconnection',
    description: 'Closes its SSE stream mid-call; the result arrives after the client resumes with Last-Event-ID',
    inputSchema: noArgs,
    run: async (_args, { extra }) => {
      // closeSSEStream only exists on Streamable HTTP with an event store, for clients that
      // negotiated 2025-11-25+ (they got a priming event id to resume from).
      if (extra.closeSSEStream) {
        await sleep(50, extra.signal);
        extra.closeSSEStream();
        await sleep(100, extra.signal);
      }
      return { content: [text('Reconnection test completed successfully')] };
    },
  },

  // --- tools for Portcullis' own tests ---
  {
    name: 'echo',
    description: 'Returns `text` as text content; every argument comes back in structuredContent',
    inputSchema: { type: 'object', properties: { text: { type: 'string' } }, required: ['text'], additionalProperties: true },
    annotations: { readOnlyHint: true },
    run: (args, { extra }) => ({
      content: [text(String(args.text ?? ''))],
      structuredContent: { ...args },
      ...(extra._meta ? { _meta: { requestMeta: extra._meta } } : {}),
    }),
  },
  {
    name: 'slow',
    description: 'Waits `ms` milliseconds (default 1000); honours cancellation; reports progress when asked',
    inputSchema: { type: 'object', properties: { ms: { type: 'integer', minimum: 0 } } },
    run: async ({ ms = 1000 }, { extra }) => {
      const token = extra._meta?.progressToken;
      const started = Date.now();
      try {
        for (let done = 0; done < ms;) {
          const step = Math.min(100, ms - done);
          await sleep(step, extra.signal);
          done += step;
          if (token !== undefined) {
            await extra.sendNotification({ method: 'notifications/progress', params: { progressToken: token, progress: done, total: ms } });
          }
        }
      } catch (err) {
        log(`slow: cancelled after ${Date.now() - started} ms`);
        throw err;
      }
      return { content: [text(`slept ${ms} ms`)] };
    },
  },
  {
    name: 'big',
    description: 'Returns a text content of `bytes` bytes (default 1 MiB)',
    inputSchema: { type: 'object', properties: { bytes: { type: 'integer', minimum: 0 } } },
    run: ({ bytes = 1 << 20 }) => ({ content: [text('x'.repeat(bytes))] }),
  },
  {
    name: 'add_tool',
    description: 'Registers a new tool at run time and sends notifications/tools/list_changed',
    inputSchema: { type: 'object', properties: { name: { type: 'string' } } },
    run: async ({ name }, { extra, session }) => {
      const toolName = name ?? `dynamic_${dynamicTools.size + 1}`;
      if (staticTools.has(toolName)) return toolError(`${toolName} is a built-in tool`);
      dynamicTools.set(toolName, {
        name: toolName,
        description: `Tool added at run time by add_tool`,
        inputSchema: noArgs,
        run: () => ({ content: [text(`dynamic tool ${toolName}`)] }),
      });
      // The caller gets the notification on its own request's stream (so before the result);
      // every other live session gets it on its standalone stream.
      await extra.sendNotification({ method: 'notifications/tools/list_changed' });
      for (const other of sessions) {
        if (other !== session) other.server.sendToolListChanged().catch(() => {});
      }
      return { content: [text(`added tool ${toolName}`)] };
    },
  },
  {
    name: 'crash',
    description: 'Exits the server process with code 1 while the call is pending',
    inputSchema: noArgs,
    annotations: { destructiveHint: true },
    run: () => {
      log('crash: exiting with code 1');
      process.exit(1);
    },
  },
  {
    name: 'roots',
    description: 'Asks the client for roots/list and returns them',
    inputSchema: noArgs,
    run: async (_args, { extra }) => {
      const { roots } = await extra.sendRequest({ method: 'roots/list' }, ListRootsResultSchema);
      return { content: [text(JSON.stringify(roots))], structuredContent: { roots } };
    },
  },
];

const staticTools = new Map(TOOLS.map((t) => [t.name, t]));
const dynamicTools = new Map(); // shared by every session: add_tool changes the server, not one session
const toolByName = (name) => staticTools.get(name) ?? dynamicTools.get(name);
const listTools = () => [...staticTools.values(), ...dynamicTools.values()].map(({ run, ...def }) => def);

function toolError(message) {
  return { isError: true, content: [text(message)] };
}

async function elicit({ extra, server }, message, requestedSchema, prefix = 'Elicitation completed') {
  if (!server.getClientCapabilities()?.elicitation) return toolError('Client does not support elicitation');
  // sendRequest rather than server.elicitInput: the request must go out on this call's stream,
  // and the schema must reach the client exactly as written (enumNames etc.).
  const result = await extra.sendRequest({ method: 'elicitation/create', params: { message, requestedSchema } }, ElicitResultSchema);
  return { content: [text(`${prefix}: action=${result.action}, content=${JSON.stringify(result.content ?? {})}`)] };
}

// ---------------------------------------------------------------------------------------------
// Prompts, resources, completion

const PROMPTS = [
  { name: 'test_simple_prompt', description: 'A simple prompt without arguments' },
  {
    name: 'test_prompt_with_arguments',
    description: 'A prompt with two required arguments',
    arguments: [
      { name: 'arg1', description: 'First test argument', required: true },
      { name: 'arg2', description: 'Second test argument', required: true },
    ],
  },
  {
    name: 'test_prompt_with_embedded_resource',
    description: 'A prompt that embeds a resource',
    arguments: [{ name: 'resourceUri', description: 'URI of the resource to embed', required: true }],
  },
  { name: 'test_prompt_with_image', description: 'A prompt with image content' },
];

function getPrompt(name, args = {}) {
  const user = (content) => ({ role: 'user', content });
  switch (name) {
    case 'test_simple_prompt':
      return { messages: [user(text('This is a simple prompt for testing.'))] };
    case 'test_prompt_with_arguments':
      return { messages: [user(text(`Prompt with arguments: arg1='${args.arg1}', arg2='${args.arg2}'`))] };
    case 'test_prompt_with_embedded_resource':
      return {
        messages: [
          user({ type: 'resource', resource: { uri: args.resourceUri, mimeType: 'text/plain', text: 'Embedded resource content for testing.' } }),
          user(text('Please process the embedded resource above.')),
        ],
      };
    case 'test_prompt_with_image':
      return {
        messages: [user({ type: 'image', data: PNG_B64, mimeType: 'image/png' }), user(text('Please analyze the image above.'))],
      };
    default:
      throw new McpError(ErrorCode.InvalidParams, `Unknown prompt: ${name}`);
  }
}

const RESOURCES = [
  { uri: 'test://static-text', name: 'static-text', description: 'A static text resource', mimeType: 'text/plain' },
  { uri: 'test://static-binary', name: 'static-binary', description: 'A static binary resource (PNG)', mimeType: 'image/png' },
  { uri: 'test://watched-resource', name: 'watched-resource', description: 'A resource that can be subscribed to', mimeType: 'text/plain' },
];
const TEMPLATE = {
  uriTemplate: 'test://template/{id}/data',
  name: 'template-data',
  description: 'A resource template with one parameter',
  mimeType: 'application/json',
};

function readResource(uri) {
  switch (uri) {
    case 'test://static-text':
      return { uri, mimeType: 'text/plain', text: 'This is the content of the static text resource.' };
    case 'test://static-binary':
      return { uri, mimeType: 'image/png', blob: PNG_B64 };
    case 'test://watched-resource':
      return { uri, mimeType: 'text/plain', text: 'Watched resource content.' };
  }
  const m = /^test:\/\/template\/([^/]+)\/data$/.exec(uri);
  if (m) {
    const id = decodeURIComponent(m[1]);
    return { uri, mimeType: 'application/json', text: JSON.stringify({ id, templateTest: true, data: `Data for ID: ${id}` }) };
  }
  throw new McpError(-32002, `Resource not found: ${uri}`);
}

const COMPLETIONS = {
  arg1: ['paris', 'park', 'party', 'test', 'testing'],
  arg2: ['hello', 'help', 'world'],
  id: ['1', '12', '123', '42'],
};

// ---------------------------------------------------------------------------------------------
// One MCP server per client connection (per session in HTTP mode).

const sessions = new Set();

function createSession() {
  const server = new Server(
    { name: 'portcullis-fixture', version: '1.0.0' },
    {
      capabilities: {
        tools: { listChanged: true },
        prompts: { listChanged: true },
        resources: { subscribe: true, listChanged: true },
        logging: {},
        completions: {},
      },
    },
  );
  const session = {
    server,
    level: undefined,
    subscriptions: new Set(),
    async log(extra, level, data) {
      const order = LoggingLevelSchema.options;
      if (this.level && order.indexOf(level) < order.indexOf(this.level)) return;
      await extra.sendNotification({ method: 'notifications/message', params: { level, logger: 'fixture', data } });
    },
  };

  server.setRequestHandler(SetLevelRequestSchema, ({ params }) => {
    session.level = params.level;
    return {};
  });
  server.setRequestHandler(ListToolsRequestSchema, () => ({ tools: listTools() }));
  server.setRequestHandler(CallToolRequestSchema, async ({ params }, extra) => {
    const tool = toolByName(params.name);
    if (!tool) throw new McpError(ErrorCode.InvalidParams, `Unknown tool: ${params.name}`);
    return tool.run(params.arguments ?? {}, { extra, server, session });
  });
  server.setRequestHandler(ListPromptsRequestSchema, () => ({ prompts: PROMPTS }));
  server.setRequestHandler(GetPromptRequestSchema, ({ params }) => getPrompt(params.name, params.arguments));
  server.setRequestHandler(ListResourcesRequestSchema, () => ({ resources: RESOURCES }));
  server.setRequestHandler(ListResourceTemplatesRequestSchema, () => ({ resourceTemplates: [TEMPLATE] }));
  server.setRequestHandler(ReadResourceRequestSchema, ({ params }) => ({ contents: [readResource(params.uri)] }));
  server.setRequestHandler(SubscribeRequestSchema, ({ params }) => {
    session.subscriptions.add(params.uri);
    return {};
  });
  server.setRequestHandler(UnsubscribeRequestSchema, ({ params }) => {
    session.subscriptions.delete(params.uri);
    return {};
  });
  server.setRequestHandler(CompleteRequestSchema, ({ params }) => {
    const prefix = params.argument.value ?? '';
    const values = (COMPLETIONS[params.argument.name] ?? []).filter((v) => v.startsWith(prefix));
    return { completion: { values, total: values.length, hasMore: false } };
  });

  server.onclose = () => sessions.delete(session);
  sessions.add(session);
  return session;
}

// ---------------------------------------------------------------------------------------------
// In-memory event store: lets a client resume a Streamable HTTP stream with Last-Event-ID.

class MemoryEventStore {
  #events = new Map(); // eventId -> { streamId, message }, in insertion (= send) order
  #next = 0;

  async storeEvent(streamId, message) {
    const eventId = `${streamId}_${++this.#next}`;
    this.#events.set(eventId, { streamId, message });
    return eventId;
  }

  async getStreamIdForEventId(eventId) {
    return this.#events.get(eventId)?.streamId;
  }

  async replayEventsAfter(lastEventId, { send }) {
    const streamId = this.#events.get(lastEventId)?.streamId;
    if (streamId === undefined) return '';
    let after = false;
    for (const [eventId, event] of this.#events) {
      if (eventId === lastEventId) after = true;
      else if (after && event.streamId === streamId && event.message.jsonrpc) await send(eventId, event.message); // skips priming events ({})
    }
    return streamId;
  }
}

// ---------------------------------------------------------------------------------------------
// HTTP mode

const LOOPBACK = new Set(['127.0.0.1', 'localhost', '[::1]']);
const RETRY_MS = 500; // `retry:` advertised in priming events

function hostnameOf(value) {
  try {
    return new URL(value.includes('://') ? value : `http://${value}`).hostname.toLowerCase();
  } catch {
    return undefined;
  }
}

function sendJson(res, status, body, headers = {}) {
  res.writeHead(status, { 'Content-Type': 'application/json', ...headers });
  res.end(JSON.stringify(body));
}

const rpcError = (code, message) => ({ jsonrpc: '2.0', error: { code, message }, id: null });

async function readJson(req) {
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  const raw = Buffer.concat(chunks).toString('utf8');
  return JSON.parse(raw);
}

function startHttp(port, requiredHeaders) {
  const streamable = new Map(); // session id -> StreamableHTTPServerTransport
  const legacy = new Map(); // session id -> SSEServerTransport
  const recorded = []; // every request (except /debug/*): { method, path, headers, body? }

  async function handle(req, res) {
    const url = new URL(req.url, 'http://127.0.0.1');
    const isDebug = url.pathname.startsWith('/debug/');

    // DNS rebinding protection: a browser tricked into talking to us carries a foreign Host/Origin.
    const host = hostnameOf(req.headers.host ?? '');
    const origin = req.headers.origin;
    if (!LOOPBACK.has(host) || (origin !== undefined && !LOOPBACK.has(hostnameOf(origin)))) {
      if (!isDebug) recorded.push({ method: req.method, path: req.url, headers: req.headers });
      return sendJson(res, 403, rpcError(-32000, 'Forbidden: Host/Origin is not a loopback address'));
    }

    if (isDebug) {
      if (url.pathname === '/debug/streams') {
        return sendJson(res, 200, { legacy: legacy.size, streamable: streamable.size });
      }
      if (url.pathname !== '/debug/requests') return sendJson(res, 404, { error: 'not found' });
      if (req.method === 'DELETE') {
        recorded.length = 0;
        res.writeHead(204).end();
        return;
      }
      return sendJson(res, 200, recorded);
    }

    let body;
    if (req.method === 'POST') {
      try {
        body = await readJson(req);
      } catch {
        recorded.push({ method: req.method, path: req.url, headers: req.headers });
        return sendJson(res, 400, rpcError(ErrorCode.ParseError, 'Parse error'));
      }
    }
    recorded.push({ method: req.method, path: req.url, headers: req.headers, ...(body !== undefined ? { body } : {}) });
    if (body !== undefined) body = pinProtocol(body); // the record keeps what the client sent

    for (const [name, value] of requiredHeaders) {
      if (req.headers[name] !== value) {
        return sendJson(res, 401, rpcError(-32001, `Unauthorized: missing or wrong ${name} header`));
      }
    }

    const sessionId = req.headers['mcp-session-id'];
    switch (url.pathname) {
      case '/mcp': {
        let transport = sessionId !== undefined ? streamable.get(sessionId) : undefined;
        if (sessionId !== undefined && !transport) return sendJson(res, 404, rpcError(-32001, 'Session not found'));
        if (!transport) {
          if (req.method !== 'POST' || !isInitializeRequest(body)) {
            return sendJson(res, 400, rpcError(-32000, 'Bad Request: missing Mcp-Session-Id'));
          }
          transport = new StreamableHTTPServerTransport({
            sessionIdGenerator: () => crypto.randomUUID(),
            eventStore: new MemoryEventStore(),
            retryInterval: RETRY_MS,
            onsessioninitialized: (id) => streamable.set(id, transport),
          });
          transport.onclose = () => streamable.delete(transport.sessionId);
          await createSession().server.connect(transport);
        }
        return transport.handleRequest(req, res, body);
      }
      case '/sse': {
        if (req.method !== 'GET') return sendJson(res, 405, rpcError(-32000, 'Method not allowed'), { Allow: 'GET' });
        const transport = new SSEServerTransport('/messages', res);
        legacy.set(transport.sessionId, transport);
        res.on('close', () => legacy.delete(transport.sessionId));
        await createSession().server.connect(transport);
        return;
      }
      case '/messages': {
        if (req.method !== 'POST') return sendJson(res, 405, rpcError(-32000, 'Method not allowed'), { Allow: 'POST' });
        const transport = legacy.get(url.searchParams.get('sessionId'));
        if (!transport) return sendJson(res, 404, rpcError(-32001, 'Session not found'));
        return transport.handlePostMessage(req, res, body);
      }
      default:
        return sendJson(res, 404, rpcError(-32000, 'Not found'));
    }
  }

  const httpServer = http.createServer((req, res) => {
    handle(req, res).catch((err) => {
      log('request failed:', err);
      if (!res.headersSent) sendJson(res, 500, rpcError(ErrorCode.InternalError, 'Internal error'));
      else res.end();
    });
  });
  httpServer.listen(port, '127.0.0.1', () => {
    console.log(`listening http://127.0.0.1:${httpServer.address().port}/mcp`);
  });
  const stop = () => {
    for (const t of [...streamable.values(), ...legacy.values()]) t.close().catch(() => {});
    httpServer.close();
    httpServer.closeAllConnections();
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

// ---------------------------------------------------------------------------------------------
// Command line

function usage(message) {
  if (message) log(message);
  log('usage: fixture-server.mjs (--stdio [--require-env NAME=VALUE]... | --http PORT [--require-header NAME=VALUE]...) [--protocol VERSION]');
  process.exit(2);
}

const argv = process.argv.slice(2);
let mode;
let port;
const requiredHeaders = [];
const requiredEnv = [];
for (let i = 0; i < argv.length; i++) {
  const arg = argv[i];
  if (arg === '--stdio') mode = 'stdio';
  else if (arg === '--http') {
    mode = 'http';
    port = Number(argv[++i]);
    if (!Number.isInteger(port) || port < 0 || port > 65535) usage(`bad port: ${argv[i]}`);
  } else if (arg === '--require-header') {
    const spec = argv[++i] ?? '';
    const eq = spec.indexOf('=');
    if (eq <= 0) usage(`bad --require-header: ${spec}`);
    requiredHeaders.push([spec.slice(0, eq).toLowerCase(), spec.slice(eq + 1)]);
  } else if (arg === '--require-env') {
    // stdio: refuse to start unless the environment carries this credential (tests of
    // credentials the gateway injects into stdio upstreams).
    const spec = argv[++i] ?? '';
    const eq = spec.indexOf('=');
    if (eq <= 0) usage(`bad --require-env: ${spec}`);
    requiredEnv.push([spec.slice(0, eq), spec.slice(eq + 1)]);
  } else if (arg === '--protocol') {
    pinnedProtocol = argv[++i] ?? '';
    if (!SUPPORTED_PROTOCOL_VERSIONS.includes(pinnedProtocol)) {
      usage(`bad --protocol: ${pinnedProtocol} (supported: ${SUPPORTED_PROTOCOL_VERSIONS.join(', ')})`);
    }
  } else usage(`unknown argument: ${arg}`);
}

if (mode === 'stdio') {
  if (requiredHeaders.length) usage('--require-header only applies to --http');
  for (const [name, value] of requiredEnv) {
    if (process.env[name] !== value) {
      log(`environment variable ${name} is missing or wrong; exiting`);
      process.exit(1);
    }
  }
  const { server } = createSession();
  server.onclose = () => process.exit(0);
  const transport = new StdioServerTransport();
  await server.connect(transport);
  // connect() installed the SDK's handler; put --protocol's rewrite in front of it.
  const deliver = transport.onmessage;
  transport.onmessage = (message, extra) => deliver(pinProtocol(message), extra);
  log('serving on stdio');
} else if (mode === 'http') {
  startHttp(port, requiredHeaders);
} else {
  usage();
}
