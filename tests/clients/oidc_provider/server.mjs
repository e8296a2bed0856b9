// Independent OAuth 2.0 authorization server for bearer-proxy end-to-end tests,
// built on panva's `oidc-provider` (see package.json for the pinned version).
//
//   node server.mjs <config.json>
//
// config.json:
//   {
//     "scope": "api.read",
//     "clients": [
//       {"client_id": "jwt-client", "certificate_pem": "-----BEGIN CERTIFICATE-----...", "alg": "PS256"},
//       {"client_id": "basic-client", "client_secret": "s3cret", "auth": "client_secret_basic"},
//       {"client_id": "post-client", "client_secret": "s3cret", "auth": "client_secret_post"}
//     ]
//   }
//
// Optional per-client fields: "kid" (sets the registered JWK's kid; only needed when
// the assertion header carries a kid), "alg" may be omitted for certificate clients
// (then any of RS256/PS256/ES256/Ed25519/EdDSA matching the key type is accepted),
// "scope" (space separated, defaults to the top-level scope).
//
// Listens on 127.0.0.1, ephemeral port. When ready it writes exactly one line to
// stdout: {"issuer":...,"token_endpoint":...,"introspection_endpoint":...}
// Everything else goes to stderr. SIGTERM/SIGINT exit 0.
//
// On Node 20 oidc-provider 9.x prints one harmless stderr line at import:
// "oidc-provider WARNING: Unsupported runtime. Use Node.js v22.x LTS ..." (a
// policy check on process.release.lts in its lib/index.js; nothing is disabled).
// Set DEBUG=oidc-provider:* for the library's own debug output (also stderr).

import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as http from 'node:http';

// stdout is reserved for the single readiness line. oidc-provider prints some
// notices with console.info (stdout); route every console method to stderr.
for (const m of ['log', 'info', 'debug']) {
  console[m] = (...args) => console.error(...args);
}

const log = (obj) => {
  process.stderr.write(`[oidc-provider-test] ${JSON.stringify({ t: new Date().toISOString(), ...obj })}\n`);
};

const { default: Provider } = await import('oidc-provider');

// ---------------------------------------------------------------- config

if (process.argv.length < 3) {
  process.stderr.write('usage: node server.mjs <config.json>\n');
  process.exit(2);
}
const config = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const defaultScope = config.scope ?? 'api.read';
if (!Array.isArray(config.clients) || config.clients.length === 0) {
  throw new Error('config.clients must be a non-empty array');
}

function jwkFromCertificate(pem, kid) {
  const cert = new crypto.X509Certificate(pem);
  const jwk = cert.publicKey.export({ format: 'jwk' });
  jwk.use = 'sig';
  // Informational only: oidc-provider selects verification keys by kty/crv/alg/kid,
  // never by x5c / x5t / x5t#S256 (lib/helpers/keystore.js selectForDSA).
  jwk.x5c = [cert.raw.toString('base64')];
  jwk['x5t#S256'] = crypto.createHash('sha256').update(cert.raw).digest('base64url');
  if (kid !== undefined) jwk.kid = kid;
  return jwk;
}

const allScopes = new Set([defaultScope]);
const clients = config.clients.map((c) => {
  if (!c.client_id) throw new Error('every client needs a client_id');
  const scope = c.scope ?? defaultScope;
  scope.split(' ').forEach((s) => allScopes.add(s));
  const base = {
    client_id: c.client_id,
    grant_types: ['client_credentials'],
    response_types: [],
    redirect_uris: [],
    scope,
  };
  if (c.certificate_pem) {
    const client = {
      ...base,
      token_endpoint_auth_method: 'private_key_jwt',
      jwks: { keys: [jwkFromCertificate(c.certificate_pem, c.kid)] },
    };
    if (c.alg) client.token_endpoint_auth_signing_alg = c.alg;
    return client;
  }
  if (c.client_secret) {
    const method = c.auth ?? 'client_secret_basic';
    if (!['client_secret_basic', 'client_secret_post'].includes(method)) {
      throw new Error(`client ${c.client_id}: unsupported auth ${method}`);
    }
    return { ...base, client_secret: c.client_secret, token_endpoint_auth_method: method };
  }
  throw new Error(`client ${c.client_id}: needs certificate_pem or client_secret`);
});

// ---------------------------------------------------------------- adapter
// Plain Map storage with expiry (the built-in memory adapter is an LRU capped at
// 1000 entries and prints a "development-only" warning).

const store = new Map();
class MapAdapter {
  constructor(name) { this.name = name; }

  key(id) { return `${this.name}:${id}`; }

  async upsert(id, payload, expiresIn) {
    const expiresAt = expiresIn ? Date.now() + expiresIn * 1000 : Infinity;
    store.set(this.key(id), { payload, expiresAt });
  }

  async find(id) {
    const k = this.key(id);
    const e = store.get(k);
    if (!e) return undefined;
    if (e.expiresAt <= Date.now()) { store.delete(k); return undefined; }
    return e.payload;
  }

  async findByUserCode() { return undefined; }

  async findByUid() { return undefined; }

  async consume(id) {
    const e = store.get(this.key(id));
    if (e) e.payload.consumed = Math.floor(Date.now() / 1000);
  }

  async destroy(id) { store.delete(this.key(id)); }

  async revokeByGrantId(grantId) {
    for (const [k, e] of store) {
      if (e.payload?.grantId === grantId) store.delete(k);
    }
  }
}

// ---------------------------------------------------------------- provider

const server = http.createServer();
await new Promise((resolve, reject) => {
  server.once('error', reject);
  server.listen(0, '127.0.0.1', resolve);
});
const { port } = server.address();
const issuer = `http://127.0.0.1:${port}`;

const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
const signingJwk = { ...privateKey.export({ format: 'jwk' }), use: 'sig', alg: 'RS256', kid: 'test-signing-key' };

const provider = new Provider(issuer, {
  adapter: MapAdapter,
  clients,
  jwks: { keys: [signingJwk] },
  scopes: ['openid', 'offline_access', ...allScopes],
  clientAuthMethods: ['client_secret_basic', 'client_secret_post', 'private_key_jwt'],
  // clockTolerance left at the library default (15 seconds).
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    introspection: {
      enabled: true,
      // Any authenticated (confidential) client may introspect any token.
      allowedPolicy: async () => true,
    },
    revocation: { enabled: false },
  },
  ttl: {
    ClientCredentials: 600,
  },
  // Defaults of these print "you SHOULD change it" notices when called.
  clientBasedCORS: () => false,
  renderError: async (ctx, out) => {
    ctx.type = 'json';
    ctx.body = out;
  },
  cookies: { keys: [crypto.randomBytes(32).toString('base64url')] },
});

// ---------------------------------------------------------------- logging

function describeCause(err) {
  const chain = [];
  let cur = err?.cause;
  for (let i = 0; cur && i < 5; i += 1, cur = cur.cause) {
    chain.push(`${cur.name ?? 'Error'}${cur.code ? `(${cur.code})` : ''}: ${cur.message}`);
  }
  return chain.length ? chain : undefined;
}

function assertionSummary(ctx) {
  const assertion = ctx.oidc?.params?.client_assertion;
  if (typeof assertion !== 'string') return undefined;
  try {
    const [h, p] = assertion.split('.');
    return {
      header: JSON.parse(Buffer.from(h, 'base64url').toString('utf8')),
      claims: JSON.parse(Buffer.from(p, 'base64url').toString('utf8')),
      server_time: Math.floor(Date.now() / 1000),
    };
  } catch {
    return { undecodable: true };
  }
}

function clientIdOf(ctx) {
  return ctx.oidc?.client?.clientId ?? ctx.oidc?.params?.client_id ?? undefined;
}

function logError(event) {
  return (ctx, err) => {
    log({
      event,
      path: ctx.path,
      status: err.statusCode ?? err.status ?? 500,
      error: err.error ?? err.message,
      error_description: err.error_description,
      // the internal reason, e.g. "jwt expired", "alg mismatch", "signature verification failed"
      reason: err.error_detail,
      cause: describeCause(err),
      client_id: clientIdOf(ctx),
      auth_method: ctx.oidc?.client?.clientAuthMethod,
      grant_type: ctx.oidc?.params?.grant_type,
      client_assertion: assertionSummary(ctx),
    });
  };
}

for (const ev of ['grant.error', 'introspection.error', 'discovery.error', 'jwks.error']) {
  provider.on(ev, logError(ev));
}
provider.on('server_error', (ctx, err) => {
  logError('server_error')(ctx, err);
  process.stderr.write(`${err?.stack ?? err}\n`);
});

provider.on('grant.success', (ctx) => {
  const token = ctx.oidc.entities.ClientCredentials;
  log({
    event: 'grant.success',
    grant_type: ctx.oidc.params.grant_type,
    client_id: ctx.oidc.client?.clientId,
    auth_method: ctx.oidc.client?.clientAuthMethod,
    scope: token?.scope,
    expires_in: token?.expiration,
  });
});

// One line per request (after the response is decided).
provider.use(async (ctx, next) => {
  await next();
  let extra;
  if (ctx.oidc?.route === 'introspection' && ctx.status === 200 && ctx.body && typeof ctx.body === 'object') {
    extra = { active: ctx.body.active, token_client_id: ctx.body.client_id };
  }
  log({
    event: 'request',
    method: ctx.method,
    path: ctx.path,
    status: ctx.status,
    client_id: clientIdOf(ctx),
    ...extra,
  });
});

server.on('request', provider.callback());

// Resolve the real endpoint URLs from the provider itself (same as discovery).
const tokenEndpoint = provider.urlFor('token');
const introspectionEndpoint = provider.urlFor('introspection');

const shutdown = () => {
  server.close(() => process.exit(0));
  server.closeAllConnections?.();
  setTimeout(() => process.exit(0), 2000).unref();
};
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);

log({ event: 'ready', issuer, clients: clients.map((c) => `${c.client_id}(${c.token_endpoint_auth_method}${c.token_endpoint_auth_signing_alg ? `/${c.token_endpoint_auth_signing_alg}` : ''})`) });
process.stdout.write(`${JSON.stringify({
  issuer,
  token_endpoint: tokenEndpoint,
  introspection_endpoint: introspectionEndpoint,
})}\n`);
