// A Node.js client of llmos.v1.Kernel, loaded at run time from the .proto
// (@grpc/proto-loader; google/protobuf/struct.proto comes with protobufjs's
// built-in well-known types). Spawns the Lua echo program, opens a port,
// exchanges a few messages with correlation ids, stops echo, waits for it
// and prints a JSON summary on stdout.
//
// Usage: node client.js HOST:PORT
'use strict';

const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTOS = path.resolve(__dirname, '..', '..', 'protos');
const definition = protoLoader.loadSync(path.join(PROTOS, 'llmos', 'v1', 'kernel.proto'), {
  keepCase: true, longs: String, enums: String, defaults: true, oneofs: true, includeDirs: [PROTOS],
});
const llmos = grpc.loadPackageDefinition(definition).llmos.v1;

// google.protobuf.Value <-> plain JS values. The well-known types come from
// protobufjs's own definitions, whose field names are camelCase (nullValue,
// structValue, ...) whatever keepCase says for our messages.
function toValue(v) {
  if (v === null || v === undefined) return { nullValue: 'NULL_VALUE' };
  if (typeof v === 'boolean') return { boolValue: v };
  if (typeof v === 'number') return { numberValue: v };
  if (typeof v === 'string') return { stringValue: v };
  if (Array.isArray(v)) return { listValue: { values: v.map(toValue) } };
  const fields = {};
  for (const [k, x] of Object.entries(v)) fields[k] = toValue(x);
  return { structValue: { fields } };
}

function fromValue(v) {
  if (!v) return null;
  switch (v.kind) {
    case 'nullValue': return null;
    case 'boolValue': return v.boolValue;
    case 'numberValue': return v.numberValue;
    case 'stringValue': return v.stringValue;
    case 'listValue': return (v.listValue.values || []).map(fromValue);
    case 'structValue': {
      const out = {};
      for (const [k, x] of Object.entries(v.structValue.fields || {})) out[k] = fromValue(x);
      return out;
    }
    default: throw new Error(`unexpected google.protobuf.Value ${JSON.stringify(v)}`);
  }
}

function call(client, method, request) {
  return new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + 20000);
    client[method](request, { deadline }, (err, response) => (err ? reject(err) : resolve(response)));
  });
}

async function main() {
  const target = process.argv[2];
  if (!target) throw new Error('usage: node client.js HOST:PORT');
  const client = new llmos.Kernel(target, grpc.credentials.createInsecure());
  const summary = { replies: [] };

  const echo = (await call(client, 'Spawn', { path: 'lua/echo.lua', args: toValue({}) })).pid;
  const port = (await call(client, 'OpenPort', {})).pid;
  summary.echo = Number(echo);
  summary.port = Number(port);

  // (A null inside a list survives the trip through Lua; a trailing one cannot, as Lua tables end at their last non-nil.)
  const bodies = [{ hello: 'from node', n: 1 }, ['a', 2, null, true], 'plain text'];
  for (let i = 0; i < bodies.length; i++) {
    await call(client, 'Send', {
      from: port, to: echo, tag: 'node', body: toValue(bodies[i]),
      data: Buffer.from([i, 255]), correlation_id: `node-${i}`,
    });
  }
  // Take the replies newest first, by correlation id (selective receive).
  for (let i = bodies.length - 1; i >= 0; i--) {
    const resp = await call(client, 'Recv', { pid: port, correlation_id: `node-${i}`, timeout_ms: 10000 });
    if (resp.timed_out) throw new Error(`no reply for node-${i}`);
    const m = resp.message;
    summary.replies.push({
      correlation_id: m.correlation_id, tag: m.tag, from: Number(m.from), body: fromValue(m.body),
      data: Array.from(m.data),
    });
  }

  await call(client, 'Send', { from: port, to: echo, tag: 'stop', correlation_id: 'bye' });
  const ack = await call(client, 'Recv', { pid: port, correlation_id: 'bye', timeout_ms: 10000 });
  summary.stop_ack = ack.timed_out ? null : { tag: ack.message.tag, body: fromValue(ack.message.body) };
  const done = await call(client, 'Wait', { pid: echo, timeout_ms: 10000 });
  summary.timed_out = done.timed_out;
  summary.state = done.process.state;
  summary.exit_reason = done.process.exit_reason;
  summary.result = fromValue(done.process.result);

  // An error carries its status code.
  try {
    await call(client, 'GetProcess', { pid: '999999999999' });
    summary.not_found = null;
  } catch (err) {
    summary.not_found = { code: grpc.status[err.code], details: err.details };
  }
  client.close();
  process.stdout.write(JSON.stringify(summary) + '\n');
}

main().catch((err) => {
  process.stderr.write(`client.js: ${err.stack || err}\n`);
  process.exit(1);
});
