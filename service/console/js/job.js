// One job: live progress from its server-sent events, its report, cancel, and downloads (per member and format,
// and per device: the member that device's budget picks).

import { api, download, followEvents } from './api.js';
import { h, mount, fmt, stateBadge, progressBar, errorBox, table } from './ui.js';

const FORMATS = ['onnx', 'safetensors', 'arch'];
const TERMINAL = ['succeeded', 'failed', 'cancelled'];

function liveLine(job) {
  const parts = [job.stage || job.state];
  if (job.epoch !== null && job.epoch !== undefined) parts.push(`epoch ${job.epoch}${job.epochs ? `/${job.epochs}` : ''}`);
  if (job.loss !== null && job.loss !== undefined) parts.push(`loss ${fmt.num(job.loss)}`);
  if (job.cost !== null && job.cost !== undefined) parts.push(`cost ${fmt.num(job.cost)}`);
  return parts.join(' · ');
}

function summary(job) {
  return h('dl', { class: 'kv' },
    h('dt', {}, 'method'), h('dd', {}, job.method), h('dt', {}, 'architecture'), h('dd', {}, job.arch),
    h('dt', {}, 'dataset'), h('dd', {}, job.dataset), h('dt', {}, 'budget'), h('dd', {}, fmt.budget(job.budget)),
    h('dt', {}, 'epochs'), h('dd', {}, job.epochs),
    h('dt', {}, 'params'), h('dd', {}, h('code', {}, JSON.stringify(job.params))),
    h('dt', {}, 'created'), h('dd', {}, fmt.time(job.created_at)),
    h('dt', {}, 'started'), h('dd', {}, fmt.time(job.started_at)),
    h('dt', {}, 'finished'), h('dd', {}, fmt.time(job.finished_at)),
    h('dt', {}, 'attempts'), h('dd', {}, job.attempts));
}

function readings(latency) {
  const pruned = (latency && latency.pruned) || {};
  const rows = [['final readings', pruned.readings_ms], ["finisher's readings", pruned.finisher_readings_ms],
                ['re-checked readings', pruned.rechecked_readings_ms]].filter(([, v]) => v && v.length);
  if (!rows.length) return null;
  return h('div', { id: 'readings' }, h('h3', {}, "The finisher's readings (ms)"),
    h('dl', { class: 'kv' }, rows.map(([label, values]) => [h('dt', {}, label),
      h('dd', {}, values.map((v) => Number(v).toPrecision(4)).join(', '))])),
    pruned.ratio_to_dense !== undefined ? h('p', { class: 'small muted' },
      `pruned / dense ratio ${fmt.num(pruned.ratio_to_dense, 4)}; slow-spell retries ${pruned.slow_retries ?? 0}`) : null);
}

function report(job) {
  const r = job.report;
  if (!r) return null;
  const parts = [h('h2', {}, 'Report')];
  if (r.dense && r.pruned) {
    const lat = r.latency_ms || {};
    const ms = (side) => (lat[side] || {});
    const measured = (side) => ms(side).drift_corrected ?? ms(side).measured;
    const columns = [
      { title: 'model', cell: (row) => row.name },
      { title: 'MACs', num: true, cell: (row) => fmt.count(row.macs) },
      { title: 'params', num: true, cell: (row) => fmt.count(row.params) },
      { title: 'accuracy', num: true, cell: (row) => fmt.pct(row.accuracy) },
    ];
    if (r.latency_ms) {  // only jobs that had a device's predictor: a flops budget without one has no latency
      columns.push({ title: 'predicted ms', num: true, cell: (row) => fmt.ms(ms(row.name).predicted) },
                   { title: 'measured ms', num: true, cell: (row) => fmt.ms(measured(row.name)) });
    }
    parts.push(table(columns, [{ name: 'dense', ...r.dense }, { name: 'pruned', ...r.pruned }],
                     { rowAttrs: (row) => ({ 'data-row': row.name }) }));
    parts.push(h('p', { class: 'small muted' }, `MACs kept: ${fmt.pct(r.pruned.macs / r.dense.macs)}; `,
      `finisher removed ${r.finisher_channels_removed ?? 0} channels; epochs ${JSON.stringify(r.epochs || {})}`));
    parts.push(readings(lat));
  } else if (r.members) {
    parts.push(h('p', {}, `A cohort of ${r.members.length} members: `, h('a', { href: `#/jobs/${job.id}/cohort` },
      'see the accuracy/latency plot'), '.'));
  }
  parts.push(h('details', {}, h('summary', {}, 'full report (JSON)'), h('pre', {}, JSON.stringify(r, null, 2))));
  return h('div', { class: 'card', id: 'report' }, parts);
}

// `where()` gives the file's URL when clicked, so the over-budget checkbox applies to the click.
export function downloadButtons(where, label, result) {
  return FORMATS.map((format) => h('button', {
    'data-download': `${label}:${format}`,
    onclick: async () => {
      mount(result, h('span', { class: 'muted' }, `downloading ${format}…`));
      try {
        const path = where();
        const file = await download(`${path}${path.includes('?') ? '&' : '?'}format=${format}`);
        const ok = file.sha256 !== null && file.expected === file.sha256;
        mount(result, h('div', { id: 'download-result', 'data-sha256': file.sha256, 'data-ok': String(ok), 'data-name': file.name },
          `saved ${file.name} (${fmt.count(file.size)}B, member ${file.member}) · SHA-256 `,
          h('span', { class: 'sha' }, file.sha256 ?? file.expected), ' ', file.sha256 === null
            ? h('span', { class: 'muted' }, '(not checked here: hashing needs https or localhost)')
            : h('b', { class: ok ? 'ok' : 'bad' }, ok ? 'matches X-Checkpoint-SHA256' : `differs from the API's ${file.expected}`),
          file.overBudget ? h('div', { class: 'notice' }, `over budget: ${file.overBudget}`) : null));
      } catch (error) {
        mount(result, errorBox(error));
      }
    },
  }, format));
}

async function downloads(job) {
  const result = h('div', { id: 'download-status' });
  const [subnets, devices] = await Promise.all([api(`/v1/jobs/${job.id}/subnets`), api('/v1/devices')]);
  const fastest = h('input', { type: 'checkbox', id: 'fastest' });
  const members = table([
    { title: 'member', num: true, cell: (s) => s.member },
    { title: 'resolution', num: true, cell: (s) => s.resolution },
    { title: 'MACs', num: true, cell: (s) => fmt.count(s.macs) },
    { title: 'params', num: true, cell: (s) => fmt.count(s.params) },
    { title: 'accuracy', num: true, cell: (s) => fmt.pct(s.accuracy) },
    { title: 'latency per device', cell: (s) => Object.entries(s.latency).map(([id, l]) =>
      h('div', { class: 'small' }, `${(devices.find((d) => String(d.id) === id) || { name: id }).name}: `,
        `predicted ${fmt.ms(l.predicted_ms)}, measured ${fmt.ms(l.measured_ms)}`)) },
    { title: 'download', cell: (s) => downloadButtons(() => `/v1/jobs/${job.id}/subnets/${s.member}/checkpoint`,
                                                      `member-${s.member}`, result) },
  ], subnets, { rowAttrs: (s) => ({ 'data-member': s.member }) });
  const perDevice = devices.length ? table([
    { title: 'device', cell: (d) => d.name },
    { title: 'budget', cell: (d) => fmt.ms(d.latency_budget_ms) },
    { title: 'the member its budget picks', cell: (d) => downloadButtons(
      () => `/v1/jobs/${job.id}/checkpoint?device=${d.id}${fastest.checked ? '&over_budget=fastest' : ''}`,
      `device-${d.name}`, result) },
  ], devices) : h('p', { class: 'muted' }, 'No devices registered: ', h('a', { href: '#/devices' }, 'add one'), '.');
  return h('div', { class: 'card downloads', id: 'downloads' },
    h('h2', {}, 'Downloads'), subnets.length > 1 || job.method === 'ofa'
      ? h('p', {}, h('a', { href: `#/jobs/${job.id}/cohort`, id: 'cohort-link' }, 'Cohort plot')) : null,
    h('h3', {}, 'Per member'), members, h('h3', {}, 'Per device'),
    devices.length ? h('div', { class: 'small' }, fastest, h('label', { for: 'fastest', class: 'inline' },
      ' when no member fits: send the fastest (over_budget=fastest)')) : null, perDevice, result);
}

export function jobView(view, id) {
  const stopped = new AbortController();
  const live = { bar: h('div'), line: h('div', { class: 'muted', id: 'live-line' }), state: h('span'),
                 trail: h('div', { class: 'small muted', id: 'stage-trail' }) };
  const stages = [];  // the stages this page has seen on the event stream, in order
  const sections = h('div');
  let job = null;

  let generation = 0;  // events can start several reloads at once; only the newest one paints

  async function load() {
    const mine = ++generation;
    const fresh = await api(`/v1/jobs/${id}`);
    if (stopped.signal.aborted || mine !== generation) return;
    job = fresh;
    paintLive();
    const cancel = TERMINAL.includes(job.state) ? null : h('button', {
      class: 'danger', id: 'cancel', disabled: job.cancel_requested, onclick: async () => {
        try {
          await api(`/v1/jobs/${id}/cancel`, { method: 'POST' });
          await load();  // queued: cancelled now; running: 'cancelling…' until the worker's state event
        } catch (e) { sections.prepend(errorBox(e)); }
      },
    }, job.cancel_requested ? 'cancelling…' : 'Cancel');
    mount(sections, h('div', { class: 'card' }, summary(job), cancel ? h('p', {}, cancel) : null),
      job.error ? h('div', { class: 'error', id: 'job-error' }, job.error) : null, report(job));
    if (job.state !== 'succeeded') return;
    const box = await downloads(job);
    if (!stopped.signal.aborted && mine === generation) sections.append(box);
  }

  function paintLive() {
    mount(live.state, stateBadge(job.state));
    mount(live.bar, progressBar(job.progress, true));
    live.line.textContent = `${liveLine(job)} · ${Math.round(100 * job.progress)}%`;
  }

  function onEvent(event) {
    if (!job || stopped.signal.aborted) return;
    const d = event.data || {};
    if (event.event === 'progress') {
      if (d.stage && stages[stages.length - 1] !== d.stage) {
        stages.push(d.stage);
        live.trail.textContent = `stages: ${stages.join(' → ')}`;
        live.trail.dataset.stages = stages.join(' ');
      }
      Object.assign(job, { progress: d.fraction ?? job.progress, stage: d.stage ?? job.stage, epoch: d.epoch ?? job.epoch,
                           epochs: d.epochs, loss: d.loss ?? job.loss, cost: d.cost ?? job.cost });
      paintLive();
    } else if (event.event === 'log') {
      sections.prepend(h('div', { class: 'notice' }, d.message || JSON.stringify(d)));
    } else if (event.event === 'state' || event.event === 'end') {
      load().catch((e) => mount(sections, errorBox(e)));
    }
  }

  mount(view, h('div', { class: 'row' }, h('h1', {}, `Job ${id}`), live.state),
        h('div', { class: 'card', id: 'live' }, live.bar, live.line, live.trail), sections);
  load().then(() => {
    if (!TERMINAL.includes(job.state)) return followEvents(id, onEvent, stopped.signal);
    return null;
  }).catch((error) => { if (!stopped.signal.aborted) mount(view, h('h1', {}, `Job ${id}`), errorBox(error)); });
  return () => stopped.abort();
}
