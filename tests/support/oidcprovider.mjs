// A real OpenID provider for the tests: panva's oidc-provider (OpenID-certified) on loopback https.
//
//   node tests/support/oidcprovider.mjs CONFIG.json
//
// CONFIG (written by tests/support/oidc.py): {"port", "cert", "key", "issuer", "keys": [private
// JWKs, the first signs], "clients": [oidc-provider client metadata], "accounts": {"id":
// {"password", "claims": {...}}}, "idTokenTTL": seconds}. SIGHUP re-reads CONFIG and starts a new
// provider on the same port (key rotation: the test writes new keys first). Prints "ready PORT"
// on stdout once listening.
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

const escape = (s) => String(s).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

function makeProvider() {
  config = JSON.parse(fs.readFileSync(configPath, 'utf8'));
  const accounts = config.accounts;
  const made = new Provider(config.issuer, {
    clients: config.clients,
    jwks: { keys: config.keys },
    // The scope's claims go into the ID token itself, as Keycloak, Entra ID and Dex do.
    conformIdTokenClaims: false,
    claims: {
      openid: ['sub'], email: ['email', 'email_verified'], profile: ['name'], groups: ['groups'],
    },
    scopes: ['openid', 'email', 'profile', 'groups'],
    pkce: { required: () => true },
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
