// Scatter plots as inline SVG: points with hover tooltips and clicks, an optional connected front and y = x line.

const NS = 'http://www.w3.org/2000/svg';

function s(tag, attrs = {}, ...children) {
  const el = document.createElementNS(NS, tag);
  for (const [name, value] of Object.entries(attrs)) if (value !== undefined && value !== null) el.setAttribute(name, value);
  for (const child of children) if (child) el.append(child);
  return el;
}

// About `count` round tick values covering [lo, hi].
export function ticks(lo, hi, count = 5) {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((v) => v >= raw) || 10 * mag;
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(Number(v.toPrecision(10)));
  return out;
}

function extent(values, pad) {
  let lo = Math.min(...values);
  let hi = Math.max(...values);
  if (lo === hi) { lo -= Math.abs(lo) * 0.1 || 1; hi += Math.abs(hi) * 0.1 || 1; }
  const margin = (hi - lo) * pad;
  return [lo - margin, hi + margin];
}

let tooltip = null;

function showTip(event, text) {
  if (!tooltip) {
    tooltip = document.createElement('div');
    tooltip.className = 'tooltip';
    tooltip.setAttribute('role', 'tooltip');
    document.body.append(tooltip);
  }
  tooltip.textContent = text;
  tooltip.hidden = false;
  tooltip.style.left = `${event.clientX + 12}px`;
  tooltip.style.top = `${event.clientY + 12}px`;
}

function hideTip() { if (tooltip) tooltip.hidden = true; }

function axes(svg, x, y, xs, ys, box, labels) {
  const { left, top, right, bottom } = box;
  for (const v of ys) {
    svg.append(s('line', { class: 'grid', x1: left, x2: right, y1: y(v), y2: y(v) }));
    svg.append(s('text', { x: left - 6, y: y(v) + 4, 'text-anchor': 'end' }, document.createTextNode(labels.fy(v))));
  }
  for (const v of xs) {
    svg.append(s('line', { class: 'grid', y1: top, y2: bottom, x1: x(v), x2: x(v) }));
    svg.append(s('text', { x: x(v), y: bottom + 16, 'text-anchor': 'middle' }, document.createTextNode(labels.fx(v))));
  }
  svg.append(s('path', { class: 'axis', d: `M${left},${top}V${bottom}H${right}`, fill: 'none', stroke: '#98a2b3' }));
  svg.append(s('text', { class: 'label', x: (left + right) / 2, y: bottom + 34, 'text-anchor': 'middle' },
               document.createTextNode(labels.x)));
  svg.append(s('text', { class: 'label', transform: `translate(14 ${(top + bottom) / 2}) rotate(-90)`,
                         'text-anchor': 'middle' }, document.createTextNode(labels.y)));
}

/**
 * points: [{x, y, tip, front, key}]; options: {xLabel, yLabel, title, width, height, diagonal, fx, fy,
 * onClick(point), selected}. Returns the <svg> element.
 */
export function scatter(points, options = {}) {
  const width = options.width || 520;
  const height = options.height || 340;
  const box = { left: 58, top: options.title ? 28 : 12, right: width - 14, bottom: height - 44 };
  const svg = s('svg', { class: 'plot', width, height, viewBox: `0 0 ${width} ${height}`, role: 'img',
                         'aria-label': options.title || 'plot' });
  if (options.title) {
    svg.append(s('text', { class: 'label', x: box.left, y: 16 }, document.createTextNode(options.title)));
  }
  if (!points.length) {
    svg.append(s('text', { x: width / 2, y: height / 2, 'text-anchor': 'middle' },
                 document.createTextNode(options.empty || 'nothing to plot')));
    return svg;
  }
  let [x0, x1] = extent(points.map((p) => p.x), 0.08);
  let [y0, y1] = extent(points.map((p) => p.y), 0.08);
  if (options.diagonal) { x0 = y0 = Math.min(x0, y0); x1 = y1 = Math.max(x1, y1); }
  const x = (v) => box.left + ((v - x0) / (x1 - x0)) * (box.right - box.left);
  const y = (v) => box.bottom - ((v - y0) / (y1 - y0)) * (box.bottom - box.top);
  axes(svg, x, y, ticks(x0, x1), ticks(y0, y1), box, {
    x: options.xLabel || '', y: options.yLabel || '', fx: options.fx || ((v) => String(v)),
    fy: options.fy || ((v) => String(v)),
  });
  if (options.diagonal) svg.append(s('line', { class: 'diag', x1: x(x0), y1: y(y0), x2: x(x1), y2: y(y1) }));
  const front = points.filter((p) => p.front).sort((a, b) => a.x - b.x);
  if (front.length > 1) {
    svg.append(s('polyline', { class: 'front-line', points: front.map((p) => `${x(p.x)},${y(p.y)}`).join(' ') }));
  }
  for (const p of points) {
    const dot = s('circle', { cx: x(p.x), cy: y(p.y), r: p.front ? 5.5 : 4.5, tabindex: 0,
                              class: `pt${p.front ? ' front' : ''}${p.key === options.selected ? ' selected' : ''}`,
                              'data-key': p.key ?? '' });
    dot.addEventListener('mouseenter', (e) => showTip(e, p.tip || ''));
    dot.addEventListener('mousemove', (e) => showTip(e, p.tip || ''));
    dot.addEventListener('mouseleave', hideTip);
    dot.addEventListener('focus', () => {
      const r = dot.getBoundingClientRect();
      showTip({ clientX: r.right, clientY: r.bottom }, p.tip || '');
    });
    dot.addEventListener('blur', hideTip);
    if (options.onClick) dot.addEventListener('click', () => { hideTip(); options.onClick(p); });
    svg.append(dot);
  }
  return svg;
}

export { hideTip };
