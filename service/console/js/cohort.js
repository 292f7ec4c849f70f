// A job's cohort: accuracy vs latency of every member, one plot per device (and one on MACs), the Pareto front
// joined; hover a member for its widths, resolution, MACs, accuracy and latency; click it to download it.

import { api } from './api.js';
import { h, mount, fmt, errorBox } from './ui.js';
import { scatter } from './plot.js';
import { downloadButtons } from './job.js';

function latencyOn(member, key) {
  const l = member.latency[key];
  if (!l) return null;
  return l.measured_ms ?? l.predicted_ms ?? null;
}

function widthsText(widths, limit = 14) {
  const entries = Object.entries(widths || {});
  const shown = entries.slice(0, limit).map(([k, v]) => `${k} ${Array.isArray(v) ? v.join('/') : v}`);
  return entries.length > limit ? `${shown.join(', ')}, … (${entries.length} layers)` : shown.join(', ');
}

function tip(member, key, deviceName) {
  const lines = [`member ${member.member} @ ${member.resolution} px`, `accuracy ${fmt.pct(member.accuracy)}`,
                 `MACs ${fmt.count(member.macs)} · params ${fmt.count(member.params)}`];
  if (key !== 'macs') {
    const l = member.latency[key];
    lines.push(`${deviceName}: measured ${fmt.ms(l.measured_ms)}, predicted ${fmt.ms(l.predicted_ms)}`);
  }
  lines.push(`widths: ${widthsText(member.widths)}`);
  return lines.join('\n');
}

function panel(members, key, deviceName, selected, onClick) {
  const usable = members.filter((m) => m.accuracy !== null && (key === 'macs' || latencyOn(m, key) !== null));
  const points = usable.map((m) => ({
    x: key === 'macs' ? m.macs / 1e6 : latencyOn(m, key), y: 100 * m.accuracy, key: m.member,
    front: m.pareto_front.includes(key), tip: tip(m, key, deviceName),
  }));
  const title = key === 'macs' ? 'accuracy vs MACs' : `${deviceName} (device ${key})`;
  const svg = scatter(points, { title, xLabel: key === 'macs' ? 'MACs (millions)' : 'latency (ms)',
                                yLabel: 'accuracy (%)', selected, onClick: (p) => onClick(p.key),
                                fx: (v) => v.toPrecision(3), fy: (v) => v.toFixed(1),
                                empty: 'no member has an accuracy and a latency here' });
  return h('div', { 'data-plot': key }, svg);
}

function details(job, member, result) {
  if (!member) return h('p', { class: 'muted' }, 'Click a point to pick a member and download it.');
  return h('div', { class: 'card', id: 'member-details', 'data-member': member.member },
    h('h2', {}, `Member ${member.member}`),
    h('dl', { class: 'kv' }, h('dt', {}, 'resolution'), h('dd', {}, `${member.resolution} px`),
      h('dt', {}, 'accuracy'), h('dd', {}, fmt.pct(member.accuracy)), h('dt', {}, 'MACs'), h('dd', {}, fmt.count(member.macs)),
      h('dt', {}, 'params'), h('dd', {}, fmt.count(member.params)),
      h('dt', {}, 'on the fronts of'), h('dd', {}, member.pareto_front.join(', ') || 'none'),
      h('dt', {}, 'widths'), h('dd', { class: 'small' }, widthsText(member.widths, 1000))),
    h('p', {}, 'Download: ', downloadButtons(() => `/v1/jobs/${job.id}/subnets/${member.member}/checkpoint`,
                                             `member-${member.member}`, result)), result);
}

export function cohortView(view, id) {
  const stopped = new AbortController();
  Promise.all([api(`/v1/jobs/${id}`), api(`/v1/jobs/${id}/subnets`), api('/v1/devices')])
    .then(([job, members, devices]) => {
      if (stopped.signal.aborted) return;
      const names = Object.fromEntries(devices.map((d) => [String(d.id), d.name]));
      const keys = [...new Set(members.flatMap((m) => Object.keys(m.latency)))].filter((k) => k in names)
        .sort((a, b) => Number(a) - Number(b));
      const plots = h('div', { class: 'plots', id: 'cohort-plots' });
      const result = h('div', { id: 'download-status' });
      const side = h('div');
      let selected = null;
      const paint = () => {
        mount(plots, [...keys, 'macs'].map((k) => panel(members, k, names[k], selected, pick)));
        mount(side, details(job, members.find((m) => m.member === selected), result));
      };
      const pick = (member) => { selected = member; paint(); };
      mount(view, h('div', { class: 'row' }, h('h1', {}, `Job ${id}: cohort`),
                    h('a', { href: `#/jobs/${id}` }, 'back to the job')),
        h('p', { class: 'muted' }, `${job.method} ${job.arch} on ${job.dataset} · ${members.length} members · `,
          'blue: the accuracy/latency Pareto front; hover a point for the member, click it to download'),
        members.length ? plots : h('p', { class: 'muted' }, `No members yet (job ${job.state}).`), side);
      paint();
    })
    .catch((error) => { if (!stopped.signal.aborted) mount(view, h('h1', {}, `Job ${id}: cohort`), errorBox(error)); });
  return () => stopped.abort();
}
