// flotilla's dashboard: plain JavaScript, no build step, no dependencies.
//
// It reads the registry's API with the token the operator gives it (kept in this tab's
// session storage only) and stays live: service changes arrive over the SSE stream
// (/v1/events, read with fetch so the token goes in a header, never in a URL), the
// service list, stacks, assignments and the lbs' own reports over blocking queries,
// nodes every second.
// Every string from the server is set as text, never as HTML.
'use strict';

const state = {
  token: null,
  summaries: [],
  instances: new Map(), // service -> InstanceView[]
  nodes: [],
  stacks: [],
  assignments: {},
  events: [], // newest first: {at, service, passing, total}
  history: new Map(), // service -> [{t, w: {id: weight}}]
  lbs: [], // the lbs' latest reports (GET /v1/lbs)
  lbsAt: 0, // when they arrived (their ages grow from there)
  inventories: [], // per node, the backup archives it keeps (GET /v1/backups)
  traffic: new Map(), // service -> [{t, rps, p99}] from the lbs' reports
  latency: new Map(), // service -> [{t, w: {'ip:port': p99 ms}}] per backend, from the lbs
  live: false,
  generation: 0, // bumped on logout: loops of an old session stop
};
const HISTORY_MS = 5 * 60 * 1000;

class AuthError extends Error {}

function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === 'class') e.className = v;
    else if (k.startsWith('data-')) e.setAttribute(k, v);
    else e[k] = v;
  }
  for (const kid of kids.flat()) {
    if (kid === null || kid === undefined) continue;
    e.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
  }
  return e;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function api(path, opts = {}) {
  const resp = await fetch(path, {
    ...opts,
    headers: { Authorization: 'Bearer ' + state.token, ...(opts.headers || {}) },
  });
  if (resp.status === 401 || resp.status === 403) {
    let why = '';
    try { why = (await resp.json()).error || ''; } catch (_) { /* not JSON */ }
    throw new AuthError(`The server refused this token (${resp.status}${why ? ': ' + why : ''}). ` +
      'Enter a token with the read role, or an admin token.');
  }
  if (!resp.ok) throw new Error(`${path}: ${resp.status}`);
  return { body: await resp.json(), index: Number(resp.headers.get('x-flotilla-index') || 0) };
}

// ---- sign in -------------------------------------------------------------------

// A link may carry the token in its fragment (never sent to the server); it is moved
// to session storage and taken out of the address bar. Says whether there was one.
function tokenFromHash() {
  const m = location.hash.match(/[#&]token=([^&]+)/);
  if (!m) return false;
  sessionStorage.setItem('flotilla-token', decodeURIComponent(m[1]));
  history.replaceState(null, '', location.pathname + '#/');
  return true;
}

function start() {
  tokenFromHash();
  const t = sessionStorage.getItem('flotilla-token');
  if (t) signIn(t); else showLogin('');
}

function showLogin(message) {
  state.generation++;
  state.token = null;
  document.getElementById('logout').hidden = true;
  setLive(false);
  const main = document.getElementById('main');
  main.replaceChildren(document.getElementById('login').content.cloneNode(true));
  document.getElementById('login-error').textContent = message;
  document.getElementById('login-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const t = document.getElementById('token').value.trim();
    if (t) signIn(t);
  });
}

async function signIn(token) {
  state.token = token;
  const gen = ++state.generation;
  try {
    await loadAll();
  } catch (e) {
    sessionStorage.removeItem('flotilla-token');
    showLogin(e instanceof AuthError ? e.message : `Cannot reach the server: ${e.message}`);
    return;
  }
  sessionStorage.setItem('flotilla-token', token);
  document.getElementById('logout').hidden = false;
  render();
  follow(gen, streamEvents);
  // A browser keeps at most six HTTP/1.1 connections to one server, and every blocking
  // query holds one for up to 30 s: lists that move the same index share one watch
  // (assignments move with stacks, backup inventories with the lbs' reports), so the
  // long-lived ones stay at four (with the event stream) and the rest keep a way in.
  follow(gen, watch('/v1/services', async (b) => { state.summaries = b; }));
  follow(gen, watch('/v1/stacks', async (b) => {
    state.stacks = b;
    state.assignments = (await api('/v1/assignments')).body.assignments || {};
  }));
  follow(gen, watch('/v1/lbs', async (b) => {
    state.lbs = b;
    state.lbsAt = Date.now();
    rememberTraffic(b, state.lbsAt);
    state.inventories = (await api('/v1/backups')).body;
  }));
  follow(gen, pollNodes);
}

// Runs `loop(gen)` until the session changes; an auth failure ends the session.
async function follow(gen, loop) {
  try {
    await loop(gen);
  } catch (e) {
    if (e instanceof AuthError && gen === state.generation) showLogin(e.message);
  }
}

async function loadAll() {
  const [services, nodes, stacks, assignments, instances, lbs, inventories] = await Promise.all([
    api('/v1/services'), api('/v1/nodes'), api('/v1/stacks'), api('/v1/assignments'),
    api('/v1/instances'), api('/v1/lbs'), api('/v1/backups'),
  ]);
  state.inventories = inventories.body;
  state.lbs = lbs.body;
  state.lbsAt = Date.now();
  rememberTraffic(lbs.body, state.lbsAt);
  state.summaries = services.body;
  state.nodes = nodes.body;
  state.stacks = stacks.body;
  state.assignments = assignments.body.assignments || {};
  state.instances = new Map();
  for (const i of instances.body) {
    if (!state.instances.has(i.service)) state.instances.set(i.service, []);
    state.instances.get(i.service).push(i);
  }
  const now = Date.now();
  for (const [s, list] of state.instances) remember(s, list, now);
}

// ---- live updates --------------------------------------------------------------

function setLive(on) {
  state.live = on;
  const l = document.getElementById('live');
  l.textContent = on ? 'live' : 'reconnecting…';
  l.className = 'live ' + (on ? 'on' : 'off');
}

async function streamEvents(gen) {
  while (gen === state.generation) {
    try {
      const resp = await fetch('/v1/events', {
        headers: { Authorization: 'Bearer ' + state.token, Accept: 'text/event-stream' },
      });
      if (resp.status === 401 || resp.status === 403) {
        throw new AuthError(`The server refused this token (${resp.status}).`);
      }
      if (!resp.ok) throw new Error(String(resp.status));
      setLive(true);
      const reader = resp.body.getReader();
      const decoder = new TextDecoder();
      let buf = '';
      while (gen === state.generation) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buf.indexOf('\n\n')) >= 0) {
          onEvent(buf.slice(0, cut));
          buf = buf.slice(cut + 2);
        }
      }
    } catch (e) {
      if (e instanceof AuthError) throw e;
    }
    setLive(false);
    await sleep(1000);
    // Anything missed while away comes back whole.
    try { await loadAll(); scheduleRender(); } catch (e) { if (e instanceof AuthError) throw e; }
  }
}

function onEvent(chunk) {
  let kind = 'message';
  const data = [];
  for (const line of chunk.split('\n')) {
    if (line.startsWith('event:')) kind = line.slice(6).trim();
    else if (line.startsWith('data:')) data.push(line.slice(5).replace(/^ /, ''));
  }
  if (kind === 'resync') { loadAll().then(scheduleRender, () => {}); return; }
  if (kind !== 'service' || !data.length) return;
  const ev = JSON.parse(data.join('\n'));
  state.instances.set(ev.service, ev.instances);
  const now = Date.now();
  remember(ev.service, ev.instances, now);
  state.events.unshift({
    at: now,
    service: ev.service,
    passing: ev.instances.filter((i) => i.health === 'passing').length,
    total: ev.instances.length,
  });
  state.events.length = Math.min(state.events.length, 50);
  scheduleRender();
}

// A blocking query loop: each answer is applied, then the next waits for a change.
function watch(path, apply) {
  return async (gen) => {
    let index = 0;
    while (gen === state.generation) {
      try {
        const r = await api(`${path}?index=${index}&wait=30s`);
        if (gen !== state.generation) return;
        if (r.index !== index) { await apply(r.body); scheduleRender(); }
        index = r.index;
      } catch (e) {
        if (e instanceof AuthError) throw e;
        await sleep(1000);
      }
    }
  };
}

async function pollNodes(gen) {
  while (gen === state.generation) {
    try {
      state.nodes = (await api('/v1/nodes')).body;
      scheduleRender();
    } catch (e) {
      if (e instanceof AuthError) throw e;
    }
    await sleep(1000);
  }
}

// Feedback weights over time, per service, for the plot.
function remember(service, instances, now) {
  const h = state.history.get(service) || [];
  const w = {};
  for (const i of instances) w[i.id] = i.feedback_weight ?? i.weight;
  h.push({ t: now, w });
  while (h.length && h[0].t < now - HISTORY_MS) h.shift();
  state.history.set(service, h);
}

// ---- pages ---------------------------------------------------------------------

let renderQueued = false;
function scheduleRender() {
  if (renderQueued) return;
  renderQueued = true;
  requestAnimationFrame(() => { renderQueued = false; render(); });
}

function render() {
  if (!state.token) return;
  const main = document.getElementById('main');
  const m = location.hash.match(/^#\/service\/(.+)$/);
  const st = location.hash.match(/^#\/stack\/(.+)$/);
  const page = m ? servicePage(decodeURIComponent(m[1]))
    : st ? stackPage(decodeURIComponent(st[1]))
      : location.hash === '#/lbs' ? lbsPage()
        : location.hash === '#/backups' ? backupsPage() : overview();
  main.replaceChildren(page);
}

function health(h) {
  return el('span', { class: 'badge ' + h }, h);
}

function ago(ms) {
  const s = Math.max(0, Math.round(ms / 100) / 10);
  return s < 60 ? `${s.toFixed(1)} s` : `${Math.round(s / 60)} min`;
}

function table(headers, rows, empty) {
  if (!rows.length) return el('p', { class: 'empty' }, empty);
  return el('table', {},
    el('thead', {}, el('tr', {}, headers.map((h) =>
      el('th', { class: h.endsWith('#') ? 'num' : '' }, h.replace(/#$/, ''))))),
    el('tbody', {}, rows));
}

function passingOf(stack, service, spec) {
  return (state.instances.get(service) || []).filter((i) =>
    i.meta.stack === stack && i.meta.spec === spec && i.health === 'passing').length;
}

function overview() {
  const now = Date.now();
  const nodes = table(['Node', 'Address', 'Lease age#', 'TTL#', 'Instances#'],
    state.nodes.map((n) => el('tr', { 'data-node': n.name },
      el('td', {}, n.name), el('td', {}, n.address || ''),
      el('td', { class: 'num' }, ago(now - n.renewed_ms)),
      el('td', { class: 'num' }, ago(n.ttl_ms)),
      el('td', { class: 'num' }, n.instances))),
    'No node holds a lease.');
  const services = table(['Service', 'Passing#', 'Instances#'],
    state.summaries.map((s) => el('tr', { 'data-service': s.name, class: s.passing < s.instances ? 'critical' : '' },
      el('td', {}, el('a', { href: '#/service/' + encodeURIComponent(s.name) }, s.name)),
      el('td', { class: 'num' }, s.passing), el('td', { class: 'num' }, s.instances))),
    'No services registered.');
  const stackRows = [];
  for (const st of state.stacks) {
    for (const [name, svc] of Object.entries(st.services)) {
      const spec = svc.spec_hash.slice(0, 12);
      const passing = passingOf(st.name, name, spec);
      const desired = svc.spec.replicas ?? 1;
      stackRows.push(el('tr', { 'data-stack': st.name + '/' + name, class: passing < desired ? 'critical' : '' },
        el('td', {}, el('a', { href: '#/stack/' + encodeURIComponent(st.name) }, st.name)),
        el('td', {}, el('a', { href: '#/service/' + encodeURIComponent(name) }, name)),
        el('td', {}, svc.spec.version ?? '1'), el('td', { class: 'num' }, desired),
        el('td', { class: 'num' }, passing), el('td', { class: 'muted' }, spec),
        el('td', {}, st.rolled_back && st.rolled_back.startsWith(name) ? 'rolled back: ' + st.rolled_back : '')));
    }
  }
  const stacks = table(['Stack', 'Service', 'Version', 'Desired#', 'Passing#', 'Spec', 'Note'],
    stackRows, 'No stacks deployed.');
  const replicas = table(['Replica', 'Node', 'Generation#', 'State'],
    Object.entries(state.assignments).map(([key, a]) => el('tr', { 'data-replica': key },
      el('td', {}, key), el('td', {}, a.node), el('td', { class: 'num' }, a.generation),
      el('td', {}, replicaState(a, now)))),
    'No stateful replicas.');
  const events = table(['When', 'Service', 'Passing'],
    state.events.slice(0, 15).map((e) => el('tr', {},
      el('td', { class: 'muted' }, new Date(e.at).toLocaleTimeString()),
      el('td', {}, e.service), el('td', {}, `${e.passing} of ${e.total}`))),
    'No changes since this page opened.');
  return el('div', {},
    el('h1', {}, 'Cluster'),
    el('h2', {}, 'Nodes'), nodes,
    el('h2', {}, 'Services'), services,
    el('h2', {}, 'Stacks'), stacks,
    el('h2', {}, 'Stateful replicas'), replicas,
    el('h2', {}, 'Recent changes'), events);
}

// One stack: per service the version running and the one before it, desired against
// passing, a rollout in progress (replicas of the old version still up), pins and the
// last rollback; and the stack's stateful replicas.
function stackPage(name) {
  const now = Date.now();
  const st = state.stacks.find((s) => s.name === name);
  if (!st) {
    return el('div', {}, el('h1', {}, `Stack ${name}`),
      el('p', { class: 'empty' }, 'No such stack (not deployed, or removed).'));
  }
  const rows = Object.entries(st.services).map(([svc, d]) => {
    const spec = d.spec_hash.slice(0, 12);
    const mine = (state.instances.get(svc) || []).filter((i) => i.meta.stack === name);
    const current = mine.filter((i) => i.meta.spec === spec);
    const passing = current.filter((i) => i.health === 'passing').length;
    const old = mine.length - current.length;
    const desired = d.spec.replicas ?? 1;
    const rollout = old > 0 ? `rolling out: ${current.length} new, ${old} old`
      : passing < desired ? 'converging' : 'steady';
    const prev = st.previous && st.previous[svc] ? st.previous[svc].spec_hash.slice(0, 12) : '';
    const pins = Object.entries(d.pins || {}).map(([r, n]) => `${r} → ${n}`).join(', ');
    return el('tr', { 'data-stack-service': svc, class: passing < desired ? 'critical' : '' },
      el('td', {}, el('a', { href: '#/service/' + encodeURIComponent(svc) }, svc)),
      el('td', {}, d.spec.version ?? '1'), el('td', { class: 'muted' }, spec),
      el('td', { class: 'num' }, desired), el('td', { class: 'num' }, passing),
      el('td', {}, rollout), el('td', { class: 'muted' }, prev), el('td', {}, pins));
  });
  const replicas = table(['Replica', 'Node', 'Generation#', 'State'],
    Object.entries(state.assignments).filter(([key]) => key.startsWith(name + '/'))
      .map(([key, a]) => el('tr', { 'data-replica': key },
        el('td', {}, key), el('td', {}, a.node), el('td', { class: 'num' }, a.generation),
        el('td', {}, replicaState(a, now)))),
    'No stateful replicas.');
  return el('div', {},
    el('h1', {}, `Stack ${name}`),
    el('p', { class: 'muted' }, `generation ${st.generation}`),
    st.rolled_back ? el('p', { id: 'rolled-back' }, el('span', { class: 'badge warn' }, 'rolled back'),
      ' ' + st.rolled_back) : el('p', { class: 'muted' }, 'No rollback.'),
    table(['Service', 'Version', 'Spec', 'Desired#', 'Passing#', 'Rollout', 'Previous', 'Pins'],
      rows, 'No services.'),
    el('h2', {}, 'Stateful replicas'), replicas);
}

function replicaState(a, now) {
  if (a.lost_at_ms) {
    return el('span', { class: 'badge warn' }, `node ${a.node} lost ${ago(now - a.lost_at_ms)} ago`);
  }
  if (a.recovered) return `recovered (${a.recovered.how}) from node ${a.recovered.from_node}`;
  return 'assigned';
}

function loadBar(share) {
  if (share === undefined || share === null) return el('span', { class: 'muted' }, '–');
  const pct = Math.max(0, Math.min(100, share * 100));
  return el('span', {},
    el('span', { class: 'bar-box' }, el('span', { class: 'bar', style: `width:${pct}%` })),
    `${pct.toFixed(0)} %`);
}

function servicePage(name) {
  const list = (state.instances.get(name) || []).slice().sort((a, b) => a.id.localeCompare(b.id));
  const rows = list.map((i) => el('tr', { 'data-instance': i.id, class: i.health },
    el('td', {}, i.id), el('td', {}, i.node || ''), el('td', {}, `${i.address}:${i.port}`),
    el('td', {}, health(i.health)),
    el('td', { class: 'num' }, i.feedback_weight != null
      ? `${i.weight} → ${Math.round(i.feedback_weight)}` : String(i.weight)),
    el('td', {}, loadBar(i.load && i.load.cpu)), el('td', {}, loadBar(i.load && i.load.memory)),
    el('td', { class: 'muted' }, i.output || '')));
  return el('div', {},
    el('h1', {}, `Service ${name}`),
    el('p', { class: 'muted' }, `${list.filter((i) => i.health === 'passing').length} of ${list.length} passing`),
    table(['Instance', 'Node', 'Address', 'Health', 'Weight (static → feedback)#', 'CPU', 'Memory', 'Check output'],
      rows, 'No instances.'),
    el('h2', {}, 'Traffic through the lbs'),
    trafficOf(name),
    el('h2', {}, 'Weights over the last minutes'),
    weightPlot(name),
    el('h2', {}, 'Latency per backend (p99 through the lbs)'),
    latencyPlot(name));
}

// ---- backups --------------------------------------------------------------------

function size(bytes) {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  let x = bytes;
  while (x >= 1024 && i < units.length - 1) { x /= 1024; i += 1; }
  return `${i ? x.toFixed(1) : x} ${units[i]}`;
}

// Per replica: its newest archive anywhere, whether that one verified, and every node
// that keeps archives of it (a lost node's are out of reach: shown as such).
function backupsPage() {
  const now = Date.now();
  const replicas = new Map(); // STACK/SERVICE/REPLICA -> {newest: [archive, node][], nodes: Map}
  for (const inv of state.inventories) {
    for (const a of inv.archives) {
      const key = `${a.stack}/${a.service}/${a.replica}`;
      const r = replicas.get(key) || { newest: [], nodes: new Map() };
      const top = r.newest[0] && r.newest[0][0].taken_ms;
      if (top === undefined || a.taken_ms > top) r.newest = [[a, inv]];
      else if (a.taken_ms === top) r.newest.push([a, inv]);
      const n = r.nodes.get(inv.node) || { count: 0, newest: 0, live: inv.live };
      n.count += 1;
      n.newest = Math.max(n.newest, a.taken_ms);
      r.nodes.set(inv.node, n);
      replicas.set(key, r);
    }
  }
  const rows = [...replicas.keys()].sort().map((key) => {
    const r = replicas.get(key);
    const [a] = r.newest[0];
    const verdicts = r.newest.map(([x]) => x.verified);
    const verified = verdicts.includes(false) ? el('span', { class: 'badge critical' }, 'failed')
      : verdicts.includes(true) ? el('span', { class: 'badge passing' }, 'verified')
        : el('span', { class: 'muted' }, 'not yet read');
    const runs = state.assignments[key];
    const holders = [...r.nodes.entries()].sort().map(([node, n]) =>
      el('span', { class: 'holder' + (n.live ? '' : ' lost'), 'data-node': node, title: `${n.count} archives, newest ${ago(now - n.newest)} ago` },
        `${node} (${n.count})`));
    return el('tr', { 'data-replica': key },
      el('td', {}, key), el('td', {}, runs ? runs.node : '—'),
      el('td', { class: 'num' }, `${ago(now - a.taken_ms)} ago`),
      el('td', {}, a.delta ? 'incremental' : 'full'),
      el('td', { class: 'num' }, size(a.bytes)), el('td', { class: 'verdict' }, verified),
      el('td', {}, ...holders));
  });
  const silent = state.inventories.filter((i) => !i.live).map((i) => i.node);
  return el('div', {}, el('h1', {}, 'Backups'),
    el('p', { class: 'muted' }, 'Per stateful replica: its newest archive on any node, whether it read back whole, and the nodes that keep its archives (their count).'),
    table(['Replica', 'Runs on', 'Newest#', 'Kind', 'Size#', 'Newest verified', 'Kept on'], rows,
      'No node reports backup archives (a service needs [service.NAME.backup]).'),
    silent.length ? el('p', { class: 'muted' }, `Nodes without a lease (their archives are out of reach): ${silent.join(', ')}`) : el('span'));
}

// ---- load balancers ------------------------------------------------------------

// The fresh reports' listeners that front `service`.
function frontsOf(service) {
  return state.lbs.filter((lb) => !lb.stale).flatMap((lb) =>
    lb.listeners.filter((l) => l.service === service).map((l) => ({ lb: lb.name, ...l })));
}

// Requests per second (all lbs summed) and the worst p99, per service over time.
function rememberTraffic(lbs, now) {
  const by = new Map();
  for (const lb of lbs) {
    if (lb.stale) continue;
    for (const l of lb.listeners) {
      if (!l.service) continue;
      const t = by.get(l.service) || { rps: 0, p99: null, backends: {} };
      t.rps += l.requests_per_s;
      if (l.p99_ms != null) t.p99 = Math.max(t.p99 ?? 0, l.p99_ms);
      // Per backend, the worst p99 any lb saw.
      for (const [addr, ms] of Object.entries(l.backend_p99_ms || {})) {
        t.backends[addr] = Math.max(t.backends[addr] ?? 0, ms);
      }
      by.set(l.service, t);
    }
  }
  const keep = (map, service, point) => {
    const h = map.get(service) || [];
    h.push(point);
    while (h.length && h[0].t < now - HISTORY_MS) h.shift();
    map.set(service, h);
  };
  for (const [service, t] of by) {
    keep(state.traffic, service, { t: now, rps: t.rps, p99: t.p99 });
    if (Object.keys(t.backends).length) keep(state.latency, service, { t: now, w: t.backends });
  }
}

function fmt(x, unit) {
  return x == null ? '—' : `${x < 10 ? x.toFixed(1) : Math.round(x)} ${unit}`;
}

function trafficOf(service) {
  const fronts = frontsOf(service);
  if (!fronts.length) return el('p', { class: 'empty' }, 'No lb reports traffic for this service.');
  const rps = fronts.reduce((a, f) => a + f.requests_per_s, 0);
  const p99s = fronts.map((f) => f.p99_ms).filter((x) => x != null);
  const summary = el('p', { id: 'traffic' },
    el('strong', { 'data-rps': rps.toFixed(3) }, fmt(rps, 'req/s')),
    ` · p99 ${fmt(p99s.length ? Math.max(...p99s) : null, 'ms')} (bucket bound)`,
    ` · ${fronts.length} listener${fronts.length > 1 ? 's' : ''}: ${fronts.map((f) => `${f.lb}/${f.name}`).join(', ')}`);
  return el('div', {}, summary, linePlot(state.traffic.get(service) || [], 'rps', 'req/s'));
}

// One series over the last minutes as an SVG polyline (no plotting library).
function linePlot(points, key, unit) {
  if (points.length < 2) return el('p', { class: 'empty' }, 'Plotted after two reports.');
  const ns = 'http://www.w3.org/2000/svg';
  const svg = document.createElementNS(ns, 'svg');
  svg.setAttribute('class', 'plot');
  svg.setAttribute('viewBox', '0 0 600 120');
  svg.setAttribute('preserveAspectRatio', 'none');
  const t0 = points[0].t;
  const span = Math.max(1, points[points.length - 1].t - t0);
  const max = Math.max(1e-9, ...points.map((p) => p[key] ?? 0));
  const line = document.createElementNS(ns, 'polyline');
  line.setAttribute('points', points.map((p) =>
    `${(((p.t - t0) / span) * 600).toFixed(1)},${(110 - ((p[key] ?? 0) / max) * 100).toFixed(1)}`).join(' '));
  line.setAttribute('fill', 'none');
  line.setAttribute('stroke', COLORS[0]);
  line.setAttribute('stroke-width', '2');
  svg.append(line);
  return el('div', {}, svg, el('p', { class: 'muted' }, `0 to ${fmt(max, unit)} over the last ${ago(span)}`));
}

function lbsPage() {
  const now = Date.now();
  if (!state.lbs.length) {
    return el('div', {}, el('h1', {}, 'Load balancers'),
      el('p', { class: 'empty' }, 'No lb reports to this registry ([registry] in the lb\'s config).'));
  }
  const sections = state.lbs.map((lb) => {
    const ha = lb.ha;
    // Ages as of now, not as of the answer (no report in a while is the news).
    const age = lb.age_ms + (now - state.lbsAt);
    const stale = age > 3 * lb.period_ms;
    const vrrp = ha
      ? el('p', {},
        el('span', { class: 'badge ' + (ha.state === 'master' ? 'passing' : ha.state === 'fault' ? 'critical' : 'warn'), 'data-vrrp': ha.state }, ha.state),
        ` priority ${ha.priority} · VIPs ${ha.vips.join(', ') || '—'} · master ${ha.master || '—'} · ${ha.transitions} transitions`)
      : el('p', { class: 'muted' }, 'No VRRP ([ha] not configured).');
    const history = ha && ha.history.length
      ? table(['When', 'From', 'To', 'Why'], ha.history.slice().reverse().map((t) => el('tr', {},
        el('td', {}, `${ago(now - t.at_ms)} ago`), el('td', {}, t.from), el('td', {}, t.to),
        el('td', { class: 'muted' }, t.reason))), '')
      : el('span');
    const listeners = table(['Listener', 'Service', 'Req/s#', 'Failed/s#', 'p99#', 'Backends#'],
      lb.listeners.map((l) => el('tr', { 'data-listener': l.name },
        el('td', {}, l.name),
        el('td', {}, l.service ? el('a', { href: '#/service/' + encodeURIComponent(l.service) }, l.service) : '—'),
        el('td', { class: 'num' }, fmt(l.requests_per_s, '')), el('td', { class: 'num' }, fmt(l.failures_per_s, '')),
        el('td', { class: 'num' }, fmt(l.p99_ms, 'ms')), el('td', { class: 'num' }, l.backends))),
      'No listeners.');
    return el('section', { 'data-lb': lb.name, class: stale ? 'stale' : '' },
      el('h2', {}, lb.name, ' ', el('span', { class: 'muted' },
        stale ? `silent for ${ago(age)}` : `reported ${ago(age)} ago`)),
      vrrp, history, listeners);
  });
  return el('div', {}, el('h1', {}, 'Load balancers'), ...sections);
}

const COLORS = ['#2457a6', '#c62828', '#1a7f37', '#a15c00', '#6a3fa0', '#00838f', '#5d4037', '#ad1457'];

function weightPlot(service) {
  return seriesPlot(state.history.get(service) || [], 'data-instance', (id) => id,
    'No weights seen yet.',
    (max, span) => `0 to ${Math.round(max)} over the last ${ago(span)}; the feedback weight where the lb published one, else the static weight`);
}

// Each backend's p99 as the lbs report it, labelled by the instance at that address.
function latencyPlot(service) {
  const byAddr = new Map((state.instances.get(service) || []).map((i) => [`${i.address}:${i.port}`, i.id]));
  return seriesPlot(state.latency.get(service) || [], 'data-backend',
    (addr) => byAddr.has(addr) ? `${byAddr.get(addr)} (${addr})` : addr,
    'No lb has reported this service\'s backends yet.',
    (max, span) => `0 to ${fmt(max, 'ms')} over the last ${ago(span)}; the bucket bound of each backend's 99th percentile per lb report, the worst of the lbs`);
}

// Several series over the last minutes, one step line per key of `w`
// (history: [{t, w: {key: value}}]), as SVG (no plotting library).
function seriesPlot(h, attr, label, empty, caption) {
  const ns = 'http://www.w3.org/2000/svg';
  const svg = document.createElementNS(ns, 'svg');
  svg.setAttribute('class', 'plot');
  svg.setAttribute('viewBox', '0 0 600 180');
  svg.setAttribute('preserveAspectRatio', 'none');
  const ids = [...new Set(h.flatMap((p) => Object.keys(p.w)))].sort();
  if (!h.length || !ids.length) return el('p', { class: 'empty' }, empty);
  const now = Date.now();
  // The last five minutes, or since the page began watching if that is shorter.
  const t0 = Math.max(now - HISTORY_MS, Math.min(h[0].t, now - 10000));
  const span = now - t0;
  const max = Math.max(1e-9, ...h.flatMap((p) => Object.values(p.w)));
  const x = (t) => ((t - t0) / span) * 600;
  const y = (w) => 170 - (w / max) * 160;
  const legend = el('div', { class: 'legend' });
  ids.forEach((id, k) => {
    const pts = [];
    let last = null;
    for (const p of h) {
      if (p.w[id] === undefined) continue;
      if (last !== null) pts.push(`${x(p.t).toFixed(1)},${y(last).toFixed(1)}`);
      pts.push(`${x(p.t).toFixed(1)},${y(p.w[id]).toFixed(1)}`);
      last = p.w[id];
    }
    if (last !== null) pts.push(`${x(now).toFixed(1)},${y(last).toFixed(1)}`);
    const line = document.createElementNS(ns, 'polyline');
    line.setAttribute('points', pts.join(' '));
    line.setAttribute('fill', 'none');
    line.setAttribute('stroke', COLORS[k % COLORS.length]);
    line.setAttribute('stroke-width', '2');
    line.setAttribute(attr, id);
    svg.append(line);
    legend.append(el('span', {}, el('i', { style: `background:${COLORS[k % COLORS.length]}` }), label(id)));
  });
  return el('div', {}, svg, legend, el('p', { class: 'muted' }, caption(max, span)));
}

window.addEventListener('hashchange', () => {
  // A link with another token, followed from this page: sign in with that one.
  if (tokenFromHash()) start();
  else if (state.token) render();
});
document.getElementById('logout').addEventListener('click', () => {
  sessionStorage.removeItem('flotilla-token');
  showLogin('');
});
// Lease ages move even when nothing else does.
setInterval(() => { if (state.token && !location.hash.startsWith('#/service/')) scheduleRender(); }, 1000);
start();
