#!/usr/bin/env node
// End-to-end check of the two OAuth fixtures used by the vault's tests, no gateway involved:
// oauth-as.mjs (authorization server, oidc-provider) and protected-mcp-server.mjs (MCP server
// behind the SDK's bearer middleware). It walks every path the gateway tests rely on and checks
// the counters of both /test/stats endpoints against what it did.
//
//   tests/node/node_modules/.bin/node tests/node/oauth-fixtures.check.mjs     (or npm run check:oauth)
//
// Prints one line per step with its duration and ends with `oauth-fixtures: N passed, N failed`;
// exits non-zero on the first failure. The fixtures run with the Node 22 from node_modules
// unless FIXTURE_NODE names another binary.

import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { setTimeout as sleep } from 'node:timers/promises';
import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { StreamableHTTPClientTransport } from '@modelcontextprotocol/sdk/client/streamableHttp.js';

const here = (name) => fileURLToPath(new URL(name, import.meta.url));
const NODE22 = here('./node_modules/.bin/node');
// FIXTURE_NODE=/path/to/node runs the fixtures with another Node binary.
const NODE = process.env.FIXTURE_NODE || (existsSync(NODE22) ? NODE22 : process.execPath);
const ACCESS_TTL = 3;
const REDIRECT_URI = 'http://127.0.0.1:9/cb';

// ---------------------------------------------------------------------------------------------
// Processes

const children = new Set();

// Starts a fixture and resolves with {proc, url} once it printed its `listening URL` line.
function startFixture(script, args) {
  const proc = spawn(NODE, [here(script), ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  children.add(proc);
  let stderr = '';
  const extraStdout = [];
  proc.stderr.on('data', (chunk) => (stderr += chunk));
  proc.on('exit', () => children.delete(proc));
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`${script} did not start in 15 s\n${stderr}`)), 15000);
    const lines = createInterface({ input: proc.stdout });
    lines.once('line', (line) => {
      clearTimeout(timer);
      const match = /^listening (http:\/\/127\.0\.0\.1:\d+(?:\/mcp)?)$/.exec(line);
      if (!match) reject(new Error(`${script}: unexpected first line ${JSON.stringify(line)}`));
      else resolve({ proc, url: match[1], stderr: () => stderr, extraStdout });
      lines.on('line', (more) => extraStdout.push(more));
    });
    proc.once('exit', (code) => reject(new Error(`${script} exited with ${code}\n${stderr}`)));
  });
}

async function stopFixture({ proc }) {
  if (proc.exitCode !== null || proc.signalCode !== null) return;
  const exited = new Promise((resolve) => proc.once('exit', resolve));
  proc.kill('SIGTERM');
  await exited;
}

// ---------------------------------------------------------------------------------------------
// OAuth helpers

const b64url = (buffer) => Buffer.from(buffer).toString('base64url');
const jwtPayload = (jwt) => JSON.parse(Buffer.from(jwt.split('.')[1], 'base64url'));
const jwtHeader = (jwt) => JSON.parse(Buffer.from(jwt.split('.')[0], 'base64url'));

async function json(response) {
  const text = await response.text();
  try {
    return JSON.parse(text);
  } catch {
    return { raw: text };
  }
}

async function register(issuer, metadata) {
  const response = await fetch(`${issuer}/reg`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify(metadata),
  });
  const body = await json(response);
  assert.equal(response.status, 201, JSON.stringify(body));
  return body;
}

// POST /token (or another endpoint) with the client's registered authentication method.
async function clientPost(issuer, path, client, params) {
  const headers = { 'content-type': 'application/x-www-form-urlencoded' };
  const form = new URLSearchParams(params);
  if (client.token_endpoint_auth_method === 'client_secret_basic') {
    const id = encodeURIComponent(client.client_id);
    const secret = encodeURIComponent(client.client_secret);
    headers.authorization = `Basic ${Buffer.from(`${id}:${secret}`).toString('base64')}`;
  } else {
    form.set('client_id', client.client_id);
    if (client.client_secret) form.set('client_secret', client.client_secret);
  }
  const response = await fetch(`${issuer}${path}`, { method: 'POST', headers, body: form });
  return { status: response.status, body: await json(response) };
}

// The headless authorization: authorize -> /interaction/UID/auto -> redirect_uri?code.
// resumeByClient: take the /auth/UID detour, carrying the _interaction_resume cookie by hand.
async function authorize(issuer, client, { account, resource, scope = 'mcp:tools offline_access', resumeByClient = false }) {
  const verifier = b64url(crypto.randomBytes(32));
  const challenge = b64url(crypto.createHash('sha256').update(verifier).digest());
  const state = b64url(crypto.randomBytes(12));
  const query = new URLSearchParams({
    response_type: 'code',
    client_id: client.client_id,
    redirect_uri: REDIRECT_URI,
    scope,
    state,
    code_challenge: challenge,
    code_challenge_method: 'S256',
    resource,
  });

  const start = await fetch(`${issuer}/auth?${query}`, { redirect: 'manual' });
  assert.equal(start.status, 303, `authorize: ${start.status} ${await start.text()}`);
  const interactionUrl = start.headers.get('location');
  assert.match(interactionUrl, new RegExp(`^${issuer}/interaction/[\\w-]+$`));

  const auto = new URL(`${interactionUrl}/auto`);
  auto.searchParams.set('account', account);
  if (resumeByClient) auto.searchParams.set('resume', 'client');
  let response = await fetch(auto, { redirect: 'manual' });
  assert.equal(response.status, 303, `auto: ${response.status} ${await response.text()}`);
  let location = response.headers.get('location');

  if (resumeByClient) {
    const uid = interactionUrl.slice(interactionUrl.lastIndexOf('/') + 1);
    assert.equal(location, `${issuer}/auth/${uid}`);
    // Without the cookie the authorization server refuses to resume.
    const bare = await fetch(location, { redirect: 'manual' });
    assert.equal(bare.status, 400, `resume without cookie: ${bare.status}`);
    const cookie = start.headers.getSetCookie().find((c) => c.startsWith('_interaction_resume='));
    assert.ok(cookie, 'authorize set no _interaction_resume cookie');
    response = await fetch(location, { redirect: 'manual', headers: { cookie: cookie.split(';')[0] } });
    assert.equal(response.status, 303, `resume: ${response.status} ${await response.text()}`);
    location = response.headers.get('location');
  }

  const callback = new URL(location);
  assert.equal(`${callback.origin}${callback.pathname}`, REDIRECT_URI);
  assert.equal(callback.searchParams.get('state'), state);
  assert.equal(callback.searchParams.get('iss'), issuer);
  const code = callback.searchParams.get('code');
  assert.ok(code, `no code in ${location}`);
  return { code, verifier };
}

async function exchangeCode(issuer, client, { code, verifier }, resource) {
  const params = { grant_type: 'authorization_code', code, redirect_uri: REDIRECT_URI, code_verifier: verifier };
  if (resource) params.resource = resource;
  const { status, body } = await clientPost(issuer, '/token', client, params);
  assert.equal(status, 200, JSON.stringify(body));
  return body;
}

async function refresh(issuer, client, refreshToken, resource) {
  const params = { grant_type: 'refresh_token', refresh_token: refreshToken };
  if (resource) params.resource = resource;
  return clientPost(issuer, '/token', client, params);
}

function checkAccessToken(tokens, { sub, aud, issuer, clientId }) {
  assert.equal(tokens.token_type, 'Bearer');
  assert.equal(tokens.expires_in, ACCESS_TTL);
  const header = jwtHeader(tokens.access_token);
  assert.equal(header.typ, 'at+jwt');
  assert.equal(header.alg, 'RS256');
  const claims = jwtPayload(tokens.access_token);
  assert.equal(claims.sub, sub);
  assert.equal(claims.aud, aud);
  assert.equal(claims.iss, issuer);
  assert.equal(claims.client_id, clientId);
  assert.equal(claims.scope, 'mcp:tools');
  assert.equal(claims.exp - claims.iat, ACCESS_TTL);
  return claims;
}

// ---------------------------------------------------------------------------------------------
// MCP helpers

// One JSON-RPC POST to /mcp with plain fetch; answers may come as JSON or as an SSE stream.
async function mcpPost(url, token, sessionId, message) {
  const headers = {
    'content-type': 'application/json',
    accept: 'application/json, text/event-stream',
  };
  if (token) headers.authorization = `Bearer ${token}`;
  if (sessionId) {
    headers['mcp-session-id'] = sessionId;
    headers['mcp-protocol-version'] = '2025-11-25';
  }
  const response = await fetch(url, { method: 'POST', headers, body: JSON.stringify(message) });
  const text = await response.text();
  let messages = [];
  if ((response.headers.get('content-type') ?? '').includes('text/event-stream')) {
    messages = text.split('\n').filter((l) => l.startsWith('data:')).map((l) => l.slice(5).trim()).filter(Boolean).map((d) => JSON.parse(d));
  } else if (text) {
    messages = [JSON.parse(text)];
  }
  return { status: response.status, headers: response.headers, messages, text };
}

async function mcpOpen(url, token) {
  const init = await mcpPost(url, token, undefined, {
    jsonrpc: '2.0',
    id: 1,
    method: 'initialize',
    params: { protocolVersion: '2025-11-25', capabilities: {}, clientInfo: { name: 'oauth-fixtures-check', version: '1.0.0' } },
  });
  assert.equal(init.status, 200, init.text);
  const sessionId = init.headers.get('mcp-session-id');
  assert.ok(sessionId, 'no mcp-session-id');
  const note = await mcpPost(url, token, sessionId, { jsonrpc: '2.0', method: 'notifications/initialized' });
  assert.equal(note.status, 202, note.text);
  return sessionId;
}

let rpcId = 10;
async function mcpCall(url, token, sessionId, name, args = {}) {
  return mcpPost(url, token, sessionId, { jsonrpc: '2.0', id: ++rpcId, method: 'tools/call', params: { name, arguments: args } });
}

async function mcpCallText(url, token, sessionId, name, args) {
  const result = await mcpCall(url, token, sessionId, name, args);
  assert.equal(result.status, 200, result.text);
  const reply = result.messages.find((m) => m.id === rpcId);
  assert.ok(reply?.result, result.text);
  return reply.result.content[0].text;
}

// The SDK's own client, with the token as a static header.
async function sdkWhoami(url, token) {
  const client = new Client({ name: 'oauth-fixtures-check', version: '1.0.0' });
  const transport = new StreamableHTTPClientTransport(new URL(url), {
    requestInit: { headers: { authorization: `Bearer ${token}` } },
  });
  await client.connect(transport);
  try {
    const result = await client.callTool({ name: 'whoami', arguments: {} });
    return result.content[0].text;
  } finally {
    await client.close();
  }
}

function assertUnauthorized(result, resourceMetadataUrl) {
  assert.equal(result.status, 401, result.text);
  const challenge = result.headers.get('www-authenticate') ?? '';
  assert.match(challenge, /^Bearer /);
  assert.match(challenge, /error="invalid_token"/);
  assert.ok(challenge.includes(`resource_metadata="${resourceMetadataUrl}"`), challenge);
}

// ---------------------------------------------------------------------------------------------
// Steps

const results = [];
async function step(name, fn) {
  const started = performance.now();
  try {
    const note = await fn();
    const ms = Math.round(performance.now() - started);
    results.push({ name, ms, ok: true });
    console.log(`ok   ${String(ms).padStart(5)} ms  ${name}${note ? `  (${note})` : ''}`);
  } catch (err) {
    const ms = Math.round(performance.now() - started);
    results.push({ name, ms, ok: false });
    console.log(`FAIL ${String(ms).padStart(5)} ms  ${name}\n${err.stack ?? err}`);
    throw err;
  }
}

let as;
let mcp;
const expectedAs = {
  token_requests: { authorization_code: 0, refresh_token: 0, client_credentials: 0 },
  revocations: 0,
  registrations: 0,
  authorizations: 0,
};
const expectedMcp = { calls: 0, unauthorized: 0, subjects: {} };
const called = (sub, n = 1) => {
  expectedMcp.calls += n;
  expectedMcp.subjects[sub] = (expectedMcp.subjects[sub] ?? 0) + n;
};

async function main() {
  let issuer;
  let mcpUrl;
  let resourceMetadataUrl;
  let client;
  let machine;
  const alice = {};
  const bob = {};

  await step('start oauth-as (--access-ttl 3) and protected-mcp-server', async () => {
    as = await startFixture('oauth-as.mjs', ['--port', '0', '--access-ttl', String(ACCESS_TTL)]);
    issuer = as.url;
    mcp = await startFixture('protected-mcp-server.mjs', ['--port', '0', '--issuer', issuer]);
    mcpUrl = mcp.url;
    resourceMetadataUrl = `${new URL(mcpUrl).origin}/.well-known/oauth-protected-resource/mcp`;
    return `${issuer}, ${mcpUrl}`;
  });

  await step('metadata: RFC 8414 + OpenID discovery + RFC 9728, 401 challenge', async () => {
    const oauth = await (await fetch(`${issuer}/.well-known/oauth-authorization-server`)).json();
    const oidc = await (await fetch(`${issuer}/.well-known/openid-configuration`)).json();
    assert.deepEqual(oauth, oidc);
    assert.equal(oauth.issuer, issuer);
    assert.deepEqual(oauth.code_challenge_methods_supported, ['S256']);
    assert.equal(oauth.registration_endpoint, `${issuer}/reg`);
    assert.equal(oauth.revocation_endpoint, `${issuer}/token/revocation`);
    assert.equal(oauth.token_endpoint, `${issuer}/token`);
    assert.equal(oauth.authorization_endpoint, `${issuer}/auth`);
    assert.equal(oauth.jwks_uri, `${issuer}/jwks`);
    for (const method of ['client_secret_basic', 'client_secret_post', 'none']) {
      assert.ok(oauth.token_endpoint_auth_methods_supported.includes(method), method);
    }
    for (const scope of ['offline_access', 'mcp:tools']) assert.ok(oauth.scopes_supported.includes(scope), scope);
    assert.equal(oauth.authorization_response_iss_parameter_supported, true);

    const prm = await (await fetch(resourceMetadataUrl)).json();
    assert.equal(prm.resource, mcpUrl);
    assert.deepEqual(prm.authorization_servers, [issuer]);
    assert.deepEqual(prm.scopes_supported, ['mcp:tools']);

    assertUnauthorized(await mcpPost(mcpUrl, undefined, undefined, { jsonrpc: '2.0', id: 1, method: 'ping' }), resourceMetadataUrl);
    expectedMcp.unauthorized += 1;
  });

  await step('dynamic client registration (web, client_secret_basic, http loopback redirect)', async () => {
    client = await register(issuer, {
      redirect_uris: [REDIRECT_URI],
      application_type: 'web',
      token_endpoint_auth_method: 'client_secret_basic',
      grant_types: ['authorization_code', 'refresh_token'],
      response_types: ['code'],
      client_name: 'oauth-fixtures-check',
    });
    expectedAs.registrations += 1;
    assert.ok(client.client_id && client.client_secret);
    assert.equal(client.token_endpoint_auth_method, 'client_secret_basic');
  });

  await step('headless authorization for alice (PKCE S256, resource)', async () => {
    alice.grant = await authorize(issuer, client, { account: 'alice', resource: mcpUrl });
    expectedAs.authorizations += 1;
  });

  await step('code exchange with resource: JWT access token + refresh token', async () => {
    alice.tokens = await exchangeCode(issuer, client, alice.grant, mcpUrl);
    expectedAs.token_requests.authorization_code += 1;
    alice.issuedAt = Date.now();
    assert.ok(alice.tokens.refresh_token);
    assert.equal(alice.tokens.scope, 'mcp:tools');
    checkAccessToken(alice.tokens, { sub: 'alice', aud: mcpUrl, issuer, clientId: client.client_id });
  });

  await step('MCP initialize + whoami/echo/slow as alice', async () => {
    alice.session = await mcpOpen(mcpUrl, alice.tokens.access_token);
    assert.equal(await mcpCallText(mcpUrl, alice.tokens.access_token, alice.session, 'whoami'), 'alice');
    assert.equal(await mcpCallText(mcpUrl, alice.tokens.access_token, alice.session, 'echo', { text: 'hé "x"' }), 'hé "x"');
    assert.equal(await mcpCallText(mcpUrl, alice.tokens.access_token, alice.session, 'slow', { ms: 100 }), 'done');
    called('alice', 3);
  });

  await step('expired access token gets 401 (waits for expiry + 1 s)', async () => {
    await sleep(Math.max(0, alice.issuedAt + (ACCESS_TTL + 1) * 1000 - Date.now()));
    const result = await mcpCall(mcpUrl, alice.tokens.access_token, alice.session, 'whoami');
    assertUnauthorized(result, resourceMetadataUrl);
    expectedMcp.unauthorized += 1;
    return result.headers.get('www-authenticate');
  });

  await step('refresh without resource: rotated refresh token, same MCP session works', async () => {
    const { status, body } = await refresh(issuer, client, alice.tokens.refresh_token);
    expectedAs.token_requests.refresh_token += 1;
    assert.equal(status, 200, JSON.stringify(body));
    assert.ok(body.refresh_token && body.refresh_token !== alice.tokens.refresh_token, 'refresh token not rotated');
    checkAccessToken(body, { sub: 'alice', aud: mcpUrl, issuer, clientId: client.client_id });
    assert.equal(await mcpCallText(mcpUrl, body.access_token, alice.session, 'whoami'), 'alice');
    called('alice');
    alice.previous = alice.tokens;
    alice.tokens = body;
  });

  await step('reusing the rotated refresh token: invalid_grant, and the whole grant is revoked', async () => {
    const reused = await refresh(issuer, client, alice.previous.refresh_token);
    expectedAs.token_requests.refresh_token += 1;
    assert.equal(reused.status, 400, JSON.stringify(reused.body));
    assert.equal(reused.body.error, 'invalid_grant');
    // oidc-provider's reuse detection: the current refresh token of that grant dies too.
    const current = await refresh(issuer, client, alice.tokens.refresh_token);
    expectedAs.token_requests.refresh_token += 1;
    assert.equal(current.status, 400, JSON.stringify(current.body));
    assert.equal(current.body.error, 'invalid_grant');
    return `${reused.body.error_description}; then ${current.body.error_description}`;
  });

  await step('headless authorization for bob, code exchange without resource, SDK client whoami', async () => {
    bob.grant = await authorize(issuer, client, { account: 'bob', resource: mcpUrl });
    expectedAs.authorizations += 1;
    bob.tokens = await exchangeCode(issuer, client, bob.grant);
    expectedAs.token_requests.authorization_code += 1;
    checkAccessToken(bob.tokens, { sub: 'bob', aud: mcpUrl, issuer, clientId: client.client_id });
    assert.equal(await sdkWhoami(mcpUrl, bob.tokens.access_token), 'bob');
    called('bob');
  });

  await step('refresh with resource, revoke (RFC 7009) the new refresh token, refresh fails', async () => {
    const first = await refresh(issuer, client, bob.tokens.refresh_token, mcpUrl);
    expectedAs.token_requests.refresh_token += 1;
    assert.equal(first.status, 200, JSON.stringify(first.body));
    checkAccessToken(first.body, { sub: 'bob', aud: mcpUrl, issuer, clientId: client.client_id });
    const revoked = await clientPost(issuer, '/token/revocation', client, {
      token: first.body.refresh_token,
      token_type_hint: 'refresh_token',
    });
    expectedAs.revocations += 1;
    assert.equal(revoked.status, 200, JSON.stringify(revoked.body));
    const after = await refresh(issuer, client, first.body.refresh_token);
    expectedAs.token_requests.refresh_token += 1;
    assert.equal(after.status, 400, JSON.stringify(after.body));
    assert.equal(after.body.error, 'invalid_grant');
    return after.body.error_description;
  });

  await step('resume by the client itself (/auth/UID with the _interaction_resume cookie) for carol', async () => {
    const grant = await authorize(issuer, client, { account: 'carol', resource: mcpUrl, resumeByClient: true });
    expectedAs.authorizations += 1;
    const tokens = await exchangeCode(issuer, client, grant, mcpUrl);
    expectedAs.token_requests.authorization_code += 1;
    checkAccessToken(tokens, { sub: 'carol', aud: mcpUrl, issuer, clientId: client.client_id });
  });

  await step('user refusal through /interaction/UID/deny', async () => {
    const query = new URLSearchParams({
      response_type: 'code', client_id: client.client_id, redirect_uri: REDIRECT_URI, scope: 'mcp:tools',
      state: 's', code_challenge: b64url(crypto.randomBytes(32)), code_challenge_method: 'S256', resource: mcpUrl,
    });
    const start = await fetch(`${issuer}/auth?${query}`, { redirect: 'manual' });
    expectedAs.authorizations += 1;
    const deny = await fetch(`${start.headers.get('location')}/deny`, { redirect: 'manual' });
    assert.equal(deny.status, 303);
    const callback = new URL(deny.headers.get('location'));
    assert.equal(callback.searchParams.get('error'), 'access_denied');
    assert.equal(callback.searchParams.get('state'), 's');
  });

  await step('client_credentials: wrong audience gets 401, right audience acts as the client', async () => {
    machine = await register(issuer, {
      redirect_uris: [],
      application_type: 'web',
      token_endpoint_auth_method: 'client_secret_post',
      grant_types: ['client_credentials'],
      response_types: [],
    });
    expectedAs.registrations += 1;
    const other = await clientPost(issuer, '/token', machine, {
      grant_type: 'client_credentials', scope: 'mcp:tools', resource: 'http://127.0.0.1:9/other',
    });
    expectedAs.token_requests.client_credentials += 1;
    assert.equal(other.status, 200, JSON.stringify(other.body));
    assert.equal(jwtPayload(other.body.access_token).aud, 'http://127.0.0.1:9/other');
    assertUnauthorized(await mcpPost(mcpUrl, other.body.access_token, undefined, {
      jsonrpc: '2.0', id: 1, method: 'initialize',
      params: { protocolVersion: '2025-11-25', capabilities: {}, clientInfo: { name: 'x', version: '1' } },
    }), resourceMetadataUrl);
    expectedMcp.unauthorized += 1;
    const right = await clientPost(issuer, '/token', machine, {
      grant_type: 'client_credentials', scope: 'mcp:tools', resource: mcpUrl,
    });
    expectedAs.token_requests.client_credentials += 1;
    assert.equal(right.status, 200, JSON.stringify(right.body));
    assert.equal(right.body.refresh_token, undefined);
    assert.equal(await sdkWhoami(mcpUrl, right.body.access_token), machine.client_id);
    called(machine.client_id);
  });

  await step('/test/stats of both fixtures match', async () => {
    assert.deepEqual(await (await fetch(`${issuer}/test/stats`)).json(), expectedAs);
    const stats = await (await fetch(`${new URL(mcpUrl).origin}/test/stats`)).json();
    assert.deepEqual({ calls: stats.calls, unauthorized: stats.unauthorized, subjects: stats.subjects }, expectedMcp);
    assert.deepEqual(as.extraStdout, [], 'oauth-as printed more than its listening line');
    assert.deepEqual(mcp.extraStdout, [], 'protected-mcp-server printed more than its listening line');
    return JSON.stringify(expectedAs);
  });

  let restartMs;
  await step('restart oauth-as on the same port: old client unknown (invalid_client), old tokens 401', async () => {
    const port = new URL(issuer).port;
    // A token of the old run, still unexpired after the restart.
    const live = await clientPost(issuer, '/token', machine, {
      grant_type: 'client_credentials', scope: 'mcp:tools', resource: mcpUrl,
    });
    assert.equal(live.status, 200, JSON.stringify(live.body));
    const restartStarted = performance.now();
    await stopFixture(as);
    // While the authorization server is down the MCP server still knows its last key set.
    assert.equal(await sdkWhoami(mcpUrl, live.body.access_token), machine.client_id);
    called(machine.client_id);
    as = await startFixture('oauth-as.mjs', ['--port', port, '--access-ttl', String(ACCESS_TTL)]);
    restartMs = Math.round(performance.now() - restartStarted);
    assert.equal(as.url, issuer);
    const stale = await refresh(issuer, client, bob.tokens.refresh_token);
    assert.equal(stale.status, 401, JSON.stringify(stale.body));
    assert.equal(stale.body.error, 'invalid_client');
    assert.deepEqual(await (await fetch(`${issuer}/test/stats`)).json(), {
      token_requests: { authorization_code: 0, refresh_token: 1, client_credentials: 0 },
      revocations: 0,
      registrations: 0,
      authorizations: 0,
    });
    // The MCP server refetches the key set for the unknown key id and still rejects the token.
    assert.ok(jwtPayload(live.body.access_token).exp > Date.now() / 1000, 'token expired already');
    const stale401 = await mcpPost(mcpUrl, live.body.access_token, undefined, { jsonrpc: '2.0', id: 1, method: 'ping' });
    assertUnauthorized(stale401, resourceMetadataUrl);
    assert.match(stale401.headers.get('www-authenticate'), /ERR_JWKS_NO_MATCHING_KEY/);
    return `restart took ${restartMs} ms`;
  });

  await step('after the restart: register again, log in again, MCP server accepts the new key', async () => {
    const fresh = await register(issuer, {
      redirect_uris: [REDIRECT_URI],
      application_type: 'web',
      token_endpoint_auth_method: 'none',
    });
    const grant = await authorize(issuer, fresh, { account: 'alice', resource: mcpUrl });
    const tokens = await exchangeCode(issuer, fresh, grant, mcpUrl);
    checkAccessToken(tokens, { sub: 'alice', aud: mcpUrl, issuer, clientId: fresh.client_id });
    assert.ok(tokens.refresh_token, 'public client got no refresh token');
    assert.equal(await sdkWhoami(mcpUrl, tokens.access_token), 'alice');
  });
}

let failed = false;
try {
  await main();
} catch {
  failed = true;
  for (const [name, fixture] of [['oauth-as', as], ['protected-mcp-server', mcp]]) {
    if (fixture) console.log(`--- ${name} stderr ---\n${fixture.stderr()}`);
  }
} finally {
  for (const fixture of [mcp, as]) if (fixture) await stopFixture(fixture);
  for (const proc of children) proc.kill('SIGKILL');
}
const passed = results.filter((r) => r.ok).length;
console.log(`oauth-fixtures: ${passed} passed, ${results.length - passed} failed`);
process.exit(failed ? 1 : 0);
