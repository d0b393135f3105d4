// Types for throng.js, the Throng client (wire protocol v1). Documentation: docs/client.md.

/** What to do after a close code (docs/client.md, "Reconnect policy"). */
export type ClosePolicy = "retry" | "spread" | "auth" | "stop";

export type State =
  | "idle"
  | "connecting"
  | "connected"
  | "fallback"
  | "disconnected"
  | "unauthorized"
  | "stopped"
  | "closed";

export type Transport = "websocket" | "sse";

export interface Backoff {
  /** First window, ms (default 500). */
  initial?: number;
  /** Largest window, ms (default 30000). */
  max?: number;
  /** Growth per attempt (default 2). */
  factor?: number;
}

/** A WebSocket constructor: the browser's, Node 22's, or the `ws` package's. */
export interface WebSocketLike {
  new (url: string, protocols?: string | string[]): {
    readyState: number;
    send(data: string): void;
    close(code?: number, reason?: string): void;
    onopen: ((ev: unknown) => void) | null;
    onmessage: ((ev: { data: unknown }) => void) | null;
    onclose: ((ev: { code: number; reason: string }) => void) | null;
    onerror: ((ev: unknown) => void) | null;
  };
}

export interface GetTokenContext {
  /** The close code that asked for a new token (4001, 4003), when it is one. */
  code?: number;
  reason?: string;
  /** The token that expired or was refused. */
  expired?: string;
  /** True when asked ahead of `exp` for a `refresh`. */
  refresh?: boolean;
  /** The current token's `exp` (seconds). */
  expires?: number;
}

export interface Options {
  /** Server base: `http(s)://host:port` or `ws(s)://host:port`. Default in a browser: the page's origin. */
  url?: string;
  /** A JWT. */
  token?: string;
  /** A new token from your backend; `null` when there is none (the client then waits for setToken()). */
  getToken?: (ctx: GetTokenContext) => string | null | undefined | Promise<string | null | undefined>;
  /** Open development mode only: the user name (`?user=`). */
  user?: string;
  /** `"subprotocol"` (default: `Sec-WebSocket-Protocol: throng.v1, bearer.<jwt>`) or `"query"` (`?token=`). */
  tokenTransport?: "subprotocol" | "query";
  /** A WebSocket implementation (default: globalThis.WebSocket; Node 20: pass the `ws` package's). */
  WebSocket?: WebSocketLike;
  /** A fetch implementation (default: globalThis.fetch), for SSE, `POST /publish` and stats(). */
  fetch?: typeof fetch;
  /** Reconnect backoff (full jitter). */
  backoff?: Backoff;
  /** After 1001, 1013 or 4029, retries are spread over at least this many ms (default 10000). */
  spreadWindow?: number;
  /** Ms of silence from the server before an application ping (default 10000). */
  pingIdle?: number;
  /** Ms to wait for an answer to that ping before giving the connection up (default 5000). */
  pongTimeout?: number;
  /** Ms for an attempt to reach `welcome` (default 10000). */
  connectTimeout?: number;
  /** Default timeout of publish, presence, history, subscribe (default 10000). */
  requestTimeout?: number;
  /** Refresh the token before `exp` through `refresh` (needs getToken; default true). */
  refresh?: boolean;
  /** Refresh once this fraction of the token's remaining life has passed (default 0.8). */
  refreshFraction?: number;
  /** `"sse"` (default) or `false`. */
  fallback?: "sse" | false;
  /** Failed WebSocket attempts in a row before SSE is tried (default 3). */
  fallbackAfter?: number;
  /** While on SSE, ms between WebSocket attempts (default 30000; 0: never). */
  wsProbeInterval?: number;
  /** Messages asked from history when catching up (default 1000, the server's most). */
  historyLimit?: number;
  /** Overrides of the close-code policy. */
  closePolicy?: Record<number, ClosePolicy>;
  /** Connect at construction (default true). */
  autoConnect?: boolean;
}

export interface Message<T = unknown> {
  channel: string;
  offset: number;
  data: T;
}

export interface Position {
  offset: number;
  epoch: string;
}

export interface Subscribed {
  channel: string;
  offset: number;
  epoch: string;
  recovered: boolean;
}

export interface PresenceReply {
  type: "presence";
  channel: string;
  count: number;
  users: { user: string; connections: number }[];
  truncated?: boolean;
}

export interface HistoryReply<T = unknown> {
  type: "history";
  channel: string;
  offset: number;
  epoch: string;
  messages: { offset: number; data: T }[];
  recovered?: boolean;
  truncated?: boolean;
}

export interface Stats {
  connections: number;
  websockets: number;
  users: number;
  shards: number;
  uptimeSeconds: number;
  rssBytes: number;
  auth: "jwt" | "open";
  /** Since the previous stats() call; null on the first. */
  deliveriesPerSecond: number | null;
  publishesPerSecond: number | null;
  messagesInPerSecond: number | null;
  /** Mean publish-to-write latency of the deliveries since the previous call, ms. */
  latencyMs: number | null;
  /** `/stats` as the server sent it. */
  raw: Record<string, unknown>;
}

export interface Events {
  state: { state: State; prev: State; transport?: Transport; code?: number; reason?: string };
  connecting: { attempt: number; transport: Transport };
  connected: { transport: Transport; client?: string; user?: string; fromFallback?: boolean };
  disconnected: {
    code: number;
    reason: string;
    wasConnected: boolean;
    willRetry: boolean;
    delay?: number;
    policy: ClosePolicy;
  };
  fallback: { transport: "sse"; client?: string; user?: string };
  subscribed: Subscribed;
  subscribe_error: { channel: string; code: string; reason: string };
  /** A resubscription could not be recovered from history: reload what the app shows of the channel. */
  unrecovered: { channel: string; reason: "epoch" | "history"; previous?: Position; replayed: number; complete: boolean };
  gap: { channel: string; from: number; to: number; replayed: number; complete: boolean };
  message: Message;
  token: { expires?: number };
  refreshed: { expires?: number; transport: Transport };
  auth_error: { code: number | string; reason: string; error?: unknown; willRetry: boolean; delay?: number };
  error: ThrongError | Error;
}

export class ThrongError extends Error {
  constructor(code: string, reason: string);
  readonly code: string;
  readonly reason: string;
}

export class ThrongClient {
  constructor(options?: Options);
  readonly options: Required<Pick<Options, "backoff">> & Options;
  readonly state: State;
  readonly transport: Transport | undefined;
  readonly clientId: string | undefined;
  readonly user: string | undefined;
  token: string | undefined;

  on<K extends keyof Events>(event: K, fn: (e: Events[K]) => void): () => void;
  once<K extends keyof Events>(event: K, fn: (e: Events[K]) => void): () => void;
  off<K extends keyof Events>(event: K, fn: (e: Events[K]) => void): void;

  connect(): void;
  close(): void;
  setToken(token: string): void;
  subscribe<T = unknown>(channel: string, handler?: (m: Message<T>) => void, opts?: { timeout?: number }): Promise<Subscribed>;
  unsubscribe(channel: string, handler?: (m: Message) => void): Promise<void>;
  subscriptions(): { channel: string; offset?: number; epoch?: string; active: boolean }[];
  publish(channel: string, data: unknown, opts?: { timeout?: number }): Promise<{ offset: number; channel?: string }>;
  presence(channel: string, opts?: { timeout?: number }): Promise<PresenceReply>;
  history<T = unknown>(
    channel: string,
    opts?: { limit?: number; since?: Position; timeout?: number },
  ): Promise<HistoryReply<T>>;
  stats(opts?: { timeout?: number }): Promise<Stats>;
}

export function connect(options?: Options): ThrongClient;
export function backoffDelay(attempt: number, backoff?: Backoff, random?: () => number, spread?: number): number;
export function closePolicy(code: number, overrides?: Record<number, ClosePolicy>): ClosePolicy;
export function tokenExpiry(token: string | undefined): number | undefined;
export const DEFAULTS: Readonly<Required<Omit<Options, "token" | "getToken" | "user" | "WebSocket" | "fetch" | "url" | "closePolicy">>>;
export const STATES: readonly State[];
export const VERSION: string;

declare global {
  interface Window {
    Throng?: {
      ThrongClient: typeof ThrongClient;
      ThrongError: typeof ThrongError;
      connect: typeof connect;
      backoffDelay: typeof backoffDelay;
      closePolicy: typeof closePolicy;
      tokenExpiry: typeof tokenExpiry;
      DEFAULTS: typeof DEFAULTS;
      STATES: typeof STATES;
      VERSION: string;
    };
  }
}
