// Types of llmos-client (index.js). Pids and message ids are bigint, or string with { pids: 'string' }.

export type JSONValue = null | boolean | number | string | JSONValue[] | { [key: string]: JSONValue };
export type PidLike = number | bigint | string;
export type ProcessState = 'RUNNABLE' | 'RUNNING' | 'BLOCKED' | 'EXITED' | 'KILLED' | 'CRASHED';
export type ProcessKind = 'LUA' | 'PYTHON' | 'PORT';

export interface Limits {
  cpuMs?: number; wallMs?: number; memoryBytes?: number; tokens?: number; mailbox?: number;
  mailboxBytes?: number; processes?: number;
}

export interface ProcessInfo<Pid = bigint> {
  pid: Pid; name: string; parent: Pid; kind: ProcessKind; state: ProcessState; priority: number; weight: number;
  limits: Required<Limits>;
  usage: { cpuMs: number; wallMs: number; messagesSent: number; messagesReceived: number; tokens: number;
           memoryBytes: number; mailboxLen: number; mailboxBytes: number; processes: number };
  exitReason: string; result: JSONValue; error: string; startedAtMs: number; endedAtMs: number;
  blockedOn: string; namespace: string;
}

export interface Message<Pid = bigint> {
  id: Pid; from: Pid; to: Pid; tag: string; body: JSONValue; data: Buffer; correlationId: string; sentAtMs: number;
}

export interface Event<Pid = bigint> {
  kind: 'subscribed' | 'spawned' | 'ended'; process: ProcessInfo<Pid> | null; atMs: number;
}

export interface InferChunk {
  text: string; tokenIds: number[]; finishReason: string;
  usage: { promptTokens: number; completionTokens: number; cachedTokens: number } | null;
}

export interface FileInfo { path: string; size: number; isDir: boolean; modifiedMs: number; }

export interface InferOptions {
  prompt?: string; messages?: { role: string; content: string }[]; pid?: PidLike; maxTokens?: number;
  temperature?: number; topP?: number; topK?: number; seed?: number | bigint; stop?: string[]; timeoutMs?: number;
}

export declare class LlmosError extends Error {
  /** The gRPC status code, e.g. 5 */
  code: number;
  /** Its name, e.g. "NOT_FOUND" */
  status: string;
  details: string;
}

export declare class Client<Pid extends bigint | string = bigint> {
  constructor(target?: string, options?: {
    pids?: Pid extends string ? 'string' : 'bigint'; rpcTimeoutMs?: number; token?: string;
    tls?: { ca?: string; cert?: string; key?: string };
  });
  readonly target: string;
  close(): void;
  spawn(program: { lua?: string; python?: string; path?: string; args?: JSONValue; name?: string; priority?: number;
                   weight?: number; limits?: Limits; parent?: PidLike; monitor?: boolean; sourceName?: string }): Promise<Pid>;
  send(to: PidLike, body?: JSONValue,
       options?: { from?: PidLike; tag?: string; data?: Uint8Array; correlationId?: string }): Promise<Pid>;
  recv(pid: PidLike, options?: { from?: PidLike; tag?: string; correlationId?: string; timeoutMs?: number }):
    Promise<Message<Pid> | null>;
  wait(pid: PidLike, options?: { timeoutMs?: number }): Promise<ProcessInfo<Pid> | null>;
  kill(pid: PidLike, reason?: string): Promise<boolean>;
  openPort(options?: { name?: string }): Promise<Pid>;
  register(pid: PidLike, name: string): Promise<void>;
  monitor(watcher: PidLike, target: PidLike): Promise<void>;
  setPriority(pid: PidLike, priority: number, weight?: number): Promise<void>;
  readLog(pid: PidLike, offset?: number): Promise<{ lines: string[]; nextOffset: number }>;
  followLog(pid: PidLike, options?: { offset?: number; tail?: number; sinceMs?: number }):
    AsyncIterableIterator<{ lines: string[]; timesMs: number[]; nextOffset: number; ended: boolean }>;
  get(pid: PidLike): Promise<ProcessInfo<Pid>>;
  ps(filter?: { states?: ProcessState[]; name?: string; parent?: PidLike; includeEnded?: boolean }):
    Promise<ProcessInfo<Pid>[]>;
  events(options?: { pid?: PidLike }): AsyncIterableIterator<Event<Pid>>;
  infer(options: InferOptions & { stream: true }): AsyncIterableIterator<InferChunk>;
  infer(options: InferOptions & { stream?: false }): Promise<Omit<InferChunk, 'usage'> & { usage: InferChunk['usage'] }>;
  writeFile(path: string, data: Uint8Array | string, options?: { append?: boolean; pid?: PidLike }): Promise<FileInfo>;
  readFile(path: string, options?: { offset?: number; length?: number }): Promise<Buffer>;
  readFileStream(path: string, options?: { offset?: number; length?: number }): AsyncIterableIterator<Buffer>;
  stat(path: string): Promise<FileInfo>;
  listFiles(path?: string): Promise<FileInfo[]>;
  deleteFile(path: string): Promise<void>;
}

/** A plain JS value as a google.protobuf.Value (protobufjs's object form). */
export declare function toValue(value: unknown, where?: string): object;
/** A google.protobuf.Value (protobufjs's object form) as a plain JS value. */
export declare function fromValue(value: object | null | undefined): JSONValue;
export declare const status: Record<string, number>;
