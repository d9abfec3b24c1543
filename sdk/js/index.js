// llmos-client: a Node.js client of the llmos kernel (llmos.v1.Kernel over gRPC).
//
//   const { Client } = require('llmos-client');
//   const k = new Client('127.0.0.1:50051');            // pids as bigint; { pids: 'string' } for strings
//   const echo = await k.spawn({ path: 'lua/echo.lua' });
//   const port = await k.openPort();
//   await k.send(echo, { hello: 'world' }, { from: port });
//   console.log((await k.recv(port, { timeoutMs: 5000 })).body);   // { hello: 'world' }
//
// Bodies, args and results are plain JS values (JSON's: null, booleans, numbers, strings, arrays,
// objects), converted to and from google.protobuf.Value here. 64-bit integers (pids, message ids,
// usage counters) come back as bigint (or string with { pids: 'string' }); any of number, bigint or
// decimal string is accepted. Streaming calls (events, infer with stream, readFileStream) are async
// iterators. A failed call rejects with an LlmosError whose `code` is the gRPC status number and
// `status` its name ("NOT_FOUND").
'use strict';

const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

// The .proto: bundled in the package (npm pack copies it), else the repository's protos/.
const PROTOS = [path.join(__dirname, 'proto'), path.resolve(__dirname, '..', '..', 'protos')]
  .find((dir) => fs.existsSync(path.join(dir, 'llmos', 'v1', 'kernel.proto')));
const definition = protoLoader.loadSync(path.join(PROTOS, 'llmos', 'v1', 'kernel.proto'), {
  keepCase: true, longs: String, enums: String, defaults: true, oneofs: true, includeDirs: [PROTOS],
});
const v1 = grpc.loadPackageDefinition(definition).llmos.v1;

const DEFAULT_TARGET = '127.0.0.1:50051';
const DEADLINE_MARGIN_MS = 5000;  // a blocking call's deadline: its own timeout plus this
const RPC_TIMEOUT_MS = 30000;     // calls that never block in the kernel
const MAX_EXACT = 2 ** 53;        // the value model: integers are exact within +-2^53
const STATUS_NAMES = Object.fromEntries(Object.entries(grpc.status).map(([name, code]) => [code, name]));

class LlmosError extends Error {
  /** A failed syscall: `code` is the gRPC status code (a number), `status` its name, `details` the kernel's words. */
  constructor(code, details) {
    super(`${STATUS_NAMES[code] ?? code}: ${details}`);
    this.name = 'LlmosError';
    this.code = code;
    this.status = STATUS_NAMES[code] ?? String(code);
    this.details = details;
  }
}

function invalid(message) {
  return new LlmosError(grpc.status.INVALID_ARGUMENT, message);
}

// -- google.protobuf.Value <-> plain JS values ---------------------------------------------------
// The well-known types keep protobufjs's camelCase names (nullValue, structValue, ...).

/** A plain JS value as a google.protobuf.Value, as JSON.stringify sees it (toJSON, undefined skipped in
 * objects and null in arrays); NaN, Infinity, bigints beyond 2^53, symbols and functions are refused. */
function toValue(v, where = 'value', depth = 0) {
  if (depth > 64) throw invalid(`${where} is nested deeper than 64 levels`);
  if (v !== null && typeof v === 'object' && typeof v.toJSON === 'function') v = v.toJSON();
  if (v === null || v === undefined) return { nullValue: 'NULL_VALUE' };
  switch (typeof v) {
    case 'boolean': return { boolValue: v };
    case 'string': return { stringValue: v };
    case 'number':
      if (!Number.isFinite(v)) throw invalid(`${where} is ${v}: numbers must be finite`);
      return { numberValue: v };
    case 'bigint':
      if (v > MAX_EXACT || v < -MAX_EXACT) throw invalid(`${where} is ${v}: integers must be within +-2^53`);
      return { numberValue: Number(v) };
    case 'object':
      if (Array.isArray(v)) return { listValue: { values: v.map((x, i) => toValue(x, `${where}[${i}]`, depth + 1)) } };
      if (Buffer.isBuffer(v) || ArrayBuffer.isView(v)) throw invalid(`${where} is bytes: send bytes as data`);
      {
        const fields = {};
        for (const [k, x] of Object.entries(v)) {
          if (x !== undefined && typeof x !== 'function' && typeof x !== 'symbol') {
            fields[k] = toValue(x, `${where}.${k}`, depth + 1);
          }
        }
        return { structValue: { fields } };
      }
    default:
      throw invalid(`${where} is a ${typeof v}, which has no JSON form`);
  }
}

/** A google.protobuf.Value as a plain JS value (null for an absent one). */
function fromValue(v) {
  if (!v) return null;
  switch (v.kind) {
    case 'nullValue': case undefined: return null;
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

// -- the client ------------------------------------------------------------------------------------
function pidText(pid, what) {
  if (typeof pid === 'bigint' || (typeof pid === 'number' && Number.isInteger(pid)) ||
      (typeof pid === 'string' && /^\d+$/.test(pid))) {
    if (BigInt(pid) < 0n) throw invalid(`${what} must be >= 0, not ${pid}`);
    return String(pid);
  }
  throw invalid(`${what} must be a pid (a non-negative integer, bigint or decimal string), not ${String(pid)}`);
}

const camel = (name) => name.replace(/_([a-z])/g, (_, c) => c.toUpperCase());

/** TLS credentials from PEM files (see Client's options), or plaintext when no CA is given. */
function channelCredentials({ ca, cert, key } = {}) {
  ca = ca ?? process.env.LLMOS_TLS_CA;
  cert = cert ?? process.env.LLMOS_TLS_CERT;
  key = key ?? process.env.LLMOS_TLS_KEY;
  if (!ca) return grpc.credentials.createInsecure();
  if (Boolean(cert) !== Boolean(key)) throw invalid('mutual TLS needs both a certificate and its key');
  return grpc.credentials.createSsl(fs.readFileSync(ca), key ? fs.readFileSync(key) : null,
    cert ? fs.readFileSync(cert) : null);
}

class Client {
  /**
   * @param {string} [target] HOST:PORT or unix:PATH (default: $LLMOS_SERVER or 127.0.0.1:50051)
   * @param {{pids?: 'bigint'|'string', rpcTimeoutMs?: number, token?: string,
   *          tls?: {ca?: string, cert?: string, key?: string}}} [options]
   *   token: a bearer token (default: $LLMOS_TOKEN; none in a single-user server). tls: PEM file
   *   paths of the CA that signed the server's certificate, and for mutual TLS the client's
   *   certificate and key (defaults: $LLMOS_TLS_CA, $LLMOS_TLS_CERT, $LLMOS_TLS_KEY); no CA:
   *   plaintext.
   */
  constructor(target, options = {}) {
    this.target = target || process.env.LLMOS_SERVER || DEFAULT_TARGET;
    if (options.pids !== undefined && options.pids !== 'bigint' && options.pids !== 'string') {
      throw invalid(`pids is 'bigint' or 'string', not ${options.pids}`);
    }
    this.pidsAs = options.pids ?? 'bigint';
    this.rpcTimeoutMs = options.rpcTimeoutMs ?? RPC_TIMEOUT_MS;
    this.metadata = new grpc.Metadata();
    const token = options.token ?? process.env.LLMOS_TOKEN;
    if (token) this.metadata.set('authorization', `Bearer ${token}`);
    this.stub = new v1.Kernel(this.target, channelCredentials(options.tls ?? {}), {
      'grpc.max_receive_message_length': -1, 'grpc.max_send_message_length': -1,
    });
  }

  close() { this.stub.close(); }

  // A 64-bit integer from the wire (a decimal string) as this client gives them.
  int64(text) { return this.pidsAs === 'bigint' ? BigInt(text) : String(text); }

  unary(method, request, timeoutMs = this.rpcTimeoutMs) {
    return new Promise((resolve, reject) => {
      const options = timeoutMs == null ? {} : { deadline: new Date(Date.now() + timeoutMs) };
      this.stub[method](request, this.metadata, options, (err, reply) =>
        (err ? reject(new LlmosError(err.code, err.details)) : resolve(reply)));
    });
  }

  async *serverStream(method, request, convert) {
    const call = this.stub[method](request, this.metadata);
    try {
      for await (const item of call) yield convert(item);
    } catch (err) {
      if (err.code === grpc.status.CANCELLED && call.cancelledByClient) return;
      throw new LlmosError(err.code ?? grpc.status.UNKNOWN, err.details ?? String(err));
    } finally {
      call.cancelledByClient = true;
      call.cancel();
    }
  }

  process(info) {
    const usage = {}, limits = {};
    for (const [k, v] of Object.entries(info.usage || {})) usage[camel(k)] = Number(v);
    for (const [k, v] of Object.entries(info.limits || {})) limits[camel(k)] = Number(v);
    return {
      pid: this.int64(info.pid), name: info.name, parent: this.int64(info.parent), kind: info.kind,
      state: info.state, priority: info.priority, weight: info.weight, limits, usage,
      exitReason: info.exit_reason, result: fromValue(info.result), error: info.error,
      startedAtMs: Number(info.started_at_ms), endedAtMs: Number(info.ended_at_ms), blockedOn: info.blocked_on,
      namespace: info.namespace,
    };
  }

  message(m) {
    return {
      id: this.int64(m.id), from: this.int64(m.from), to: this.int64(m.to), tag: m.tag, body: fromValue(m.body),
      data: Buffer.from(m.data || []), correlationId: m.correlation_id, sentAtMs: Number(m.sent_at_ms),
    };
  }

  /** Start a process: exactly one of lua, python (source) or path; returns its pid. */
  async spawn({ lua, python, path: programPath, args, name = '', priority = 0, weight = 0, limits = {},
    parent = 0, monitor = false, sourceName = '' } = {}) {
    const programs = Object.entries({ lua, python, path: programPath }).filter(([, v]) => v !== undefined);
    if (programs.length !== 1) throw invalid('give exactly one program: lua, python or path');
    const wire = {};
    for (const [k, v] of Object.entries(limits)) wire[k.replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`)] = String(v);
    const request = {
      [programs[0][0]]: programs[0][1], name, priority, weight, limits: wire, parent: pidText(parent, 'parent'),
      monitor, source_name: sourceName,
    };
    if (args !== undefined) request.args = toValue(args, 'args');
    return this.int64((await this.unary('Spawn', request)).pid);
  }

  /** Send `body` (any JSON value) to a pid or registered name; returns the message id. */
  async send(to, body = null, { from = 0, tag = '', data, correlationId = '' } = {}) {
    const request = { from: pidText(from, 'from'), tag, correlation_id: correlationId, body: toValue(body, 'body') };
    if (data !== undefined) request.data = Buffer.from(data);
    if (typeof to === 'string' && !/^\d+$/.test(to)) request.to_name = to; else request.to = pidText(to, 'to');
    return this.int64((await this.unary('Send', request)).message_id);
  }

  /** Take the oldest matching message from `pid`'s mailbox; null if none came within timeoutMs (undefined: wait on). */
  async recv(pid, { from, tag, correlationId, timeoutMs } = {}) {
    const request = { pid: pidText(pid, 'pid') };
    if (from !== undefined) request.from = pidText(from, 'from');
    if (tag !== undefined) request.tag = tag;
    if (correlationId !== undefined) request.correlation_id = correlationId;
    if (timeoutMs !== undefined) request.timeout_ms = String(timeoutMs);
    const reply = await this.unary('Recv', request, timeoutMs === undefined ? null : timeoutMs + DEADLINE_MARGIN_MS);
    return reply.timed_out ? null : this.message(reply.message);
  }

  /** Wait for `pid` to end; its final info, or null after timeoutMs. */
  async wait(pid, { timeoutMs } = {}) {
    const request = { pid: pidText(pid, 'pid') };
    if (timeoutMs !== undefined) request.timeout_ms = String(timeoutMs);
    const reply = await this.unary('Wait', request, timeoutMs === undefined ? null : timeoutMs + DEADLINE_MARGIN_MS);
    return reply.timed_out ? null : this.process(reply.process);
  }

  /** End a process; true if it was alive. */
  async kill(pid, reason = 'killed') {
    return !(await this.unary('Kill', { pid: pidText(pid, 'pid'), reason })).already_ended;
  }

  /** A mailbox for this client to receive replies on; its pid. */
  async openPort({ name = '' } = {}) { return this.int64((await this.unary('OpenPort', { name })).pid); }

  async register(pid, name) { await this.unary('Register', { pid: pidText(pid, 'pid'), name }); }

  async monitor(watcher, target) {
    await this.unary('Monitor', { watcher: pidText(watcher, 'watcher'), target: pidText(target, 'target') });
  }

  async setPriority(pid, priority, weight = 0) {
    await this.unary('SetPriority', { pid: pidText(pid, 'pid'), priority, weight });
  }

  /** The process's log lines from line `offset` on, and the offset to read on from. */
  async readLog(pid, offset = 0) {
    const reply = await this.unary('ReadLog', { pid: pidText(pid, 'pid'), offset: String(offset) });
    return { lines: reply.lines, nextOffset: Number(reply.next_offset) };
  }

  /** The log as the server streams it (FollowLog): an async iterator of pages {lines, timesMs, nextOffset,
   * ended}, the lines so far (the last `tail`, if given) then each new batch, until the process ends. */
  followLog(pid, { offset = 0, tail = 0, sinceMs = 0 } = {}) {
    const request = { pid: pidText(pid, 'pid'), offset: String(offset), tail: String(tail), since_ms: String(sinceMs) };
    return this.serverStream('FollowLog', request, (page) => ({
      lines: page.lines, timesMs: page.times_ms.map(Number), nextOffset: Number(page.next_offset), ended: page.ended,
    }));
  }

  async get(pid) { return this.process(await this.unary('GetProcess', { pid: pidText(pid, 'pid') })); }

  /** Processes, filtered by state names, registered name and parent (every page of the kernel's answer). */
  async ps({ states = [], name = '', parent = 0, includeEnded = false } = {}) {
    const out = [];
    for (let after = '0'; ;) {
      const reply = await this.unary('ListProcesses', {
        states, name, parent: pidText(parent, 'parent'), include_ended: includeEnded, after_pid: after,
      });
      out.push(...reply.processes.map((p) => this.process(p)));
      if (reply.next_after_pid === '0') return out;
      after = reply.next_after_pid;
    }
  }

  /** Lifecycle events as an async iterator: {kind: 'subscribed'|'spawned'|'ended', process, atMs}. */
  events({ pid = 0 } = {}) {
    return this.serverStream('Events', { pid: pidText(pid, 'pid') }, (e) => ({
      kind: e.kind, process: e.process ? this.process(e.process) : null, atMs: Number(e.at_ms),
    }));
  }

  /** Generate text. With stream: true, an async iterator of chunks {text, tokenIds, finishReason, usage};
   * else a promise of {text, tokenIds, finishReason, usage}. */
  infer({ prompt = '', messages = [], pid = 0, maxTokens = 0, temperature, topP, topK, seed, stop = [],
    stream = false, timeoutMs } = {}) {
    const sampling = { max_tokens: maxTokens, stop };
    if (temperature !== undefined) sampling.temperature = temperature;
    if (topP !== undefined) sampling.top_p = topP;
    if (topK !== undefined) sampling.top_k = topK;
    if (seed !== undefined) sampling.seed = String(seed);
    const request = { pid: pidText(pid, 'pid'), prompt, messages, sampling, stream };
    if (timeoutMs !== undefined) request.timeout_ms = String(timeoutMs);
    const chunks = this.serverStream('Infer', request, (c) => ({
      text: c.text, tokenIds: c.token_ids, finishReason: c.finish_reason,
      usage: c.usage ? Object.fromEntries(Object.entries(c.usage).map(([k, v]) => [camel(k), Number(v)])) : null,
    }));
    if (stream) return chunks;
    return (async () => {
      const all = { text: '', tokenIds: [], finishReason: '', usage: null };
      for await (const c of chunks) {
        all.text += c.text;
        all.tokenIds.push(...c.tokenIds);
        if (c.finishReason) all.finishReason = c.finishReason;
        if (c.usage) all.usage = c.usage;
      }
      return all;
    })();
  }

  /** Write a whole file (bytes or a string as UTF-8) atomically; its info. */
  writeFile(filePath, data, { append = false, pid = 0 } = {}) {
    return new Promise((resolve, reject) => {
      const call = this.stub.WriteFile((err, info) =>
        (err ? reject(new LlmosError(err.code, err.details)) : resolve(this.file(info))));
      const bytes = Buffer.from(data);
      call.write({ path: filePath, append, pid: pidText(pid, 'pid'), data: bytes.subarray(0, 1 << 20) });
      for (let at = 1 << 20; at < bytes.length; at += 1 << 20) call.write({ data: bytes.subarray(at, at + (1 << 20)) });
      call.end();
    });
  }

  /** A file's bytes (as a Buffer), or `length` of them from `offset`. */
  async readFile(filePath, { offset = 0, length = 0 } = {}) {
    const pieces = [];
    for await (const piece of this.readFileStream(filePath, { offset, length })) pieces.push(piece);
    return Buffer.concat(pieces);
  }

  /** A file's pieces as an async iterator of Buffers. */
  readFileStream(filePath, { offset = 0, length = 0 } = {}) {
    return this.serverStream('ReadFile', { path: filePath, offset: String(offset), length: String(length) },
      (c) => Buffer.from(c.data));
  }

  file(f) { return { path: f.path, size: Number(f.size), isDir: f.is_dir, modifiedMs: Number(f.modified_ms) }; }
  async stat(filePath) { return this.file(await this.unary('StatFile', { path: filePath })); }
  async listFiles(filePath = '') { return (await this.unary('ListFiles', { path: filePath })).entries.map((f) => this.file(f)); }
  async deleteFile(filePath) { await this.unary('DeleteFile', { path: filePath }); }
}

module.exports = { Client, LlmosError, toValue, fromValue, status: grpc.status };
