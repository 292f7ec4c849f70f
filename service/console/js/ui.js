// Small DOM and formatting helpers shared by the pages (no framework: the pages are a few tables and forms).

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith('on')) el.addEventListener(name.slice(2), value);
    else if (name === 'class') el.className = value;
    else if (name in el && typeof value !== 'string') el[name] = value;
    else el.setAttribute(name, value === true ? '' : value);
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
}

export function mount(target, ...children) {
  target.replaceChildren();
  append(target, children);
  return target;
}

export const fmt = {
  count(n) {
    if (n === null || n === undefined) return '–';
    const abs = Math.abs(n);
    if (abs >= 1e9) return `${(n / 1e9).toFixed(2)} G`;
    if (abs >= 1e6) return `${(n / 1e6).toFixed(2)} M`;
    if (abs >= 1e3) return `${(n / 1e3).toFixed(1)} k`;
    return String(n);
  },
  pct(x) { return x === null || x === undefined ? '–' : `${(100 * x).toFixed(2)}%`; },
  ms(x) { return x === null || x === undefined ? '–' : `${Number(x).toPrecision(3)} ms`; },
  num(x, digits = 3) { return x === null || x === undefined ? '–' : Number(x).toPrecision(digits); },
  time(iso) {
    if (!iso) return '–';
    const d = new Date(iso);
    return d.toLocaleString(undefined, { month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit',
                                         second: '2-digit' });
  },
  budget(b) {
    if (!b) return '–';
    if (b.kind === 'latency_ms') return `${b.value} ms @ device ${b.device_id}`;
    if (b.kind === 'macs') return `${fmt.count(b.value)} MACs`;
    return `${b.kind} ${(100 * b.value).toFixed(0)}%`;
  },
};

export function stateBadge(state) {
  return h('span', { class: `state ${state}`, 'data-state': state }, state);
}

export function progressBar(fraction, wide = false) {
  const inner = h('span');
  inner.style.width = `${Math.round(100 * Math.max(0, Math.min(1, fraction || 0)))}%`;
  return h('span', { class: `bar${wide ? ' wide' : ''}${fraction >= 1 ? ' done' : ''}`, role: 'progressbar',
                     'aria-valuenow': Math.round(100 * (fraction || 0)) }, inner);
}

export function errorBox(error) {
  return h('div', { class: 'error', role: 'alert' }, error instanceof Error ? error.message : String(error));
}

export function table(columns, rows, { onRow, rowAttrs } = {}) {
  const head = h('tr', {}, columns.map((c) => h('th', { class: c.num ? 'num' : '' }, c.title)));
  const body = rows.map((row) => h('tr', {
    class: onRow ? 'clickable' : '', onclick: onRow ? () => onRow(row) : null, ...(rowAttrs ? rowAttrs(row) : {}),
  }, columns.map((c) => h('td', { class: c.num ? 'num' : '' }, c.cell(row)))));
  return h('table', {}, h('thead', {}, head), h('tbody', {}, body));
}

export function field(label, input, hint) {
  return h('div', { class: 'field', 'data-field': input.name || '' }, h('label', { for: input.id }, label), input,
           hint ? h('div', { class: 'hint' }, hint) : null, h('div', { class: 'field-error', role: 'alert' }));
}
