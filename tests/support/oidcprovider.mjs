// A real OpenID provider for the tests: panva's oidc-provider (OpenID-certified) on loopback https.
//
//   node tests/support/oidcprovider.mjs CONFIG.json
//
// CONFIG (written by tests/support/oidc.py): {"port", "cert", "key", "issuer", "keys": [private
// JWKs, the first signs], "clients": [oidc-provider client metadata], "accounts": {"id":
// {"password", "claims": {...}}}, "idTokenTTL": seconds, "refreshTokens": issue refresh tokens to
// clients allowed the refresh_token grant (whatever the scope), "rotateRefreshTokens": a new
// refresh token on every use (the old one is consumed; using it again revokes the grant)}.
// SIGHUP re-reads CONFIG and starts a new provider on the same port (key rotation: the test
// writes new keys first; an account removed from CONFIG can no longer renew its sign-ins).
// Grants, sessions and tokens outlive a reload (SharedAdapter). Prints
// "ready PORT" on stdout once listening.
//
// The login page is this script's own (the provider's dev pages take any password): it checks
// the account's password and grants the asked scopes without a consent step.
import fs from 'node:fs';
import https from 'node:https';
import { URLSearchParams } from 'node:url';

import Provider from 'oidc-provider';

const configPath = process.argv[2];
let config;
let provider;

// Grants, sessions and tokens in one store for the process, so that they outlive a reload (the
// provider's own memory adapter is per instance): a person removed at a reload is refused for
// that reason, not because the provider forgot their sign-in.
const store = new Map();
class SharedAdapter {
  constructor(model) { this.model = model; }

  key(id) { return `${this.model}:${id}`; }

  async upsert(id, payload, expiresIn) {
    store.set(this.key(id), { payload, expires: expiresIn ? Date.now() + expiresIn * 1000 : null });
    if (payload.grantId) {
      const grant = `grant:${payload.grantId}`;
      store.set(grant, [...(store.get(grant) || []), this.key(id)]);
    }
    if (payload.uid) store.set(`uid:${payload.uid}`, id);
    if (payload.userCode) store.set(`userCode:${payload.userCode}`, id);
  }

  async find(id) {
    const found = store.get(this.key(id));
    if (!found || (found.expires && found.expires < Date.now())) return undefined;
    return found.payload;
  }

  async findByUid(uid) { const id = store.get(`uid:${uid}`); return id ? this.find(id) : undefined; }

  async findByUserCode(code) {
    const id = store.get(`userCode:${code}`);
    return id ? this.find(id) : undefined;
  }

  async consume(id) {
    const found = store.get(this.key(id));
    if (found) found.payload.consumed = Math.floor(Date.now() / 1000);
  }

  async destroy(id) { store.delete(this.key(id)); }

  async revokeByGrantId(grantId) {
    for (const key of store.get(`grant:${grantId}`) || []) store.delete(key);
    store.delete(`grant:${grantId}`);
  }
}

const escape = (s) => String(s).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

function makeProvider() {
  config = JSON.parse(fs.readFileSync(configPath, 'utf8'));
  const accounts = config.accounts;
  const made = new Provider(config.issuer, {
    clients: config.clients,
    adapter: SharedAdapter,
    jwks: { keys: config.keys },
    // The scope's claims go into the ID token itself, as Keycloak, Entra ID and Dex do.
    conformIdTokenClaims: false,
    claims: {
      openid: ['sub'], email: ['email', 'email_verified'], profile: ['name'], groups: ['groups'],
    },
    scopes: ['openid', 'email', 'profile', 'groups'],
    pkce: { required: () => true },
    async issueRefreshToken(ctx, client) {
      return Boolean(config.refreshTokens) && client.grantTypeAllowed('refresh_token');
    },
    rotateRefreshToken: () => Boolean(config.rotateRefreshTokens),
    features: {
      devInteractions: { enabled: false },
      // The provider's own pages load a web font from the internet; these load nothing.
      rpInitiatedLogout: {
        enabled: true,
        async logoutSource(ctx, form) {
          ctx.body = `<!doctype html><title>Sign out</title><h1>Sign out of the test provider?</h1>${form}`
            + '<button id="logout-yes" type="submit" form="op.logoutForm" value="yes" name="logout">Yes, sign me out</button>';
        },
        async postLogoutSuccessSource(ctx) {
          ctx.body = '<!doctype html><title>Signed out</title><h1 id="signed-out">Signed out</h1>';
        },
      },
    },
    ttl: { IdToken: config.idTokenTTL || 3600, Session: 3600, Interaction: 600, Grant: 3600 },
    cookies: { keys: ['a test cookie key that is long enough'] },
    interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
    async findAccount(ctx, id) {
      const account = accounts[id];
      if (!account) return undefined;
      return { accountId: id, async claims() { return { sub: id, ...account.claims }; } };
    },
    // First-party clients: every asked scope is granted, no consent page.
    async loadExistingGrant(ctx) {
      const grant = new ctx.oidc.provider.Grant({
        clientId: ctx.oidc.client.clientId, accountId: ctx.oidc.session.accountId,
      });
      grant.addOIDCScope(ctx.oidc.params.scope || 'openid');
      await grant.save();
      return grant;
    },
    renderError(ctx, out) {
      ctx.type = 'html';
      ctx.body = `<!doctype html><title>error</title><h1 id="error">${escape(out.error)}</h1>`
        + `<p id="description">${escape(out.error_description || '')}</p>`;
    },
  });
  // Why a token request was refused, for the test's log (the answer says only invalid_grant).
  made.on('grant.error', (ctx, err) => {
    process.stdout.write(`grant.error ${err.message}: ${err.error_detail || ''}\n`);
  });
  return made;
}

function loginPage(uid, message) {
  return `<!doctype html><html><head><title>Test provider sign-in</title></head><body>
<h1>Test provider</h1><p id="provider-message">${escape(message)}</p>
<form method="post" action="/interaction/${escape(uid)}">
<input id="login" name="login" autocomplete="username"><input id="password" name="password" type="password">
<button id="provider-submit" type="submit">Sign in</button></form></body></html>`;
}

async function interaction(req, res, uid) {
  const details = await provider.interactionDetails(req, res);
  if (details.uid !== uid) throw new Error('interaction mismatch');
  if (req.method === 'GET') {
    res.writeHead(200, { 'content-type': 'text/html' });
    res.end(loginPage(uid, ''));
    return;
  }
  let body = '';
  for await (const chunk of req) body += chunk;
  const form = new URLSearchParams(body);
  const account = config.accounts[form.get('login')];
  if (!account || account.password !== form.get('password')) {
    res.writeHead(401, { 'content-type': 'text/html' });
    res.end(loginPage(uid, 'Wrong login or password.'));
    return;
  }
  await provider.interactionFinished(req, res, { login: { accountId: form.get('login') } },
    { mergeWithLastSubmission: false });
}

provider = makeProvider();
process.on('SIGHUP', () => {
  provider = makeProvider();
  process.stdout.write('reloaded\n');
});
process.on('SIGTERM', () => process.exit(0));

const server = https.createServer({
  cert: fs.readFileSync(config.cert), key: fs.readFileSync(config.key),
}, (req, res) => {
  const match = /^\/interaction\/([A-Za-z0-9_-]+)$/.exec(req.url.split('?')[0]);
  if (match) {
    interaction(req, res, match[1]).catch((err) => {
      res.writeHead(400, { 'content-type': 'text/plain' });
      res.end(String(err));
    });
    return;
  }
  provider.callback()(req, res);
});
server.listen(config.port, '127.0.0.1', () => {
  process.stdout.write(`ready ${server.address().port}\n`);
});
