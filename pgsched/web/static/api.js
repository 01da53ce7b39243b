// The dashboard's only door to the service: JSON calls under api/ (the session cookie
// authenticates them; the browser adds Origin to writes) and the event stream.

export class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

export async function call(method, path, body) {
  const init = { method, headers: { Accept: "application/json" }, credentials: "same-origin" };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(`api/${path}`, init);
  if (response.status === 401) {
    location.reload(); // the session ended: the page answers with the login form
    throw new ApiError(401, "logged out");
  }
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new ApiError(response.status, data.error || response.statusText);
  return data;
}

export const get = (path) => call("GET", path);
export const post = (path, body) => call("POST", path, body);

export function query(params) {
  const search = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    if (value !== undefined && value !== null && value !== "") search.append(key, value);
  }
  const text = search.toString();
  return text ? `?${text}` : "";
}

// One EventSource for the page; handlers by event type. EventSource reconnects by itself
// and sends Last-Event-ID, so the service replays what was missed (or says "resync").
export function subscribe(handlers, onState) {
  const source = new EventSource("api/events");
  source.onopen = () => onState(true);
  source.onerror = () => onState(false);
  for (const [kind, handler] of Object.entries(handlers)) {
    source.addEventListener(kind, (event) => handler(JSON.parse(event.data)));
  }
  return source;
}
