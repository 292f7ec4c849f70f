// Devices: list, register, profile (fits the device's latency predictor), and each predictor's held-out metrics
// with a plot of predicted vs measured latency on its held-out configurations.

import { api } from './api.js';
import { h, mount, fmt, field, stateBadge, errorBox, table } from './ui.js';
import { scatter } from './plot.js';

const REFRESH_MS = 3000;

function metricCells(p) {
  const m = (p.metrics && p.metrics.test && (p.metrics.test.absolute_ms || p.metrics.test.relative)) || null;
  return m ? `MAPE ${m.mape.toFixed(2)}% · within 10% ${fmt.pct(m.within_10)} · Spearman ${m.spearman.toFixed(3)} · n ${m.n}`
           : '–';
}

function heldOutPlot(p) {
  const points = (p.metrics && p.metrics.held_out) || null;
  if (!points || !points.measured_ms || !points.measured_ms.length) {
    return h('p', { class: 'small muted' }, 'No held-out points recorded (a predictor fitted before the console).');
  }
  const data = points.measured_ms.map((measured, i) => ({
    x: measured, y: points.predicted_ms[i], key: i,
    tip: `measured ${fmt.ms(measured)}\npredicted ${fmt.ms(points.predicted_ms[i])}\n`
       + `error ${(100 * (points.predicted_ms[i] - measured) / measured).toFixed(1)}%`
       + (points.resolution ? `\nresolution ${points.resolution[i]} px` : ''),
  }));
  return scatter(data, { title: `${p.arch} @ ${p.resolution} px: held-out configurations (${data.length})`,
                         xLabel: 'measured (ms)', yLabel: 'predicted (ms)', diagonal: true, width: 420, height: 320,
                         fx: (v) => v.toPrecision(3), fy: (v) => v.toPrecision(3) });
}

function predictorsTable(predictors) {
  if (!predictors.length) return h('p', { class: 'muted' }, 'No predictors yet: profile the device below.');
  return [table([
    { title: 'id', num: true, cell: (p) => p.id },
    { title: 'arch', cell: (p) => p.arch },
    { title: 'res', num: true, cell: (p) => p.resolution },
    { title: 'state', cell: (p) => stateBadge(p.state) },
    { title: 'samples', num: true, cell: (p) => p.samples_requested },
    { title: 'held-out metrics (ms)', cell: (p) => (p.error ? h('span', { class: 'bad' }, p.error) : metricCells(p)) },
    { title: 'dense ms', num: true, cell: (p) => fmt.ms(p.reference_ms) },
    { title: 'finished', cell: (p) => fmt.time(p.finished_at) },
  ], predictors, { rowAttrs: (p) => ({ 'data-predictor': p.id }) }),
  h('div', { class: 'plots' }, predictors.filter((p) => p.state === 'ready').map(heldOutPlot))];
}

function profileForm(device, onDone) {
  const message = h('div');
  const form = h('form', { class: 'row', onsubmit: async (event) => {
    event.preventDefault();
    const body = { arch: form.elements.arch.value.trim(), samples: Number(form.elements.samples.value) };
    if (form.elements.resolution.value) body.resolution = Number(form.elements.resolution.value);
    try {
      const p = await api(`/v1/devices/${device.id}/profile`, { method: 'POST', body });
      mount(message, h('span', { class: 'muted' }, `profiling queued as predictor ${p.id} on ${device.queue}`));
      onDone();
    } catch (error) { mount(message, errorBox(error)); }
  } },
  field('arch', h('input', { id: `p-arch-${device.id}`, name: 'arch', value: 'resnet20' })),
  field('resolution', h('input', { id: `p-res-${device.id}`, name: 'resolution', type: 'number', placeholder: "arch's" })),
  field('samples', h('input', { id: `p-n-${device.id}`, name: 'samples', type: 'number', value: '200' })),
  h('button', { type: 'submit' }, 'Profile'));
  return [form, message];
}

function deviceCard(device, predictors, refresh) {
  const s = device.spec;
  const cpu = device.fingerprint ? (device.fingerprint.cpu_model || device.fingerprint.cpu || '') : 'not profiled yet';
  return h('div', { class: 'card', 'data-device': device.name },
    h('h2', {}, `${device.name} `, h('span', { class: 'muted small' }, `#${device.id} · queue ${device.queue}`)),
    h('p', { class: 'small' }, `${s.runtime ?? '–'} / ${s.provider ?? '–'} · ${s.threads ?? '–'} thread(s) · `,
      `batch ${s.batch ?? '–'} · ${s.precision ?? '–'} · resolutions ${(s.resolutions || []).join(', ') || '–'} · `,
      `channel multiple ${s.channel_multiple ?? 1}`,
      ` · budget ${fmt.ms(device.latency_budget_ms)} · ${cpu}`),
    h('h3', {}, 'Predictors'), predictorsTable(predictors), h('h3', {}, 'Profile'), profileForm(device, refresh));
}

function registerForm(onDone) {
  const message = h('div');
  const num = (name, value, attrs = {}) => h('input', { id: `d-${name}`, name, type: 'number', value, ...attrs });
  const form = h('form', { id: 'register-device', onsubmit: async (event) => {
    event.preventDefault();
    const e = form.elements;
    const body = { name: e.namedItem('name').value.trim(), runtime: e.runtime.value, provider: e.provider.value.trim(),
                   threads: Number(e.threads.value), batch: Number(e.batch.value), precision: e.precision.value,
                   resolutions: e.resolutions.value.split(',').map((v) => v.trim()).filter(Boolean).map(Number),
                   channel_multiple: Number(e.channel_multiple.value) };
    if (e.latency_budget_ms.value) body.latency_budget_ms = Number(e.latency_budget_ms.value);
    try {
      await api('/v1/devices', { method: 'POST', body });
      form.reset();
      mount(message);
      onDone();
    } catch (error) { mount(message, errorBox(error)); }
  } },
  h('div', { class: 'row' },
    field('name', h('input', { id: 'd-name', name: 'name', required: true, placeholder: 'laptop-cpu' })),
    field('runtime', h('select', { id: 'd-runtime', name: 'runtime' }, ['onnxruntime', 'torch'].map((r) => h('option', {}, r)))),
    field('provider', h('input', { id: 'd-provider', name: 'provider', value: 'cpu' })),
    field('threads', num('threads', '1')), field('batch', num('batch', '1')),
    field('precision', h('select', { id: 'd-precision', name: 'precision' }, ['fp32', 'fp16'].map((p) => h('option', {}, p)))),
    field('resolutions', h('input', { id: 'd-resolutions', name: 'resolutions', placeholder: '32, 64' })),
    field('channel multiple', num('channel_multiple', '1')),
    field('default budget (ms)', num('latency_budget_ms', '', { step: 'any' }))),
  h('button', { class: 'primary', type: 'submit' }, 'Register'), message);
  return h('div', { class: 'card' }, h('h2', {}, 'Register a device'), form);
}

export function devicesView(view) {
  const stopped = new AbortController();
  const list = h('div', { id: 'devices' });
  let timer = null;
  async function refresh() {
    clearTimeout(timer);
    try {
      const devices = await api('/v1/devices');
      const predictors = await Promise.all(devices.map((d) => api(`/v1/devices/${d.id}/predictors`)));
      if (stopped.signal.aborted) return;
      mount(list, devices.length ? devices.map((d, i) => deviceCard(d, predictors[i], refresh))
                                 : h('p', { class: 'muted', id: 'no-devices' }, 'No devices yet.'));
      // Only poll while something is being profiled; a poll would also wipe what is being typed in a form.
      if (predictors.flat().some((p) => p.state === 'queued' || p.state === 'running')) {
        timer = setTimeout(refresh, REFRESH_MS);
      }
    } catch (error) {
      if (!stopped.signal.aborted) mount(list, errorBox(error));
    }
  }
  mount(view, h('h1', {}, 'Devices'), list, registerForm(refresh));
  refresh();
  return () => { stopped.abort(); clearTimeout(timer); };
}
