// Self-test for server.mjs (no Rust involved):  node check.mjs   (after `npm ci`)
// Needs `openssl` and `curl` on PATH. Exits 0 when every expectation holds.
// Set VERBOSE=1 to echo the server's stderr as it arrives.

import { execFileSync, spawn } from 'node:child_process';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as http from 'node:http';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'oidc-provider-check-'));
const SCOPE = 'api.read';

// ------------------------------------------------------------ certificates

function makeCert(name, keyArgs) {
  const key = path.join(tmp, `${name}.key.pem`);
  const cert = path.join(tmp, `${name}.cert.pem`);
  execFileSync('openssl', ['req', '-x509', ...keyArgs, '-nodes', '-keyout', key, '-out', cert,
    '-days', '2', '-subj', `/CN=${name}`], { stdio: ['ignore', 'ignore', 'pipe'] });
  const certPem = fs.readFileSync(cert, 'utf8');
  return {
    certPem,
    key: crypto.createPrivateKey(fs.readFileSync(key)),
    der: new crypto.X509Certificate(certPem).raw,
  };
}

const rsa = makeCert('rsa-client', ['-newkey', 'rsa:2048']);
const ec = makeCert('ec-client', ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256']);
const otherRsaKey = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey;

const config = {
  scope: SCOPE,
  clients: [
    { client_id: 'ps256-client', certificate_pem: rsa.certPem, alg: 'PS256' },
    { client_id: 'rs256-client', certificate_pem: rsa.certPem, alg: 'RS256' },
    { client_id: 'es256-client', certificate_pem: ec.certPem, alg: 'ES256' },
    { client_id: 'basic-client', client_secret: 's3cret', auth: 'client_secret_basic' },
    { client_id: 'post-client', client_secret: 'p0st', auth: 'client_secret_post' },
  ],
};
const configPath = path.join(tmp, 'config.json');
fs.writeFileSync(configPath, JSON.stringify(config));

// ------------------------------------------------------------ server

const child = spawn(process.execPath, [path.join(here, 'server.mjs'), configPath], {
  stdio: ['ignore', 'pipe', 'pipe'],
});
let stderr = '';
child.stderr.setEncoding('utf8');
child.stderr.on('data', (d) => {
  stderr += d;
  if (process.env.VERBOSE) process.stderr.write(d);
});
let stdout = '';
child.stdout.setEncoding('utf8');
const ready = await new Promise((resolve, reject) => {
  const timer = setTimeout(() => reject(new Error(`server not ready in 15s; stderr:\n${stderr}`)), 15000);
  child.stdout.on('data', (d) => {
    stdout += d;
    const nl = stdout.indexOf('\n');
    if (nl !== -1) { clearTimeout(timer); resolve(JSON.parse(stdout.slice(0, nl))); }
  });
  child.on('exit', (code) => reject(new Error(`server exited ${code}; stderr:\n${stderr}`)));
});
const { issuer, token_endpoint: TOKEN, introspection_endpoint: INTROSPECT } = ready;

// ------------------------------------------------------------ helpers

let failures = 0;
function check(name, ok, detail) {
  if (!ok) failures += 1;
  console.log(`${ok ? 'ok  ' : 'FAIL'}  ${name}${detail ? `  -- ${detail}` : ''}`);
}

const b64u = (x) => Buffer.from(typeof x === 'string' ? x : JSON.stringify(x)).toString('base64url');
const now = () => Math.floor(Date.now() / 1000);

function sign(alg, key, input) {
  const data = Buffer.from(input);
  switch (alg) {
    case 'RS256': return crypto.sign('sha256', data, key);
    case 'PS256': return crypto.sign('sha256', data, {
      key, padding: crypto.constants.RSA_PKCS1_PSS_PADDING, saltLength: crypto.constants.RSA_PSS_SALTLEN_DIGEST,
    });
    case 'ES256': return crypto.sign('sha256', data, { key, dsaEncoding: 'ieee-p1363' });
    default: throw new Error(alg);
  }
}

// Build a client assertion. `over` overrides/removes (value undefined) claims,
// `headerOver` the header.
function assertion({ alg, key, der, clientId, aud = TOKEN, thumb = 'x5t#S256', over = {}, headerOver = {}, signer = sign }) {
  const header = { alg, typ: 'JWT' };
  if (thumb === 'x5t#S256') header['x5t#S256'] = crypto.createHash('sha256').update(der).digest('base64url');
  if (thumb === 'x5t') header.x5t = crypto.createHash('sha1').update(der).digest('base64url');
  Object.assign(header, headerOver);
  const t = now();
  const claims = {
    iss: clientId, sub: clientId, aud, jti: crypto.randomUUID(), iat: t, nbf: t, exp: t + 600, ...over,
  };
  for (const k of Object.keys(claims)) if (claims[k] === undefined) delete claims[k];
  for (const k of Object.keys(header)) if (header[k] === undefined) delete header[k];
  const input = `${b64u(header)}.${b64u(claims)}`;
  return `${input}.${signer(alg, key, input).toString('base64url')}`;
}

async function post(url, params, { headers = {}, hostHeader } = {}) {
  const body = new URLSearchParams(params).toString();
  const u = new URL(url);
  return new Promise((resolve, reject) => {
    const req = http.request({
      host: u.hostname, port: u.port, path: u.pathname, method: 'POST',
      headers: {
        'content-type': 'application/x-www-form-urlencoded',
        accept: 'application/json',
        ...(hostHeader ? { host: hostHeader } : {}),
        ...headers,
      },
    }, (res) => {
      let data = '';
      res.setEncoding('utf8');
      res.on('data', (d) => { data += d; });
      res.on('end', () => {
        let json;
        try { json = JSON.parse(data); } catch { json = { raw: data }; }
        resolve({ status: res.statusCode, json, headers: res.headers });
      });
    });
    req.on('error', reject);
    req.end(body);
  });
}

const jwtGrant = (clientAssertion, extra = {}) => ({
  grant_type: 'client_credentials',
  scope: SCOPE,
  client_assertion_type: 'urn:ietf:params:oauth:client-assertion-type:jwt-bearer',
  client_assertion: clientAssertion,
  ...extra,
});

const ps = { alg: 'PS256', key: rsa.key, der: rsa.der, clientId: 'ps256-client' };
const rs = { alg: 'RS256', key: rsa.key, der: rsa.der, clientId: 'rs256-client', thumb: 'x5t' };
const es = { alg: 'ES256', key: ec.key, der: ec.der, clientId: 'es256-client' };

async function tokenFor(opts, extra = { client_id: opts.clientId }) {
  return post(TOKEN, jwtGrant(assertion(opts), extra));
}

function lastLogFor(predicate) {
  return stderr.split('\n').filter((l) => l.startsWith('[oidc-provider-test] '))
    .map((l) => JSON.parse(l.slice('[oidc-provider-test] '.length)))
    .filter(predicate).pop();
}

const summary = (r) => `${r.status} ${JSON.stringify(r.json)}`;
const accepted = (r) => r.status === 200 && typeof r.json.access_token === 'string';
const rejected = (r) => r.status === 401 && r.json.error === 'invalid_client';

// ------------------------------------------------------------ tests

console.log(`server ready: ${JSON.stringify(ready)}`);
check('ready line has issuer http://127.0.0.1:PORT', /^http:\/\/127\.0\.0\.1:\d+$/.test(issuer), issuer);
check('stdout has exactly one line so far', stdout.split('\n').filter(Boolean).length === 1);

const tokens = {};

// (a) PS256 + x5t#S256
let r = await tokenFor(ps);
check('(a) PS256 private_key_jwt, header x5t#S256', accepted(r), summary(r));
tokens['ps256-client'] = r.json.access_token;

// (b) RS256 + x5t (SHA-1)
r = await tokenFor(rs);
check('(b) RS256 private_key_jwt, header x5t', accepted(r), summary(r));
tokens['rs256-client'] = r.json.access_token;

// (c) ES256 EC P-256
r = await tokenFor(es);
check('(c) ES256 private_key_jwt (P-256 cert)', accepted(r), summary(r));
tokens['es256-client'] = r.json.access_token;

// (d) client_secret_basic with curl -u, and client_secret_post
{
  const out = execFileSync('curl', ['-sS', '-w', '\n%{http_code}', '-u', 'basic-client:s3cret',
    '-d', 'grant_type=client_credentials', '-d', `scope=${SCOPE}`, TOKEN], { encoding: 'utf8' });
  const [body, code] = out.trimEnd().split('\n');
  const json = JSON.parse(body);
  check('(d) client_secret_basic via curl -u', code === '200' && !!json.access_token, `${code} ${body}`);
  tokens['basic-client'] = json.access_token;
  r = await post(TOKEN, { grant_type: 'client_credentials', scope: SCOPE, client_id: 'post-client', client_secret: 'p0st' });
  check('(d) client_secret_post', accepted(r), summary(r));
  tokens['post-client'] = r.json.access_token;
  r = await post(TOKEN, { grant_type: 'client_credentials', scope: SCOPE },
    { headers: { authorization: `Basic ${Buffer.from('basic-client:wrong').toString('base64')}` } });
  check('(d) wrong client secret -> 401 invalid_client', rejected(r), summary(r));
}

// (e) introspection
const basicAuth = { authorization: `Basic ${Buffer.from('basic-client:s3cret').toString('base64')}` };
for (const [clientId, token] of Object.entries(tokens)) {
  r = await post(INTROSPECT, { token }, { headers: basicAuth });
  check(`(e) introspect ${clientId} token (as basic-client)`, r.status === 200 && r.json.active === true
    && r.json.client_id === clientId && r.json.scope === SCOPE, summary(r));
}
r = await post(INTROSPECT, { token: 'not-a-real-token' }, { headers: basicAuth });
check('(e) introspect bogus token -> active:false', r.status === 200 && r.json.active === false, summary(r));
r = await post(INTROSPECT, { token: tokens['ps256-client'] });
check('(e) introspection without client auth -> 400 invalid_request', r.status === 400, summary(r));
r = await post(INTROSPECT, {
  client_assertion_type: 'urn:ietf:params:oauth:client-assertion-type:jwt-bearer',
  client_assertion: assertion({ ...ps, aud: INTROSPECT }),
  token: tokens['es256-client'],
});
check('(e) introspection authenticated by private_key_jwt (aud = introspection endpoint)',
  r.status === 200 && r.json.active === true, summary(r));
r = await post(INTROSPECT, { ...jwtGrant(assertion({ ...ps, aud: TOKEN })), token: tokens['es256-client'] });
check('(e) introspection authenticated by private_key_jwt (aud = token endpoint)',
  r.status === 200 && r.json.active === true, summary(r));

// (f) wrong signature
r = await tokenFor({ ...ps, key: otherRsaKey });
check('(f) assertion signed by another key -> 401 invalid_client', rejected(r), summary(r));
await new Promise((res) => { setTimeout(res, 100); });
{
  const line = lastLogFor((l) => l.event === 'grant.error');
  check('(f) stderr explains why', line?.reason === 'signature verification failed', JSON.stringify(line));
}

// (g) replayed jti
{
  const a = assertion(ps);
  const first = await post(TOKEN, jwtGrant(a));
  const second = await post(TOKEN, jwtGrant(a));
  check('(g) first use of an assertion accepted', accepted(first), summary(first));
  check('(g) reused assertion (same jti) rejected', rejected(second), summary(second));
  await new Promise((res) => { setTimeout(res, 50); });
  const why = lastLogFor((l) => l.event === 'grant.error')?.reason;
  check('(g) stderr says why', why === 'client assertion tokens must only be used once', why);
  const jti = crypto.randomUUID();
  const third = await tokenFor({ ...ps, over: { jti } });
  const fourth = await tokenFor({ ...ps, over: { jti } });
  check('(g) fresh assertion, reused jti -> rejected', accepted(third) && rejected(fourth), `${summary(third)} / ${summary(fourth)}`);
  const fifth = await tokenFor({ ...rs, over: { jti } });
  check('(g) same jti but different iss (client) -> accepted (replay key is iss+jti)', accepted(fifth), summary(fifth));
}

// (h) audience variants
const probe = async (name, opts, expectOk, extra) => {
  const res = await tokenFor(opts, extra);
  await new Promise((done) => { setTimeout(done, 20); });
  const why = expectOk ? '' : ` reason=${lastLogFor((l) => l.event === 'grant.error')?.reason}`;
  check(name, expectOk ? accepted(res) : (res.status >= 400), `${summary(res)}${why}`);
};
await probe('(h) aud = issuer -> accepted', { ...ps, aud: issuer }, true);
await probe('(h) aud = issuer + "/" -> rejected', { ...ps, aud: `${issuer}/` }, false);
await probe('(h) aud = [token endpoint] -> accepted', { ...ps, aud: [TOKEN] }, true);
await probe('(h) aud = ["https://other", issuer] -> accepted', { ...ps, aud: ['https://other.example', issuer] }, true);
await probe('(h) aud = ["https://other"] -> rejected', { ...ps, aud: ['https://other.example'] }, false);
await probe('(h) aud = introspection endpoint at token endpoint -> rejected', { ...ps, aud: INTROSPECT }, false);
await probe('(h) aud = token endpoint via "localhost" -> rejected', { ...ps, aud: TOKEN.replace('127.0.0.1', 'localhost') }, false);
{
  const port = new URL(issuer).port;
  const res = await post(TOKEN, jwtGrant(assertion({ ...ps, aud: TOKEN })), { hostHeader: `localhost:${port}` });
  check('(h) aud = http://127.0.0.1:PORT/token but request Host: localhost:PORT -> rejected (token URL derives from Host)', rejected(res), summary(res));
  const res2 = await post(TOKEN, jwtGrant(assertion({ ...ps, aud: `http://localhost:${port}/token` })), { hostHeader: `localhost:${port}` });
  check('(h) aud = http://localhost:PORT/token with Host: localhost:PORT -> accepted', accepted(res2), summary(res2));
  const res3 = await post(TOKEN, jwtGrant(assertion({ ...ps, aud: issuer })), { hostHeader: `localhost:${port}` });
  check('(h) aud = issuer with Host: localhost:PORT -> accepted', accepted(res3), summary(res3));
}

// Other strictness probes (what the Rust side may / must do)
const t = now();
await probe('[claims] no iat -> accepted', { ...ps, over: { iat: undefined } }, true);
await probe('[claims] no nbf -> accepted', { ...ps, over: { nbf: undefined } }, true);
await probe('[claims] no exp -> rejected', { ...ps, over: { exp: undefined } }, false);
await probe('[claims] no jti -> rejected', { ...ps, over: { jti: undefined } }, false);
await probe('[claims] no iss -> rejected', { ...ps, over: { iss: undefined } }, false);
await probe('[claims] no sub -> rejected', { ...ps, over: { sub: undefined } }, false);
await probe('[claims] no aud -> rejected', { ...ps, over: { aud: undefined } }, false);
await probe('[claims] iss != sub -> rejected', { ...ps, over: { iss: 'rs256-client' } }, false);
await probe('[claims] client_id form param != sub -> rejected (400)', ps, false, { client_id: 'rs256-client' });
await probe('[claims] no client_id form param -> accepted', ps, true, {});
await probe('[claims] jti as number -> rejected', { ...ps, over: { jti: 12345 } }, false);
await probe('[claims] exp - iat = 1 day -> accepted (no max lifetime)', { ...ps, over: { exp: t + 86400 } }, true);
await probe('[claims] exp - iat = 1 year -> accepted (no max lifetime)', { ...ps, over: { exp: t + 365 * 86400 } }, true);
await probe('[clock] exp = now - 10 -> accepted (15 s tolerance)', { ...ps, over: { iat: t - 100, nbf: t - 100, exp: t - 10 } }, true);
await probe('[clock] exp = now - 20 -> rejected', { ...ps, over: { iat: t - 100, nbf: t - 100, exp: t - 20 } }, false);
await probe('[clock] nbf = now + 10 -> accepted', { ...ps, over: { nbf: t + 10 } }, true);
await probe('[clock] nbf = now + 30 -> rejected', { ...ps, over: { nbf: t + 30 } }, false);
await probe('[clock] iat = now + 3600 (exp present) -> accepted (iat only checked when exp absent)', { ...ps, over: { iat: t + 3600, nbf: undefined, exp: t + 4000 } }, true);
await probe('[clock] iat = now - 1 day -> accepted (iat age not checked)', { ...ps, over: { iat: t - 86400, nbf: t - 86400 } }, true);
await probe('[header] no typ -> accepted', { ...ps, headerOver: { typ: undefined } }, true);
await probe('[header] typ "at+jwt" -> accepted (typ ignored)', { ...ps, headerOver: { typ: 'at+jwt' } }, true);
await probe('[header] no x5t#S256 / x5t -> accepted', { ...ps, thumb: 'none' }, true);
await probe('[header] wrong x5t#S256 -> accepted (thumbprints ignored)', { ...ps, headerOver: { 'x5t#S256': 'AAAA' } }, true);
await probe('[header] kid not registered -> rejected', { ...ps, headerOver: { kid: 'some-kid' } }, false);
await probe('[header] alg RS256 for a PS256 client -> rejected', { ...ps, alg: 'RS256' }, false);
await probe('[header] alg PS256 for an RS256 client -> rejected', { ...rs, alg: 'PS256' }, false);
await probe('[header] crit ["exp"] -> rejected', { ...ps, headerOver: { crit: ['exp'], exp: 1 } }, false);
await probe('[sig] PS256 with max salt length (not 32) -> rejected', {
  ...ps,
  signer: (alg, key, input) => crypto.sign('sha256', Buffer.from(input), {
    key, padding: crypto.constants.RSA_PKCS1_PSS_PADDING, saltLength: crypto.constants.RSA_PSS_SALTLEN_MAX_SIGN,
  }),
}, false);
await probe('[sig] ES256 with DER signature (not raw r||s) -> rejected', {
  ...es, signer: (alg, key, input) => crypto.sign('sha256', Buffer.from(input), key),
}, false);
await probe('[scope] no scope param -> accepted', ps, true, { client_id: 'ps256-client', scope: '' });

// SIGTERM -> exit 0
const exitCode = await new Promise((resolve) => {
  child.removeAllListeners('exit');
  child.on('exit', (code, signal) => resolve(code ?? signal));
  child.kill('SIGTERM');
});
check('SIGTERM -> exit 0', exitCode === 0, String(exitCode));
check('stdout had exactly one line', stdout.split('\n').filter(Boolean).length === 1, JSON.stringify(stdout));

if (failures) {
  console.log(`\n--- server stderr ---\n${stderr}`);
}
fs.rmSync(tmp, { recursive: true, force: true });
console.log(failures ? `\n${failures} check(s) FAILED` : '\nall checks passed');
process.exit(failures ? 1 : 0);
