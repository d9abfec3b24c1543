// The llmos-client package over TLS with a token: spawns a Lua program, waits for it, and prints a
// JSON summary (its namespace, its result, and the status code of a call without the token).
//
// Usage: node tls.js HOST:PORT CA_PEM TOKEN
'use strict';

const { Client, LlmosError } = require('llmos-client');

async function main() {
  const [target, ca, token] = process.argv.slice(2);
  if (!token) throw new Error('usage: node tls.js HOST:PORT CA_PEM TOKEN');
  const k = new Client(target, { tls: { ca }, token });
  const pid = await k.spawn({ lua: 'return 6 * 7' });
  const ended = await k.wait(pid, { timeoutMs: 30000 });
  const summary = { namespace: ended.namespace, result: ended.result };
  k.close();
  const anonymous = new Client(target, { tls: { ca }, token: '' });
  try {
    await anonymous.ps();
    summary.without_token = 'OK';
  } catch (err) {
    if (!(err instanceof LlmosError)) throw err;
    summary.without_token = err.code;
  }
  anonymous.close();
  process.stdout.write(JSON.stringify(summary));
}

main().catch((err) => { process.stderr.write(`${err.stack || err}\n`); process.exit(1); });
