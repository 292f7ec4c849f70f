// Jobs: the tenant's jobs, newest first, refreshed every 2 s, filtered by state, 50 a page.

import { api } from './api.js';
import { h, mount, fmt, stateBadge, progressBar, errorBox, table } from './ui.js';

const STATES = ['', 'queued', 'running', 'succeeded', 'failed', 'cancelled'];
const PAGE = 50;
const REFRESH_MS = 2000;

const COLUMNS = [
  { title: 'id', num: true, cell: (j) => h('a', { href: `#/jobs/${j.id}` }, j.id) },
  { title: 'state', cell: (j) => stateBadge(j.state) },
  { title: 'method', cell: (j) => j.method },
  { title: 'arch', cell: (j) => j.arch },
  { title: 'budget', cell: (j) => fmt.budget(j.budget) },
  { title: 'progress', cell: (j) => h('span', {}, progressBar(j.progress), ' ',
                                      h('span', { class: 'small muted' }, `${Math.round(100 * j.progress)}%`)) },
  { title: 'stage', cell: (j) => j.stage || '–' },
  { title: 'started', cell: (j) => fmt.time(j.started_at) },
  { title: 'finished', cell: (j) => fmt.time(j.finished_at) },
];

export function jobsView(view) {
  const stopped = new AbortController();
  const params = new URLSearchParams(sessionStorage.getItem('latprune.jobsFilter') || '');
  let state = params.get('state') || '';
  let offset = 0;
  let timer = null;
  const select = h('select', { id: 'state-filter', name: 'state', onchange: () => {
    state = select.value;
    offset = 0;
    sessionStorage.setItem('latprune.jobsFilter', state ? `state=${state}` : '');
    refresh();
  } }, STATES.map((s) => h('option', { value: s, selected: s === state }, s || 'all states')));
  const body = h('div', { id: 'jobs' });
  const pager = h('div', { class: 'row small' });
  mount(view, h('div', { class: 'row' }, h('h1', {}, 'Jobs'), h('span', { class: 'muted' }, 'live'),
                h('a', { class: 'button', href: '#/submit', style: null }, 'Submit a job')),
        h('div', { class: 'field' }, h('label', { for: 'state-filter' }, 'state'), select), body, pager);

  async function refresh() {
    clearTimeout(timer);
    if (document.hidden) {  // a background tab costs the API nothing; it catches up when shown again
      timer = setTimeout(refresh, REFRESH_MS);
      return;
    }
    const query = new URLSearchParams({ limit: PAGE, offset });
    if (state) query.set('state', state);
    try {
      const page = await api(`/v1/jobs?${query}`);
      if (stopped.signal.aborted) return;
      mount(body, page.items.length
        ? table(COLUMNS, page.items, { onRow: (j) => { location.hash = `#/jobs/${j.id}`; },
                                       rowAttrs: (j) => ({ 'data-job': j.id }) })
        : h('p', { class: 'muted', id: 'no-jobs' }, state ? `No ${state} jobs.` : 'No jobs yet.'));
      mount(pager,
        h('span', { class: 'muted' }, page.total ? `${offset + 1}–${offset + page.items.length} of ${page.total}` : ''),
        offset > 0 ? h('button', { onclick: () => { offset = Math.max(0, offset - PAGE); refresh(); } }, 'newer') : null,
        offset + PAGE < page.total ? h('button', { onclick: () => { offset += PAGE; refresh(); } }, 'older') : null);
    } catch (error) {
      if (stopped.signal.aborted) return;
      mount(body, errorBox(error));
    }
    if (!stopped.signal.aborted) timer = setTimeout(refresh, REFRESH_MS);
  }
  refresh();
  return () => { stopped.abort(); clearTimeout(timer); };
}
