// Smoke checks of fixture-server.mjs with the SDK's own clients, no gateway involved.
// Run: npm test   (in tests/node; uses Node 22 from node_modules/.bin)

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import http from 'node:http';
import { once } from 'node:events';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { StdioClientTransport } from '@modelcontextprotocol/sdk/client/stdio.js';
import { StreamableHTTPClientTransport } from '@modelcontextprotocol/sdk/client/streamableHttp.js';
import { SSEClientTransport } from '@modelcontextprotocol/sdk/client/sse.js';
import {
  CallToolResultSchema,
  ListRootsRequestSchema,
  ToolListChangedNotificationSchema,
} from '@modelcontextprotocol/sdk/types.js';

const FIXTURE = fileURLToPath(new URL('./fixture-server.mjs', import.meta.url));

function newClient() {
  return new Client({ name: 'fixture-smoke', version: '1.0.0' }, { capabilities: { roots: { listChanged: true } } });
}

test('stdio', async (t) => {
  const client = newClient();
  const transport = new StdioClientTransport({ command: process.execPath, args: [FIXTURE, '--stdio'], stderr: 'pipe' });
  let stderr = '';
  transport.stderr.on('data', (chunk) => (stderr += chunk));
  await client.connect(transport);
  t.after(() => client.close());

  await t.test('lists the conformance and gateway tools', async () => {
    const names = (await client.listTools()).tools.map((tool) => tool.name);
    for (const name of ['test_simple_text', 'json_schema_2020_12_tool', 'echo', 'slow', 'big', 'add_tool', 'crash', 'roots']) {
      assert.ok(names.includes(name), name);
    }
  });

  await t.test('echo passes unknown fields through', async () => {
    const args = { text: 'hi', extra: { nested: [1, 'two'] }, n: 3 };
    const result = await client.callTool({ name: 'echo', arguments: args });
    assert.equal(result.content[0].text, 'hi');
    assert.deepEqual(result.structuredContent, args);
  });

  await t.test('big returns the requested size', async () => {
    const result = await client.callTool({ name: 'big', arguments: { bytes: 100000 } });
    assert.equal(result.content[0].text.length, 100000);
  });

  await t.test('slow reports progress and honours cancellation', async () => {
    const progress = [];
    await client.callTool({ name: 'slow', arguments: { ms: 250 } }, CallToolResultSchema, { onprogress: (p) => progress.push(p.progress) });
    // The SDK client may drop the last notification: it races the response that ends the call.
    assert.deepEqual(progress, [100, 200, 250].slice(0, progress.length));
    assert.ok(progress.length >= 2);

    const abort = new AbortController();
    const call = client.callTool({ name: 'slow', arguments: { ms: 5000 } }, CallToolResultSchema, { signal: abort.signal });
    setTimeout(() => abort.abort('test cancels'), 100);
    await assert.rejects(call);
    for (let i = 0; i < 50 && !stderr.includes('slow: cancelled'); i++) await new Promise((r) => setTimeout(r, 20));
    assert.match(stderr, /slow: cancelled after \d+ ms/);
  });

  await t.test('add_tool sends tools/list_changed', async () => {
    const changed = new Promise((resolve) => client.setNotificationHandler(ToolListChangedNotificationSchema, resolve));
    await client.callTool({ name: 'add_tool', arguments: { name: 'added_by_smoke' } });
    await changed;
    assert.ok((await client.listTools()).tools.some((tool) => tool.name === 'added_by_smoke'));
    const result = await client.callTool({ name: 'added_by_smoke', arguments: {} });
    assert.equal(result.content[0].text, 'dynamic tool added_by_smoke');
  });

  await t.test('roots asks the client', async () => {
    const roots = [{ uri: 'file:///work', name: 'work' }];
    client.setRequestHandler(ListRootsRequestSchema, () => ({ roots }));
    const result = await client.callTool({ name: 'roots', arguments: {} });
    assert.deepEqual(result.structuredContent, { roots });
  });

});

test('stdio crash exits with code 1 while the call is pending', async () => {
  const child = spawn(process.execPath, [FIXTURE, '--stdio'], { stdio: ['pipe', 'pipe', 'ignore'] });
  const lines = createInterface({ input: child.stdout });
  const send = (msg) => child.stdin.write(JSON.stringify({ jsonrpc: '2.0', ...msg }) + '\n');
  send({ id: 1, method: 'initialize', params: { protocolVersion: '2025-11-25', capabilities: {}, clientInfo: { name: 'raw', version: '1' } } });
  await once(lines, 'line');
  send({ method: 'notifications/initialized' });
  send({ id: 2, method: 'tools/call', params: { name: 'crash', arguments: {} } });
  const responses = [];
  lines.on('line', (line) => responses.push(line));
  const [code] = await once(child, 'exit');
  assert.equal(code, 1);
  assert.deepEqual(responses, [], 'no response to the crashing call');
});

// Starts the fixture in HTTP mode and resolves with its /mcp URL.
async function startHttpFixture(t, ...extraArgs) {
  const child = spawn(process.execPath, [FIXTURE, '--http', '0', ...extraArgs], { stdio: ['ignore', 'pipe', 'inherit'] });
  t.after(() => child.kill());
  const [line] = await once(createInterface({ input: child.stdout }), 'line');
  const match = /^listening (http:\/\/127\.0\.0\.1:\d+\/mcp)$/.exec(line);
  assert.ok(match, `unexpected first line: ${line}`);
  return new URL(match[1]);
}

// Raw request, so that Host and Origin can be anything.
function rawPost(url, headers) {
  return new Promise((resolve, reject) => {
    const req = http.request(url, {
      method: 'POST',
      headers: { 'content-type': 'application/json', accept: 'application/json, text/event-stream', ...headers },
    }, (res) => {
      res.resume();
      resolve(res.statusCode);
    });
    req.on('error', reject);
    req.end(JSON.stringify({
      jsonrpc: '2.0', id: 1, method: 'initialize',
      params: { protocolVersion: '2025-11-25', capabilities: {}, clientInfo: { name: 'raw', version: '1' } },
    }));
  });
}

test('http', async (t) => {
  const KEY = { 'x-upstream-key': 'static-secret' };
  const url = await startHttpFixture(t, '--require-header', 'X-Upstream-Key=static-secret');
  const debugUrl = new URL('/debug/requests', url);
  const debugRequests = async () => (await fetch(debugUrl)).json();

  await t.test('rejects foreign Host/Origin, wrong credentials', async () => {
    assert.equal(await rawPost(url, { ...KEY, host: 'evil.example.com' }), 403);
    assert.equal(await rawPost(url, { ...KEY, origin: 'http://evil.example.com' }), 403);
    assert.equal(await rawPost(url, { 'x-upstream-key': 'wrong' }), 401);
    assert.equal(await rawPost(url, {}), 401);
    assert.equal(await rawPost(url, { ...KEY, host: `localhost:${url.port}`, origin: `http://localhost:${url.port}` }), 200);
  });

  await t.test('streamable HTTP session, resumption with Last-Event-ID, DELETE', async () => {
    const client = newClient();
    const transport = new StreamableHTTPClientTransport(url, { requestInit: { headers: KEY } });
    await client.connect(transport);
    const sessionId = transport.sessionId;
    assert.ok(sessionId);

    const echoed = await client.callTool({ name: 'echo', arguments: { text: 'over http', unknown: true } });
    assert.deepEqual(echoed.structuredContent, { text: 'over http', unknown: true });

    // The fixture closes the POST stream mid-call; the SDK client must resume with a GET.
    const result = await client.callTool({ name: 'test_reconnection', arguments: {} });
    assert.equal(result.content[0].text, 'Reconnection test completed successfully');
    const resumed = (await debugRequests()).filter(
      (r) => r.method === 'GET' && r.headers['mcp-session-id'] === sessionId && r.headers['last-event-id'],
    );
    assert.ok(resumed.length >= 1, 'expected a GET with Last-Event-ID');

    await transport.terminateSession();
    await client.close();
    const after = await fetch(url, { method: 'GET', headers: { ...KEY, accept: 'text/event-stream', 'mcp-session-id': sessionId } });
    assert.equal(after.status, 404);
  });

  await t.test('legacy HTTP+SSE transport', async () => {
    const client = newClient();
    const transport = new SSEClientTransport(new URL('/sse', url), { requestInit: { headers: KEY }});
    await client.connect(transport);
    const result = await client.callTool({ name: 'echo', arguments: { text: 'legacy' } });
    assert.equal(result.content[0].text, 'legacy');
    await client.close();
  });

  await t.test('records every request with its headers', async () => {
    const recorded = await debugRequests();
    assert.ok(recorded.some((r) => r.path === '/sse' && r.method === 'GET'));
    assert.ok(recorded.some((r) => r.path.startsWith('/messages?sessionId=') && r.body?.method === 'tools/call'));
    assert.ok(recorded.some((r) => r.headers.host === 'evil.example.com'));
    assert.ok(recorded.every((r) => typeof r.method === 'string' && typeof r.path === 'string' && typeof r.headers === 'object'));
    assert.equal((await fetch(debugUrl, { method: 'DELETE' })).status, 204);
    assert.deepEqual(await debugRequests(), []);
  });
});
