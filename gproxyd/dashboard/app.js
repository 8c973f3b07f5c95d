// gproxyd's dashboard: polls the admin endpoint and draws each route's production and
// shadows side by side. Charts are inline SVG drawn here; no library, nothing fetched
// from elsewhere. Text that comes from proxied traffic (request lines, bodies, paths,
// addresses) only ever goes into the page as textContent or an attribute value, never
// as markup.
"use strict";

const POLL_MS = 1000;            // summary and new history points
const MISMATCHES_EVERY = 5;      // polls between two readings of /mismatches
const RECENT_MISMATCHES = 5;     // differing exchanges shown per route
const SVG = "http://www.w3.org/2000/svg";
const WIDTH = 560, HEIGHT = 190, LEFT = 52, RIGHT = 10, TOP = 10, BOTTOM = 24;
const COLOURS = ["#1f6feb", "#d9480f", "#2b8a3e", "#9c36b5", "#e67700", "#0b7285",
                 "#c2255c", "#5c940d"];

const state = {
  window: 300,          // seconds shown
  routes: {},           // route -> backend -> {role, points: [...]} (oldest first)
  summary: null,        // /dashboard/summary.json: the /stats document and verdicts
  mismatches: [],       // /mismatches, newest first
  polls: 0,
  busy: false,
};

function element(tag, attributes, ...children) {
  const made = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes || {})) made.setAttribute(name, value);
  for (const child of children) {
    made.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return made;
}

function svgElement(tag, attributes) {
  const made = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes || {})) made.setAttribute(name, value);
  return made;
}

async function getJSON(path) {
  const response = await fetch(path, {cache: "no-store", credentials: "same-origin"});
  if (!response.ok) throw new Error(`${path}: ${response.status} ${response.statusText}`);
  return response.json();
}

function step() { return state.window > 900 ? 10 : 1; }

// --- reading ---------------------------------------------------------------------------

async function poll() {
  if (state.busy) return;
  state.busy = true;
  const shown = state.window;
  try {
    const summary = await getJSON("dashboard/summary.json");
    const newest = newestPoint();
    // The whole window at first, then what is new since the newest point held.
    const since = newest === null ? state.window
      : Math.min(state.window, Math.max(step() * 3, summary.time - newest + step() * 2));
    const history = await getJSON(`stats/history?since=${since}&step=${step()}`);
    if (state.polls % MISMATCHES_EVERY === 0) {
      state.mismatches = (await getJSON(`mismatches?limit=${RECENT_MISMATCHES * 20}`))
        .mismatches || [];
    }
    if (state.window !== shown) return;  // changed meanwhile: the next poll reads it whole
    state.summary = summary;
    merge(history);
    state.polls += 1;
    render();
    setStatus("live", `updated ${clock(summary.time)}`);
  } catch (error) {
    setStatus("error", `cannot read the admin endpoint: ${error.message}`);
  } finally {
    state.busy = false;
  }
}

function newestPoint() {
  let newest = null;
  for (const backends of Object.values(state.routes)) {
    for (const kept of Object.values(backends)) {
      const last = kept.points[kept.points.length - 1];
      if (last && (newest === null || last.time > newest)) newest = last.time;
    }
  }
  return newest;
}

function merge(history) {
  const earliest = history.time - state.window;
  const routes = {};
  for (const [route, backends] of Object.entries(history.routes)) {
    routes[route] = {};
    for (const [backend, fresh] of Object.entries(backends)) {
      const kept = (state.routes[route] || {})[backend];
      const points = kept ? kept.points : [];
      const last = points.length ? points[points.length - 1].time : -Infinity;
      for (const point of fresh.points) if (point.time > last) points.push(point);
      while (points.length && points[0].time <= earliest) points.shift();
      routes[route][backend] = {role: fresh.role, points};
    }
  }
  state.routes = routes;  // routes and backends the daemon no longer has are gone
}

function setStatus(kind, text) {
  const status = document.getElementById("status");
  status.dataset.state = kind;
  status.textContent = text;
}

// --- drawing ---------------------------------------------------------------------------

function render() {
  const summary = state.summary;
  document.getElementById("version").textContent = `version ${summary.version}`;
  const main = document.getElementById("routes");
  const names = Object.keys(summary.routes);
  for (const section of [...main.children]) {
    if (!names.includes(section.dataset.route)) section.remove();
  }
  for (const name of names) {
    let section = [...main.children].find((node) => node.dataset.route === name);
    if (!section) {
      section = element("section", {class: "route", "data-route": name});
      main.append(section);
    }
    section.replaceChildren(...routeView(name, summary.routes[name],
                                         state.routes[name] || {}));
  }
  if (!names.length) main.replaceChildren(element("p", {class: "quiet"}, "no routes"));
}

function backendsOf(snapshot) {
  // production first, then the shadows in the order /stats lists them
  return [["production", snapshot.production, "production"],
          ...Object.entries(snapshot.shadows).map(([name, numbers]) =>
            [name, numbers, numbers.role || "candidate"])];
}

function colourOf(index) { return COLOURS[index % COLOURS.length]; }

function routeView(name, snapshot, history) {
  const connections = snapshot.connections;
  const heading = element("h2", {}, `route ${name} `,
    element("small", {}, `${connections.active} active, ${connections.total} connections`));
  const backends = backendsOf(snapshot);
  return [heading, numbersTable(backends, history), verdicts(snapshot),
          charts(name, backends, history), differences(name, snapshot)];
}

function lastRate(kept) {
  const point = kept && kept.points[kept.points.length - 1];
  return point && point.seconds > 0 ? point.requests / point.seconds : null;
}

function numbersTable(backends, history) {
  const head = element("tr", {}, ...["backend", "role", "req/s", "requests", "errors",
    "p50 ms", "p99 ms", "dropped", "mismatches", "differ"].map((text) => element("th", {}, text)));
  const rows = backends.map(([backend, numbers, role], index) => {
    const rate = lastRate(history[backend]);
    const compared = numbers.compared || 0;
    const cells = {
      requests: numbers.requests, errors: numbers.errors,
      p50: numbers.latency_ms.p50.toFixed(2), p99: numbers.latency_ms.p99.toFixed(2),
      dropped: role === "production" ? "-" : numbers.dropped,
      mismatches: role === "production" ? "-" : numbers.mismatches,
      differ: role === "production" || !compared ? "-"
        : `${(100 * numbers.mismatches / compared).toFixed(2)}%`,
    };
    return element("tr", {"data-backend": backend},
      element("td", {class: "backend"},
        element("span", {class: "swatch", "data-colour": colourOf(index)}), backend),
      element("td", {}, role),
      element("td", {"data-field": "rate"}, rate === null ? "-" : rate.toFixed(1)),
      ...Object.entries(cells).map(([field, value]) =>
        element("td", {"data-field": field}, value)));
  });
  const table = element("table", {class: "numbers"}, element("thead", {}, head),
                        element("tbody", {}, ...rows));
  // A colour set from data, not from markup: the page's policy allows no inline styles.
  for (const swatch of table.querySelectorAll(".swatch")) {
    swatch.style.background = swatch.dataset.colour;
  }
  return table;
}

function verdicts(snapshot) {
  const items = Object.entries(snapshot.shadows).map(([name, shadow]) =>
    element("li", {class: "verdict", "data-backend": name},
            element("code", {}, name), `: ${shadow.verdict || ""}`));
  return items.length ? element("ul", {class: "verdicts"}, ...items)
    : element("p", {class: "quiet"}, "no shadows");
}

function charts(route, backends, history) {
  const perSecond = (field) => (point) =>
    point.seconds > 0 ? point[field] / point.seconds : null;
  const answered = (field) => (point) => point.requests > 0 ? point[field] : null;
  const rate = [], latency = [], failures = [], differing = [];
  backends.forEach(([backend, , role], index) => {
    const points = (history[backend] || {}).points || [];
    const colour = colourOf(index);
    rate.push(series(backend, "rate", colour, "", points, perSecond("requests")));
    latency.push(series(backend, "p99", colour, "", points, answered("p99_ms")));
    latency.push(series(backend, "p50", colour, "5 4", points, answered("p50_ms")));
    failures.push(series(backend, "errors", colour, "", points, perSecond("errors")));
    if (role !== "production") {
      failures.push(series(backend, "dropped", colour, "2 3", points, perSecond("dropped")));
      differing.push(series(backend, "mismatch_rate", colour, "", points, (point) =>
        point.compared > 0 ? 100 * point.mismatches / point.compared : null));
    }
  });
  const figures = [
    figure(route, "rate", "Requests per second", rate, ""),
    figure(route, "latency", "Latency per interval (ms): p99 solid, p50 dashed", latency,
           " ms"),
    figure(route, "failures", "Errors per second (solid), shadow drops per second (dotted)",
           failures, ""),
  ];
  if (differing.length) {
    figures.push(figure(route, "mismatches", "Answers that differ from production's (%)",
                        differing, "%"));
  }
  return element("div", {class: "charts"}, ...figures);
}

function series(backend, metric, colour, dash, points, value) {
  return {backend, metric, colour, dash,
          points: points.map((point) => [point.time, value(point)])};
}

function figure(route, name, caption, lines, unit) {
  const svg = lineChart(lines, unit);
  svg.setAttribute("data-chart", name);
  svg.setAttribute("data-route", route);
  return element("figure", {}, element("figcaption", {}, caption), svg);
}

function lineChart(lines, unit) {
  const svg = svgElement("svg", {class: "chart", viewBox: `0 0 ${WIDTH} ${HEIGHT}`,
                                 role: "img"});
  const now = state.summary.time;
  // The window, or less while the history is younger than it: the chart fills its width.
  const oldest = Math.min(...lines.flatMap((line) => line.points.slice(0, 1).map(([t]) => t)));
  const start = Math.max(now - state.window, Math.min(oldest - step(), now - 10 * step()));
  const values = lines.flatMap((line) => line.points.map(([, v]) => v))
    .filter((v) => v !== null);
  const top = niceTop(values.length ? Math.max(...values) : 0);
  const x = (t) => LEFT + (WIDTH - LEFT - RIGHT) * (t - start) / (now - start);
  const y = (v) => TOP + (HEIGHT - TOP - BOTTOM) * (1 - v / top);
  for (let tick = 0; tick <= 4; tick += 1) {
    const value = top * tick / 4;
    svg.append(svgElement("line", {class: tick ? "grid" : "axis", x1: LEFT, x2: WIDTH - RIGHT,
                                   y1: y(value), y2: y(value)}));
    const label = svgElement("text", {x: LEFT - 4, y: y(value) + 4, "text-anchor": "end"});
    label.textContent = `${formatNumber(value)}${unit}`;
    svg.append(label);
  }
  for (const [t, anchor] of [[start, "start"], [now, "end"]]) {
    const label = svgElement("text", {x: x(t), y: HEIGHT - 6, "text-anchor": anchor});
    label.textContent = clock(t);
    svg.append(label);
  }
  if (!values.length) {
    const empty = svgElement("text", {class: "empty", x: WIDTH / 2, y: HEIGHT / 2,
                                      "text-anchor": "middle"});
    empty.textContent = "no data in this window yet";
    svg.append(empty);
  }
  for (const line of lines) {
    // A gap (no value: nothing answered in that interval) breaks the line.
    let d = "", drawing = false;
    for (const [t, v] of line.points) {
      if (v === null) { drawing = false; continue; }
      d += `${drawing ? "L" : "M"}${x(t).toFixed(1)} ${y(v).toFixed(1)}`;
      drawing = true;
    }
    const path = svgElement("path", {
      class: "line", d: d || "M0 0", stroke: line.colour,
      "data-backend": line.backend, "data-metric": line.metric,
      "data-times": line.points.map(([t]) => t.toFixed(3)).join(" "),
      "data-values": line.points.map(([, v]) => (v === null ? "-" : +v.toFixed(3))).join(" "),
    });
    if (line.dash) path.setAttribute("stroke-dasharray", line.dash);
    if (!d) path.setAttribute("visibility", "hidden");
    const title = svgElement("title");
    title.textContent = `${line.backend} ${line.metric}`;
    path.append(title);
    svg.append(path);
  }
  return svg;
}

function niceTop(largest) {
  if (!(largest > 0)) return 1;
  const power = 10 ** Math.floor(Math.log10(largest));
  for (const factor of [1, 2, 2.5, 5, 10]) {
    if (largest <= factor * power) return factor * power;
  }
  return 10 * power;
}

function formatNumber(value) {
  if (value >= 1000) return `${+(value / 1000).toFixed(1)}k`;
  return `${+value.toFixed(value < 10 ? 2 : 1)}`;
}

function clock(seconds) {
  return new Date(seconds * 1000).toTimeString().slice(0, 8);
}

function differences(route, snapshot) {
  const paths = element("div", {class: "paths"}, element("h3", {}, "Top differing paths"));
  let any = false;
  for (const [name, shadow] of Object.entries(snapshot.shadows)) {
    const entries = Object.entries(shadow.mismatch_paths || {});
    if (!entries.length) continue;
    any = true;
    paths.append(element("p", {}, element("code", {}, name)),
      element("ol", {"data-backend": name}, ...entries.map(([path, count]) =>
        element("li", {}, element("code", {}, path), ` ${count}`))));
  }
  if (!any) paths.append(element("p", {class: "quiet"}, "none"));
  const recent = element("div", {class: "recent"},
                         element("h3", {}, "Recent differing answers"));
  const samples = state.mismatches.filter((sample) => sample.route === route)
    .slice(0, RECENT_MISMATCHES);
  for (const sample of samples) {
    const lines = [element("div", {},
      `${clock(sample.time)} shadow `, element("code", {}, sample.shadow), ": ",
      element("code", {class: "request"}, sample.request))];
    lines.push(element("div", {class: "quiet"},
                       `differs at: ${(sample.paths || []).join(", ")}`));
    for (const side of ["production", "candidate"]) {
      const answer = sample[side] || {};
      const shown = "body" in answer ? answer.body : `hash ${answer.hash}`;
      lines.push(element("pre", {class: side},
                         `${side}: ${answer.status ?? ""} ${shown ?? ""}`));
    }
    recent.append(element("div", {class: "mismatch"}, ...lines));
  }
  if (!samples.length) recent.append(element("p", {class: "quiet"}, "none kept"));
  return element("div", {class: "differences"}, paths, recent);
}

// --- start -----------------------------------------------------------------------------

document.getElementById("window").addEventListener("change", (event) => {
  state.window = Number(event.target.value);
  state.routes = {};  // another window (and perhaps another step): read it whole
  poll();
});
poll();
setInterval(poll, POLL_MS);
