// Calls to the latprune API with the tab's key: the console has no privileges of its own, so every page sees
// exactly what the key's tenant sees through the API.

const STORAGE = 'latprune.apiKey';

// sessionStorage: the key lives only in this tab and goes when the tab closes; it is never put in a cookie or URL.
export const auth = {
  get key() { return sessionStorage.getItem(STORAGE); },
  set(key) { sessionStorage.setItem(STORAGE, key); },
  clear() { sessionStorage.removeItem(STORAGE); },
};

export class ApiError extends Error {
  constructor(status, detail) {
    super(errorText(detail, status));
    this.status = status;
    this.detail = detail;
  }
}

// The API's own words: a string detail as is, FastAPI's 422 list as "field: message" lines.
export function errorText(detail, status) {
  if (typeof detail === 'string') return detail;
  if (Array.isArray(detail)) {
    return detail.map((e) => `${(e.loc || []).filter((p) => p !== 'body').join('.') || 'request'}: ${e.msg}`)
      .join('\n');
  }
  return detail ? JSON.stringify(detail) : `HTTP ${status}`;
}

function headers(extra = {}) {
  return { Authorization: `Bearer ${auth.key || ''}`, ...extra };
}

async function failure(response) {
  let detail = null;
  try { detail = (await response.json()).detail; } catch { detail = await response.text().catch(() => null); }
  if (response.status === 401) {
    auth.clear();
    window.dispatchEvent(new CustomEvent('latprune:signed-out', { detail: errorText(detail, 401) }));
  }
  return new ApiError(response.status, detail);
}

export async function api(path, { method = 'GET', body, extraHeaders } = {}) {
  const init = { method, headers: headers(extraHeaders) };
  if (body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  if (!response.ok) throw await failure(response);
  return response.status === 204 ? null : response.json();
}

function parseEvent(block) {
  const event = { event: 'message', data: '' };
  for (const line of block.split('\n')) {
    if (!line || line.startsWith(':')) continue;
    const at = line.indexOf(':');
    const field = at < 0 ? line : line.slice(0, at);
    const value = at < 0 ? '' : line.slice(at + 1).replace(/^ /, '');
    if (field === 'data') event.data += (event.data ? '\n' : '') + value;
    else event[field] = value;
  }
  if (!event.data && !event.id) return null;
  try { event.data = JSON.parse(event.data); } catch { /* keep the text */ }
  return event;
}

// The job's server-sent events through fetch(): EventSource cannot send the Authorization header. A dropped
// stream is reopened after the last event seen (`after`), the same resume the API offers with Last-Event-ID.
export async function followEvents(jobId, onEvent, signal) {
  let last = 0;
  while (!signal.aborted) {
    try {
      const response = await fetch(`/v1/jobs/${jobId}/events?after=${last}`, { headers: headers(), signal });
      if (!response.ok) throw await failure(response);
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = '';
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value.replace(/\r\n/g, '\n');
        let cut;
        while ((cut = buffer.indexOf('\n\n')) >= 0) {
          const event = parseEvent(buffer.slice(0, cut));
          buffer = buffer.slice(cut + 2);
          if (!event) continue;
          if (event.id) last = Number(event.id);
          onEvent(event);
          if (event.event === 'end') return;
        }
      }
    } catch (error) {
      if (signal.aborted) return;
      if (error instanceof ApiError && error.status < 500) throw error;
    }
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}

function hex(buffer) {
  return [...new Uint8Array(buffer)].map((b) => b.toString(16).padStart(2, '0')).join('');
}

function fileName(response, fallback) {
  const disposition = response.headers.get('Content-Disposition') || '';
  const match = /filename\*?=(?:UTF-8'')?"?([^";]+)"?/i.exec(disposition);
  return match ? decodeURIComponent(match[1]) : fallback;
}

// Fetch a file with the key, hash it here, and hand it to the browser as a download. The hash is checked
// against the API's X-Checkpoint-SHA256, so a truncated transfer shows up on the page.
export async function download(path, fallbackName = 'download.bin') {
  const response = await fetch(path, { headers: headers() });
  if (!response.ok) throw await failure(response);
  const blob = await response.blob();
  // crypto.subtle exists only in secure contexts (https, localhost): elsewhere the hash is left unchecked.
  const sha256 = crypto.subtle ? hex(await crypto.subtle.digest('SHA-256', await blob.arrayBuffer())) : null;
  const name = fileName(response, fallbackName);
  const link = document.createElement('a');
  link.href = URL.createObjectURL(blob);
  link.download = name;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 60000);
  const expected = response.headers.get('X-Checkpoint-SHA256');
  return { name, sha256, expected, size: blob.size, overBudget: response.headers.get('X-Over-Budget'),
           member: response.headers.get('X-Subnet-Member') };
}

// crypto.randomUUID needs a secure context too; getRandomValues does not.
export function randomId() {
  if (crypto.randomUUID) return crypto.randomUUID();
  return hex(crypto.getRandomValues(new Uint8Array(16)));
}
