#!/usr/bin/env node
// A stdio MCP server that, like many real ones (a GitHub or Jira server started with a token
// in its environment), gets its upstream credential from the environment: the access token
// Portcullis puts in UPSTREAM_TOKEN for the person this process serves. Used by the vault's
// end-to-end tests to check one process per person and a restart with every fresh token.
//
//   node token-stdio-server.mjs
//
// Tool `whoami` answers "<sub> pid=<pid> exp=<exp>", read from the JWT access token's payload
// (the signature is the business of the API the token is for, not of this test server).
import { McpServer } from '@modelcontextprotocol/sdk/server/mcp.js';
import { StdioServerTransport } from '@modelcontextprotocol/sdk/server/stdio.js';

const token = process.env.UPSTREAM_TOKEN ?? '';
function claims() {
  const part = token.split('.')[1];
  if (!part) return {};
  try {
    return JSON.parse(Buffer.from(part, 'base64url').toString('utf8'));
  } catch {
    return {};
  }
}

const server = new McpServer({ name: 'token-stdio-server', version: '1.0.0' });
server.registerTool('whoami', { description: 'Who the token in the environment belongs to' }, async () => {
  const c = claims();
  return { content: [{ type: 'text', text: `${c.sub ?? 'nobody'} pid=${process.pid} exp=${c.exp ?? 0}` }] };
});
await server.connect(new StdioServerTransport());
