// Submit: a form built from GET /v1/methods (each method's params JSON schema), the budget kinds, and the tenant's
// devices. The API validates; its 422s are shown on the fields they name.

import { api, ApiError, randomId } from './api.js';
import { h, mount, field, errorBox } from './ui.js';

const ARCHS = ['resnet20', 'resnet32', 'resnet56', 'resnet110', 'vgg16_bn', 'resnet18', 'mobilenet_v2'];
const DATASETS = ['builtin:digits', 'synthetic:10x32', 'synthetic:4x16', 'imagefolder:', 'torchvision:CIFAR10'];
const KINDS = [['flops', 'flops: fraction of the dense MACs'], ['params', 'params: fraction of the dense parameters'],
               ['macs', 'macs: absolute multiply-accumulates'], ['latency_ms', 'latency_ms: milliseconds on a device']];
// Plain string errors name their field in words; these route them to it.
const WORDS = [[/architecture|\barch\b/i, 'arch'], [/dataset|data root/i, 'dataset'], [/method/i, 'method'],
               [/\bmodel\b/i, 'model_id'], [/device/i, 'budget.device_id'], [/budget/i, 'budget.value']];

function input(name, attrs = {}) {
  return h('input', { id: `f-${name}`, name, ...attrs });
}

// The schema of one param, with Optional[...] (anyOf with null) unwrapped.
function plain(schema) {
  if (schema.anyOf) return { ...schema, ...(schema.anyOf.find((s) => s.type !== 'null') || {}), optional: true };
  return schema;
}

function paramInput(name, raw) {
  const schema = plain(raw);
  const id = `params.${name}`;
  if (schema.enum) {
    return h('select', { id: `f-${id}`, name: id }, h('option', { value: '' }, `default (${schema.default ?? 'none'})`),
             schema.enum.map((v) => h('option', { value: v }, v)));
  }
  if (schema.type === 'boolean') return input(id, { type: 'checkbox', checked: Boolean(schema.default) });
  if (schema.type === 'integer' || schema.type === 'number') {
    return input(id, { type: 'number', step: schema.type === 'integer' ? '1' : 'any', min: schema.minimum,
                       max: schema.maximum, placeholder: schema.default ?? '' });
  }
  const placeholder = schema.default === undefined ? '' : JSON.stringify(schema.default);
  return input(id, { type: 'text', placeholder, 'data-json': schema.type !== 'string' ? '1' : null });
}

function paramValue(el, schema) {
  if (el.type === 'checkbox') return el.checked;
  const text = el.value.trim();
  if (text === '') return undefined;
  if (el.type === 'number') return Number(text);
  if (el.dataset.json) {
    const list = plain(schema).type === 'array' && !text.startsWith('[') ? `[${text}]` : text;
    try { return JSON.parse(list); } catch { return text; }  // the API says what is wrong with it
  }
  return text;
}

function paramsFieldset(method) {
  const props = (method && method.params_schema.properties) || {};
  const names = Object.keys(props);
  return h('fieldset', { class: 'card', id: 'params', 'data-field': 'params' },
    h('legend', {}, `${method ? method.name : ''} parameters`),
    method ? h('p', { class: 'small muted' }, method.description) : null,
    names.length ? names.map((n) => field(props[n].title || n, paramInput(n, props[n]),
      `${props[n].description || ''}${props[n].default !== undefined ? ` (default ${JSON.stringify(props[n].default)})` : ''}`))
      : h('p', { class: 'muted' }, 'No parameters.'),
    h('div', { class: 'field-error', role: 'alert' }));
}

function clearErrors(form) {
  for (const el of form.querySelectorAll('.invalid')) el.classList.remove('invalid');
  for (const el of form.querySelectorAll('.field-error')) el.textContent = '';
}

function markField(form, path, message) {
  const parts = path.split('.');
  while (parts.length) {
    const target = form.querySelector(`[data-field="${parts.join('.')}"]`);
    if (target) {
      target.classList.add('invalid');
      const slot = target.querySelector(':scope > .field-error');
      slot.textContent = slot.textContent ? `${slot.textContent}\n${message}` : message;
      return true;
    }
    parts.pop();
  }
  return false;
}

function showErrors(form, summary, error) {
  clearErrors(form);
  const unplaced = [];
  if (error instanceof ApiError && Array.isArray(error.detail)) {
    for (const e of error.detail) {
      const path = (e.loc || []).filter((p) => p !== 'body').join('.');
      if (!markField(form, path, e.msg)) unplaced.push(`${path}: ${e.msg}`);
    }
  } else if (error instanceof ApiError && typeof error.detail === 'string') {
    const named = WORDS.find(([pattern]) => pattern.test(error.detail));
    if (!named || !markField(form, named[1], error.detail)) unplaced.push(error.detail);
  } else {
    unplaced.push(error.message || String(error));
  }
  mount(summary, unplaced.length ? errorBox(unplaced.join('\n'))
                                  : h('div', { class: 'error', role: 'alert' }, 'Fix the fields marked below.'));
}

function numberOrUndefined(form, name) {
  const text = form.elements[name].value.trim();
  return text === '' ? undefined : Number(text);
}

function body(form, method) {
  const props = (method && method.params_schema.properties) || {};
  const params = {};
  for (const [name, schema] of Object.entries(props)) {
    const value = paramValue(form.elements[`params.${name}`], schema);
    if (value !== undefined) params[name] = value;
  }
  const kind = form.elements['budget.kind'].value;
  const budget = { kind, value: numberOrUndefined(form, 'budget.value') };
  if (form.elements['budget.device_id'].value) budget.device_id = Number(form.elements['budget.device_id'].value);
  const out = { method: form.elements.method.value, arch: form.elements.arch.value.trim(),
                dataset: form.elements.dataset.value.trim(), budget, params };
  for (const name of ['model_id', 'epochs', 'finetune_epochs', 'resolution', 'seed', 'batch_size', 'lr']) {
    const value = numberOrUndefined(form, name);
    if (value !== undefined) out[name] = value;
  }
  return out;
}

function lists() {
  return [h('datalist', { id: 'archs' }, ARCHS.map((a) => h('option', { value: a }))),
          h('datalist', { id: 'datasets' }, DATASETS.map((d) => h('option', { value: d })))];
}

function form(methods, devices) {
  const byName = Object.fromEntries(methods.map((m) => [m.name, m]));
  let params = paramsFieldset(methods[0]);
  const method = h('select', { id: 'f-method', name: 'method', onchange: () => {
    const next = paramsFieldset(byName[method.value]);
    params.replaceWith(next);
    params = next;
  } }, methods.map((m) => h('option', { value: m.name }, m.name)));
  const device = h('select', { id: 'f-budget.device_id', name: 'budget.device_id' },
    h('option', { value: '' }, devices.length ? '(none)' : '(no devices registered)'),
    devices.map((d) => h('option', { value: d.id }, `${d.name} (#${d.id})`)));
  const num = (name, attrs = {}) => input(name, { type: 'number', step: 'any', ...attrs });
  return { method, byName, get params() { return params; }, nodes: [
    h('div', { class: 'card' }, h('div', { class: 'row' },
      field('method', method), field('architecture', input('arch', { list: 'archs', value: 'resnet20', required: true })),
      field('dataset', input('dataset', { list: 'datasets', value: 'builtin:digits', required: true }),
            'builtin:digits, synthetic:CxR, imagefolder:<path>, torchvision:<Name>'),
      field('dense weights (model id)', num('model_id', { step: '1', placeholder: 'train from scratch' })))),
    h('fieldset', { class: 'card', 'data-field': 'budget' }, h('legend', {}, 'budget'), h('div', { class: 'row' },
      field('kind', h('select', { id: 'f-budget.kind', name: 'budget.kind' }, KINDS.map(([k, t]) => h('option', { value: k }, t)))),
      field('value', num('budget.value', { value: '0.5', required: true })),
      field('device (latency_ms)', device)), h('div', { class: 'field-error', role: 'alert' })),
    h('div', { class: 'card' }, h('div', { class: 'row' },
      field('epochs', num('epochs', { step: '1', value: '1' })),
      field('fine-tune epochs', num('finetune_epochs', { step: '1', placeholder: 'same as epochs' })),
      field('resolution', num('resolution', { step: '1', placeholder: "dataset's" })),
      field('seed', num('seed', { step: '1', placeholder: '0' })),
      field('batch size', num('batch_size', { step: '1', placeholder: 'default' })),
      field('learning rate', num('lr', { placeholder: 'default' })))),
  ] };
}

export function submitView(view) {
  const stopped = new AbortController();
  Promise.all([api('/v1/methods'), api('/v1/devices')]).then(([methods, devices]) => {
    if (stopped.signal.aborted) return;
    const parts = form(methods, devices);
    const summary = h('div', { id: 'form-errors' });
    let idempotency = randomId();  // a double click submits one job
    const el = h('form', { id: 'submit-form', novalidate: true, onsubmit: async (event) => {
      event.preventDefault();
      const button = el.querySelector('button[type=submit]');
      button.disabled = true;
      try {
        const job = await api('/v1/jobs', { method: 'POST', body: body(el, parts.byName[parts.method.value]),
                                            extraHeaders: { 'Idempotency-Key': idempotency } });
        idempotency = randomId();
        location.hash = `#/jobs/${job.id}`;
      } catch (error) {
        showErrors(el, summary, error);
      } finally {
        button.disabled = false;
      }
    } }, summary, parts.nodes, parts.params, h('button', { class: 'primary', type: 'submit', id: 'submit' }, 'Submit'));
    mount(view, h('h1', {}, 'Submit a job'), lists(), el);
  }).catch((error) => { if (!stopped.signal.aborted) mount(view, h('h1', {}, 'Submit a job'), errorBox(error)); });
  return () => stopped.abort();
}
