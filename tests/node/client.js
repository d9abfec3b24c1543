// A Node.js program using the llmos-client package (sdk/js): spawns the Lua echo program, opens a
// port, exchanges plain JS values with correlation ids, stops echo, waits for it, watches events,
// streams an inference and prints a JSON summary on stdout (bigints as strings).
//
// Usage: node client.js HOST:PORT
'use strict';

const { Client, LlmosError, status } = require('llmos-client');

async function main() {
  const target = process.argv[2];
  if (!target) throw new Error('usage: node client.js HOST:PORT');
  const k = new Client(target);
  const summary = { replies: [] };

  const events = k.events();
  const subscribed = (await events.next()).value;  // from here on no event is missed
  const echo = await k.spawn({ path: 'lua/echo.lua', args: {} });
  const port = await k.openPort();
  summary.pid_types = [typeof echo, typeof port];
  summary.echo = echo;
  summary.port = port;
  for (;;) {
    const { value } = await events.next();
    if (value.kind === 'spawned' && value.process.pid === echo) break;
  }
  await events.return();
  summary.subscribed = subscribed.kind;

  // (A null inside a list survives the trip through Lua; a trailing one cannot, as Lua tables end at their last non-nil.)
  const bodies = [{ hello: 'from node', n: 1, skipped: undefined }, ['a', 2, null, true], 'plain text'];
  for (let i = 0; i < bodies.length; i++) {
    await k.send(echo, bodies[i], { from: port, tag: 'node', data: Buffer.from([i, 255]), correlationId: `node-${i}` });
  }
  // Take the replies newest first, by correlation id (selective receive).
  for (let i = bodies.length - 1; i >= 0; i--) {
    const m = await k.recv(port, { correlationId: `node-${i}`, timeoutMs: 10000 });
    if (m === null) throw new Error(`no reply for node-${i}`);
    summary.replies.push({ correlation_id: m.correlationId, tag: m.tag, from: m.from, body: m.body, data: Array.from(m.data) });
  }

  await k.send(echo, null, { from: port, tag: 'stop', correlationId: 'bye' });
  const ack = await k.recv(port, { correlationId: 'bye', timeoutMs: 10000 });
  summary.stop_ack = ack && { tag: ack.tag, body: ack.body };
  const done = await k.wait(echo, { timeoutMs: 10000 });
  summary.state = done.state;
  summary.exit_reason = done.exitReason;
  summary.result = done.result;

  // Errors carry their status code; values without a JSON form are refused before anything is sent.
  for (const [key, attempt] of Object.entries({
    not_found: () => k.get('999999999999'),
    nan_body: () => k.send(port, { x: NaN }),
    big_int: () => k.send(port, 2n ** 60n),
  })) {
    try {
      await attempt();
      summary[key] = null;
    } catch (err) {
      if (!(err instanceof LlmosError)) throw err;
      summary[key] = { code: err.code, status: err.status, details: err.details };
    }
  }
  summary.invalid_argument_code = status.INVALID_ARGUMENT;

  const chunks = [];
  for await (const chunk of k.infer({ prompt: 'Once upon a time', maxTokens: 4, temperature: 0, seed: 1, stream: true })) {
    chunks.push(chunk);
  }
  const whole = await k.infer({ prompt: 'Once upon a time', maxTokens: 4, temperature: 0, seed: 1 });
  summary.infer = { streamed: chunks.map((c) => c.text).join(''), whole: whole.text,
    tokens: whole.usage.completionTokens, finish: whole.finishReason };

  // The log as it is written, streamed until the process ends.
  const logger = await k.spawn({ lua: 'print("first") sys.recv{} print("second")' });
  const pages = k.followLog(logger);
  const followed = [], times = [];
  const take = (page) => { followed.push(...page.lines); times.push(...page.timesMs); };
  while (followed.length < 1) take((await pages.next()).value);  // the first page may come before the print
  await k.send(logger, null);  // the second line exists only now, while the stream is open
  for await (const page of pages) take(page);
  summary.followed = followed;
  summary.log_times = times.length === 2 && times.every((t) => t > 0);

  const asStrings = new Client(target, { pids: 'string' });
  summary.string_pid = (await asStrings.get(port)).pid;
  asStrings.close();
  await k.kill(port);
  k.close();
  process.stdout.write(JSON.stringify(summary, (_, v) => (typeof v === 'bigint' ? `${v}n` : v)) + '\n');
}

main().catch((err) => {
  process.stderr.write(`client.js: ${err.stack || err}\n`);
  process.exit(1);
});
