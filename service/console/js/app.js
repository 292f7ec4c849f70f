// The console's shell: sign-in, navigation, and a hash router (#/jobs, #/jobs/7, #/jobs/7/cohort, #/submit,
// #/devices). Each view returns a clean-up function, called when the view is left (streams, timers).

import { api, auth, ApiError } from './api.js';
import { h, mount, errorBox } from './ui.js';
import { jobsView } from './jobs.js';
import { jobView } from './job.js';
import { submitView } from './submit.js';
import { devicesView } from './devices.js';
import { cohortView } from './cohort.js';

const ROUTES = [
  [/^#\/jobs\/?$/, 'jobs', jobsView],
  [/^#\/jobs\/(\d+)\/?$/, 'jobs', jobView],
  [/^#\/jobs\/(\d+)\/cohort\/?$/, 'jobs', cohortView],
  [/^#\/submit\/?$/, 'submit', submitView],
  [/^#\/devices\/?$/, 'devices', devicesView],
];

let leave = null;
let notice = '';

function signInView(view) {
  const input = h('input', { id: 'api-key', name: 'key', type: 'password', autocomplete: 'off', required: true,
                             placeholder: 'lp_…' });
  const message = h('div');
  const form = h('form', { class: 'card signin', onsubmit: async (event) => {
    event.preventDefault();
    auth.set(input.value.trim());
    try {
      await api('/v1/devices');  // any tenant-scoped call checks the key
      notice = '';
      location.hash = sessionStorage.getItem('latprune.next') || '#/jobs';
      sessionStorage.removeItem('latprune.next');
      route();
    } catch (error) {
      auth.clear();
      mount(message, errorBox(error instanceof ApiError ? error : `cannot reach the API: ${error.message}`));
    }
  } },
  h('h1', {}, 'Sign in'),
  h('p', { class: 'muted' }, 'Paste an API key (', h('code', {}, 'latprune up'), ' prints the admin key once; ',
    h('code', {}, 'latprune admin create-key --tenant NAME'), ' makes more). It stays in this browser tab only.'),
  notice ? h('div', { class: 'notice' }, notice) : null,
  h('div', { class: 'field' }, h('label', { for: 'api-key' }, 'API key'), input),
  h('button', { class: 'primary', type: 'submit', id: 'sign-in' }, 'Sign in'), message);
  mount(view, form);
  input.focus();
}

function route() {
  if (leave) { try { leave(); } catch { /* a view's clean-up must not block the next view */ } }
  leave = null;
  const view = document.getElementById('view');
  const nav = document.getElementById('nav');
  if (!auth.key) {
    nav.hidden = true;
    if (location.hash && location.hash !== '#/signin') sessionStorage.setItem('latprune.next', location.hash);
    signInView(view);
    return;
  }
  nav.hidden = false;
  const hash = location.hash || '#/jobs';
  for (const [pattern, section, render] of ROUTES) {
    const match = pattern.exec(hash);
    if (!match) continue;
    for (const link of nav.querySelectorAll('[data-nav]')) link.classList.toggle('active', link.dataset.nav === section);
    mount(view, h('p', { class: 'muted' }, 'Loading…'));
    leave = render(view, ...match.slice(1)) || null;
    return;
  }
  location.hash = '#/jobs';
}

window.addEventListener('hashchange', route);
window.addEventListener('latprune:signed-out', (event) => {
  notice = `Signed out: ${event.detail}`;
  route();
});
document.getElementById('signout').addEventListener('click', () => {
  auth.clear();
  notice = '';
  location.hash = '#/signin';
  route();
});
route();
