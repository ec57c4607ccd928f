#!/usr/bin/env node
// OAuth-protected upstream MCP server for the end-to-end tests of Portcullis' upstream OAuth
// client (the vault). Token checks are the official MCP TypeScript SDK's bearer middleware
// (requireBearerAuth) with a verifier that validates RFC 9068 JWT access tokens against the
// authorization server's JWKS (jose), as issued by oauth-as.mjs.
//
//   node protected-mcp-server.mjs --issuer http://127.0.0.1:ASPORT [--port N]
//        [--scopes "mcp:tools ..."] [--required-scopes "mcp:tools ..."]
//
// Binds 127.0.0.1 only (--port 0, the default, picks a free port) and prints exactly one line on
// stdout once ready: `listening http://127.0.0.1:PORT/mcp`. The authorization server need not be
// up yet: its metadata is fetched on the first token check, and its key set on every token check
// (so tokens of an authorization server that restarted with new keys are rejected at once; while
// it is down the last key set fetched is used; before any was fetched, token checks answer 500).
//
//   /mcp  Streamable HTTP (stateful sessions; POST, GET and DELETE), bearer token required.
//         A token is accepted when its signature verifies with the issuer's JWKS, typ is at+jwt,
//         iss = --issuer, aud = http://127.0.0.1:PORT/mcp, and it has not expired (no leeway).
//         Otherwise 401 with `WWW-Authenticate: Bearer error="invalid_token", error_description=
//         "...", resource_metadata="http://127.0.0.1:PORT/.well-known/oauth-protected-resource/mcp"`.
//         With --required-scopes, a valid token lacking one of them gets 403 insufficient_scope.
//   /.well-known/oauth-protected-resource/mcp  RFC 9728 metadata: resource = the /mcp URL,
//         authorization_servers = [--issuer], scopes_supported = --scopes (default mcp:tools).
//   GET /test/stats  {"calls": n, "unauthorized": n, "subjects": {sub: n}, "requests": n}:
//         tool calls, 401 answers at /mcp, tool calls per token subject, and /mcp requests that
//         passed the token check.
//
// Tools: whoami -> the token's sub; echo {text} -> text; slow {ms} -> waits ms, then "done".

import { randomUUID } from 'node:crypto';
import * as jose from 'jose';
import * as z from 'zod';
import { McpServer } from '@modelcontextprotocol/sdk/server/mcp.js';
import { StreamableHTTPServerTransport } from '@modelcontextprotocol/sdk/server/streamableHttp.js';
import { createMcpExpressApp } from '@modelcontextprotocol/sdk/server/express.js';
import { requireBearerAuth } from '@modelcontextprotocol/sdk/server/auth/middleware/bearerAuth.js';
import { getOAuthProtectedResourceMetadataUrl } from '@modelcontextprotocol/sdk/server/auth/router.js';
import { InvalidTokenError, ServerError } from '@modelcontextprotocol/sdk/server/auth/errors.js';
import { isInitializeRequest } from '@modelcontextprotocol/sdk/types.js';

const log = (...args) => console.error('[protected-mcp]', ...args);

function usage(message) {
  if (message) console.error(`protected-mcp-server: ${message}`);
  console.error('usage: node protected-mcp-server.mjs --issuer URL [--port N] [--scopes "a b"] [--required-scopes "a b"]');
  process.exit(2);
}

let port = 0;
let issuer;
let scopesSupported = ['mcp:tools'];
let requiredScopes = [];
{
  const argv = process.argv.slice(2);
  const list = (value) => (value ?? '').split(/[\s,]+/).filter(Boolean);
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === '--port') {
      port = Number(argv[++i]);
      if (!Number.isInteger(port) || port < 0 || port > 65535) usage(`bad port: ${argv[i]}`);
    } else if (arg === '--issuer') {
      issuer = argv[++i];
      if (!URL.canParse(issuer ?? '')) usage(`bad issuer: ${issuer}`);
    } else if (arg === '--scopes') {
      scopesSupported = list(argv[++i]);
    } else if (arg === '--required-scopes') {
      requiredScopes = list(argv[++i]);
    } else if (arg === '--help' || arg === '-h') {
      usage();
    } else {
      usage(`unknown argument: ${arg}`);
    }
  }
  if (!issuer) usage('--issuer is required');
}

const stats = { calls: 0, unauthorized: 0, subjects: {}, requests: 0 };

// ---------------------------------------------------------------------------------------------
// Token verification

// The issuer's key set is fetched again for every token check (a loopback request), so a
// restarted authorization server, whose new keys replace the old ones, invalidates every token
// of its previous run at once; while it is down, the last key set fetched is used. Its jwks_uri
// comes from its RFC 8414 metadata (OpenID discovery as a fallback), looked up once.
let jwksUri;
let lastKeys;
async function issuerKeys() {
  try {
    if (!jwksUri) {
      for (const wellKnown of ['oauth-authorization-server', 'openid-configuration']) {
        const response = await fetch(new URL(`/.well-known/${wellKnown}`, issuer), { signal: AbortSignal.timeout(5000) });
        if (response.ok) {
          const found = (await response.json()).jwks_uri;
          if (found) {
            jwksUri = found;
            break;
          }
        }
      }
      if (!jwksUri) throw new Error(`no jwks_uri in the metadata of ${issuer}`);
    }
    const response = await fetch(jwksUri, { signal: AbortSignal.timeout(5000) });
    if (!response.ok) throw new Error(`${jwksUri}: HTTP ${response.status}`);
    lastKeys = jose.createLocalJWKSet(await response.json());
  } catch (err) {
    if (!lastKeys) throw err;
    log('using the last key set fetched:', err.message);
  }
  return lastKeys;
}

function tokenVerifier(resource) {
  return {
    async verifyAccessToken(token) {
      let keys;
      try {
        keys = await issuerKeys();
      } catch (err) {
        log('cannot reach the authorization server:', err.message);
        throw new ServerError('authorization server unreachable');
      }
      let payload;
      try {
        ({ payload } = await jose.jwtVerify(token, keys, {
          issuer,
          audience: resource,
          typ: 'at+jwt',
          algorithms: ['RS256', 'PS256', 'ES256', 'EdDSA'],
        }));
      } catch (err) {
        if (!(err instanceof jose.errors.JOSEError)) {
          log('token check failed:', err);
          throw new ServerError('token check failed');
        }
        // The SDK puts the message in a quoted WWW-Authenticate parameter without escaping,
        // and jose's messages quote claim names: keep the header well-formed.
        throw new InvalidTokenError(`${err.code}: ${err.message}`.replaceAll('"', "'"));
      }
      if (typeof payload.sub !== 'string' || typeof payload.exp !== 'number') {
        throw new InvalidTokenError('token lacks sub or exp');
      }
      return {
        token,
        clientId: String(payload.client_id ?? ''),
        scopes: typeof payload.scope === 'string' ? payload.scope.split(' ').filter(Boolean) : [],
        expiresAt: payload.exp,
        resource: new URL(resource),
        extra: { sub: payload.sub },
      };
    },
  };
}

// ---------------------------------------------------------------------------------------------
// MCP server, one per session

function newMcpServer() {
  const server = new McpServer({ name: 'portcullis-protected-fixture', version: '1.0.0' });
  const counted = (handler) => async (args, extra) => {
    const sub = extra.authInfo?.extra?.sub ?? '';
    stats.calls += 1;
    stats.subjects[sub] = (stats.subjects[sub] ?? 0) + 1;
    return handler(args, extra, sub);
  };
  server.registerTool('whoami', {
    description: "Returns the subject (sub) of the access token this call was made with.",
    inputSchema: {},
  }, counted(async (_args, _extra, sub) => ({ content: [{ type: 'text', text: sub }] })));
  server.registerTool('echo', {
    description: 'Returns its text argument.',
    inputSchema: { text: z.string() },
  }, counted(async ({ text }) => ({ content: [{ type: 'text', text }] })));
  server.registerTool('slow', {
    description: 'Waits ms milliseconds, then answers "done".',
    inputSchema: { ms: z.number().int().min(0).max(600000) },
  }, counted(async ({ ms }, extra) => {
    await new Promise((resolve, reject) => {
      const timer = setTimeout(resolve, ms);
      extra.signal?.addEventListener('abort', () => {
        clearTimeout(timer);
        reject(new Error('cancelled'));
      });
    });
    return { content: [{ type: 'text', text: 'done' }] };
  }));
  return server;
}

// ---------------------------------------------------------------------------------------------
// HTTP

const app = createMcpExpressApp({ host: '127.0.0.1' });
const httpServer = app.listen(port, '127.0.0.1');
await new Promise((resolve, reject) => {
  httpServer.once('listening', resolve);
  httpServer.once('error', reject);
});
const mcpUrl = `http://127.0.0.1:${httpServer.address().port}/mcp`;
const resourceMetadataUrl = getOAuthProtectedResourceMetadataUrl(new URL(mcpUrl));

app.get(new URL(resourceMetadataUrl).pathname, (_req, res) => {
  res.json({
    resource: mcpUrl,
    authorization_servers: [issuer],
    scopes_supported: scopesSupported,
    bearer_methods_supported: ['header'],
    resource_name: 'Portcullis protected MCP fixture',
  });
});

app.get('/test/stats', (_req, res) => res.json(stats));

const transports = new Map(); // mcp-session-id -> StreamableHTTPServerTransport

app.all(
  '/mcp',
  (_req, res, next) => {
    res.on('finish', () => {
      if (res.statusCode === 401) stats.unauthorized += 1;
    });
    next();
  },
  requireBearerAuth({
    verifier: tokenVerifier(mcpUrl),
    requiredScopes,
    resourceMetadataUrl,
    expectedResource: new URL(mcpUrl),
  }),
  async (req, res) => {
    stats.requests += 1;
    try {
      const sessionId = req.headers['mcp-session-id'];
      let transport = typeof sessionId === 'string' ? transports.get(sessionId) : undefined;
      if (!transport) {
        if (sessionId !== undefined) {
          res.status(404).json({ jsonrpc: '2.0', error: { code: -32001, message: 'Session not found' }, id: null });
          return;
        }
        if (req.method !== 'POST' || !isInitializeRequest(req.body)) {
          res.status(400).json({ jsonrpc: '2.0', error: { code: -32000, message: 'No session: send initialize first' }, id: null });
          return;
        }
        transport = new StreamableHTTPServerTransport({
          sessionIdGenerator: () => randomUUID(),
          onsessioninitialized: (id) => transports.set(id, transport),
        });
        transport.onclose = () => {
          if (transport.sessionId) transports.delete(transport.sessionId);
        };
        await newMcpServer().connect(transport);
      }
      await transport.handleRequest(req, res, req.body);
    } catch (err) {
      log('request failed:', err);
      if (!res.headersSent) {
        res.status(500).json({ jsonrpc: '2.0', error: { code: -32603, message: 'Internal error' }, id: null });
      }
    }
  },
);

process.stdout.write(`listening ${mcpUrl}\n`);

for (const signal of ['SIGINT', 'SIGTERM']) {
  process.on(signal, () => {
    httpServer.close();
    httpServer.closeAllConnections();
    process.exit(0);
  });
}
