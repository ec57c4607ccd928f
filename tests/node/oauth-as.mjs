#!/usr/bin/env node
// OAuth 2 authorization server fixture for the end-to-end tests of Portcullis' upstream OAuth
// client (the vault). The protocol work is done by oidc-provider (a certified OpenID/OAuth
// implementation); this file only configures it and adds a few test-only routes.
//
//   node oauth-as.mjs [--port N] [--access-ttl SECONDS] [--scopes "mcp:tools ..."] [--no-par]
//
// oidc-provider 9 supports Node 22 LTS and later (tests/node/node_modules/.bin/node); under the
// machine's Node 20 it works too but prints an "Unsupported runtime" warning on stderr.
// Binds 127.0.0.1 only (--port 0, the default, picks a free port) and prints exactly one line on
// stdout once ready: `listening http://127.0.0.1:PORT` (the issuer, no trailing slash). Every
// other output goes to stderr. All state (clients, grants, tokens, sessions) lives in memory and
// the signing key is generated at start, so restarting on the same port gives an authorization
// server that knows none of the previous clients or tokens.
//
// What it serves:
//   /.well-known/openid-configuration and /.well-known/oauth-authorization-server (same document)
//   /auth (authorization, code flow only, PKCE S256 required), /token, /token/revocation (RFC 7009),
//   /reg (open dynamic client registration, RFC 7591), /jwks, /request (PAR, RFC 9126; not with
//   --no-par, which also leaves it out of the metadata), /me (userinfo).
//   Access tokens are RFC 9068 JWTs (typ at+jwt, RS256) whenever a `resource` (RFC 8707) is
//   involved: aud = the resource, sub = the account, scope, client_id, exp = iat + --access-ttl.
//   Any http loopback URL (127.0.0.1, localhost, [::1], any port) is accepted as a resource.
//   Refresh tokens go to every client registered with the refresh_token grant (the default for
//   registrations here), whether or not offline_access was asked for, and rotate on every use.
//   Presenting an already rotated refresh token fails with invalid_grant AND revokes the whole
//   grant (every refresh token of that login), as oidc-provider does on refresh token reuse.
//   Revoking a refresh token revokes its grant too. An authorization request (GET) without
//   `scope` is given the --scopes scopes. offline_access is dropped from a request that lacks
//   prompt=consent (OpenID Connect rule); refresh tokens are issued all the same.
//
// Test-only routes (no person is involved in the tests; the test plays the browser):
//   GET /interaction/UID                  JSON description of a pending interaction.
//   GET /interaction/UID/auto?account=ID  logs ID in and grants everything asked (scopes, the
//       resource, offline_access), then resumes the authorization itself and answers with the
//       authorization response: 303 to redirect_uri?code=...&state=...&iss=... No cookie is
//       needed, and none is set. With &resume=client it answers 303 to /auth/UID instead, which
//       the client must GET with the `_interaction_resume` cookie that the authorization endpoint
//       set (path /auth/UID); that response also sets the `_session` login cookie (path /), and a
//       client that sends it back later may get a code without any interaction (single sign-on).
//   GET /interaction/UID/deny             same, but the user refuses: 303 to
//       redirect_uri?error=access_denied&state=...&iss=...
//   GET /test/stats  {"token_requests": {"authorization_code": n, "refresh_token": n,
//       "client_credentials": n}, "revocations": n, "registrations": n, "authorizations": n}
//       counting requests received (failed ones included) at /token (by grant_type),
//       /token/revocation, /reg and /auth.
//
// Headless authorization (what a test does):
//   1. GET  {issuer}/auth?response_type=code&client_id=..&redirect_uri=..&scope=..&state=..
//           &code_challenge=..&code_challenge_method=S256&resource=RESOURCE   (don't follow)
//        -> 303, Location: {issuer}/interaction/UID
//   2. GET  {Location}/auto?account=alice                                   (don't follow)
//        -> 303, Location: REDIRECT_URI?code=..&state=..&iss=..
//   3. POST {issuer}/token grant_type=authorization_code&code=..&redirect_uri=..&code_verifier=..
//           [&resource=RESOURCE] with the client's authentication.

import http from 'node:http';
import crypto from 'node:crypto';
import * as jose from 'jose';
import Provider, { errors } from 'oidc-provider';
// oidc-provider's own in-memory adapter, given an unbounded store: its default store is an LRU
// of 1000 entries, which could silently drop clients during a long test run.
import MemoryAdapter from 'oidc-provider/lib/adapters/memory_adapter.js';
import LRU from 'oidc-provider/lib/helpers/lru.js';

// oidc-provider prints its notices with console.info (stdout); stdout is reserved for the
// `listening` line, so everything else goes to stderr.
const stdoutWrite = (line) => process.stdout.write(`${line}\n`);
console.log = console.error;
console.info = console.error;

function usage(message) {
  if (message) console.error(`oauth-as: ${message}`);
  console.error('usage: node oauth-as.mjs [--port N] [--access-ttl SECONDS] [--scopes "mcp:tools ..."] [--no-par]');
  process.exit(2);
}

let port = 0;
let accessTtl = 10;
let resourceScopes = ['mcp:tools'];
let pushedRequests = true;
{
  const argv = process.argv.slice(2);
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === '--port') {
      port = Number(argv[++i]);
      if (!Number.isInteger(port) || port < 0 || port > 65535) usage(`bad port: ${argv[i]}`);
    } else if (arg === '--access-ttl') {
      accessTtl = Number(argv[++i]);
      if (!Number.isInteger(accessTtl) || accessTtl <= 0) usage(`bad access ttl: ${argv[i]}`);
    } else if (arg === '--scopes') {
      resourceScopes = (argv[++i] ?? '').split(/[\s,]+/).filter(Boolean);
      if (resourceScopes.length === 0) usage('--scopes needs at least one scope');
    } else if (arg === '--no-par') {
      pushedRequests = false;
    } else if (arg === '--help' || arg === '-h') {
      usage();
    } else {
      usage(`unknown argument: ${arg}`);
    }
  }
}

// Request counters for GET /test/stats.
const stats = {
  token_requests: { authorization_code: 0, refresh_token: 0, client_credentials: 0 },
  revocations: 0,
  registrations: 0,
  authorizations: 0,
};

// Resource indicators accepted: any http URL on a loopback host, any port and path.
function isLoopbackResource(resource) {
  const url = URL.parse(resource);
  return !!url && url.protocol === 'http:' && ['127.0.0.1', 'localhost', '[::1]'].includes(url.hostname) && !url.hash;
}

const epochTime = () => Math.floor(Date.now() / 1000);

// The port is known only once listening, and the issuer depends on it: listen first, then build
// the provider and hand it the requests.
let handler = (req, res) => {
  res.statusCode = 503;
  res.end();
};
const server = http.createServer((req, res) => handler(req, res));
server.listen(port, '127.0.0.1');
await new Promise((resolve, reject) => {
  server.once('listening', resolve);
  server.once('error', reject);
});
const issuer = `http://127.0.0.1:${server.address().port}`;

// A fresh signing key every start: tokens of a previous run no longer verify.
const { privateKey } = await jose.generateKeyPair('RS256', { extractable: true });
const signingKey = {
  ...(await jose.exportJWK(privateKey)),
  kid: crypto.randomUUID(),
  alg: 'RS256',
  use: 'sig',
};

const store = new LRU({ maxSize: Number.MAX_SAFE_INTEGER });

const provider = new Provider(issuer, {
  adapter: (model) => new MemoryAdapter(model, store, 0),
  jwks: { keys: [signingKey] },
  // Accounts exist for any id; the only claim is sub.
  async findAccount(_ctx, id) {
    return { accountId: id, async claims() { return { sub: id }; } };
  },
  scopes: ['openid', 'offline_access', ...resourceScopes],
  responseTypes: ['code'],
  pkce: { required: () => true },
  clientDefaults: {
    grant_types: ['authorization_code', 'refresh_token'],
    response_types: ['code'],
    token_endpoint_auth_method: 'client_secret_basic',
    id_token_signed_response_alg: 'RS256',
  },
  clientAuthMethods: ['client_secret_basic', 'client_secret_post', 'none'],
  // Cookies are left unsigned (no keys) so that /interaction/UID/auto can resume an
  // authorization on the client's behalf without a cookie jar.
  cookies: { keys: [] },
  features: {
    pushedAuthorizationRequests: { enabled: pushedRequests },
    devInteractions: { enabled: false },
    dPoP: { enabled: false },
    clientCredentials: { enabled: true },
    registration: { enabled: true, initialAccessToken: false },
    revocation: {
      enabled: true,
      async allowedPolicy(_ctx, client, token) {
        return token.clientId === client.clientId;
      },
    },
    resourceIndicators: {
      enabled: true,
      async defaultResource(_ctx, _client, oneOf) {
        return oneOf;
      },
      async useGrantedResource() {
        return true;
      },
      async getResourceServerInfo(_ctx, resource) {
        if (!isLoopbackResource(resource)) {
          throw new errors.InvalidTarget('only http loopback resources are served by this fixture');
        }
        return {
          scope: resourceScopes.join(' '),
          audience: resource,
          accessTokenTTL: accessTtl,
          accessTokenFormat: 'jwt',
          jwt: { sign: { alg: 'RS256' } },
        };
      },
    },
  },
  async issueRefreshToken(_ctx, client) {
    return client.grantTypeAllowed('refresh_token');
  },
  async expiresWithSession() {
    return false;
  },
  rotateRefreshToken: true,
  ttl: {
    AccessToken: accessTtl,
    ClientCredentials: accessTtl,
    AuthorizationCode: 60,
    RefreshToken: 24 * 60 * 60,
    Grant: 24 * 60 * 60,
    Session: 24 * 60 * 60,
    Interaction: 10 * 60,
    IdToken: 60 * 60,
  },
  interactions: {
    url: async (_ctx, interaction) => `${issuer}/interaction/${interaction.uid}`,
  },
  async renderError(ctx, out) {
    ctx.type = 'json';
    ctx.body = out;
  },
});

// Completes a pending interaction: `result` is an interaction result (login + consent, or an
// error). Then either resumes the authorization here (forwarding the caller's cookies plus the
// resume cookie) and relays its response, or sends the caller to the resume URL. The resumed
// response's cookies (the login session) are not relayed: a caller without a cookie jar stays a
// fresh browser, so every authorization request goes through an interaction again.
async function finishInteraction(ctx, interaction, result, resumeByClient) {
  interaction.result = result;
  await interaction.save(Math.max(interaction.exp - epochTime(), 1));

  if (resumeByClient) {
    ctx.status = 303;
    ctx.redirect(interaction.returnTo);
    return;
  }

  const cookies = [ctx.get('cookie'), `${provider.cookieName('resume')}=${interaction.uid}`].filter(Boolean);
  const resumed = await fetch(interaction.returnTo, {
    redirect: 'manual',
    headers: { cookie: cookies.join('; ') },
  });
  ctx.status = resumed.status;
  for (const name of ['location', 'content-type', 'cache-control']) {
    const value = resumed.headers.get(name);
    if (value) ctx.set(name, value);
  }
  ctx.body = Buffer.from(await resumed.arrayBuffer());
}

async function interactionRoute(ctx, uid, action) {
  const interaction = await provider.Interaction.find(uid);
  if (!interaction) {
    ctx.status = 404;
    ctx.body = { error: 'interaction_not_found', uid };
    return;
  }
  const { params, prompt } = interaction;

  if (action === undefined) {
    ctx.body = {
      uid,
      prompt,
      params,
      client_id: params.client_id,
      auto: `${issuer}/interaction/${uid}/auto?account=ACCOUNT`,
      deny: `${issuer}/interaction/${uid}/deny`,
    };
    return;
  }

  const resumeByClient = ctx.query.resume === 'client';
  if (action === 'deny') {
    await finishInteraction(ctx, interaction, {
      error: 'access_denied',
      error_description: 'the end-user refused the authorization',
    }, resumeByClient);
    return;
  }

  const account = ctx.query.account;
  if (typeof account !== 'string' || account === '') {
    ctx.status = 400;
    ctx.body = { error: 'invalid_request', error_description: 'account query parameter required' };
    return;
  }

  // Consent: everything that was asked, for every requested resource, plus offline_access.
  let grant = interaction.grantId ? await provider.Grant.find(interaction.grantId) : undefined;
  if (!grant || grant.accountId !== account) {
    grant = new provider.Grant({ accountId: account, clientId: params.client_id });
  }
  const scope = [...new Set([...(params.scope ?? '').split(' ').filter(Boolean), 'offline_access'])].join(' ');
  grant.addOIDCScope(scope);
  const resources = params.resource === undefined ? [] : [].concat(params.resource);
  for (const resource of resources) grant.addResourceScope(resource, scope);
  const grantId = await grant.save();

  await finishInteraction(ctx, interaction, {
    login: { accountId: account, remember: false },
    consent: { grantId },
  }, resumeByClient);
}

// Test-only routes and request counters, ahead of oidc-provider's own routes.
provider.use(async (ctx, next) => {
  const { method, path } = ctx;

  if (method === 'GET' && path === '/test/stats') {
    ctx.body = stats;
    return;
  }
  const interactionMatch = path.match(/^\/interaction\/([^/]+)(?:\/(auto|deny))?\/?$/);
  if (method === 'GET' && interactionMatch) {
    await interactionRoute(ctx, interactionMatch[1], interactionMatch[2]);
    return;
  }
  // An authorization request without scope gets the resource scopes (--scopes), as many
  // authorization servers do; oidc-provider itself would answer access_denied (nothing granted).
  if (method === 'GET' && path === '/auth' && !ctx.query.scope && !ctx.query.request_uri) {
    ctx.query = { ...ctx.query, scope: resourceScopes.join(' ') };
  }
  // RFC 8414 metadata: the same document as the OpenID Connect discovery one.
  if (path === '/.well-known/oauth-authorization-server') {
    ctx.path = '/.well-known/openid-configuration';
  }

  try {
    await next();
  } finally {
    if (method === 'POST' && path === '/token') {
      const grantType = String(ctx.oidc?.body?.grant_type ?? 'unknown');
      stats.token_requests[grantType] = (stats.token_requests[grantType] ?? 0) + 1;
    } else if (method === 'POST' && path === '/token/revocation') {
      stats.revocations += 1;
    } else if (method === 'POST' && path === '/reg') {
      stats.registrations += 1;
    } else if ((method === 'GET' || method === 'POST') && path === '/auth') {
      stats.authorizations += 1;
    }
  }
});

provider.on('server_error', (_ctx, err) => console.error('oauth-as: server_error', err));

handler = provider.callback();
stdoutWrite(`listening ${issuer}`);

for (const signal of ['SIGINT', 'SIGTERM']) {
  process.on(signal, () => {
    server.close();
    server.closeAllConnections();
    process.exit(0);
  });
}
