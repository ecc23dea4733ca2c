// The web feature browser: plain JS against the JSON API, no build step.
// Views are chosen by the URL hash: #/ (feature list), #/f/DICT/ID (feature page),
// #/search/DICT/BY/Q, #/text (which features fire on your text), #/steer[/DICT/ID].
// All model text is inserted with textContent, never innerHTML.
"use strict";

const view = document.getElementById("view");
const statusLine = document.getElementById("status");
const dictSelect = document.getElementById("dict-select");
const keyInput = document.getElementById("api-key");
let dictionaries = [];

// `sae serve` prints a URL ending in #key=KEY: keep the key, drop it from the address bar.
if (location.hash.startsWith("#key=")) {
  localStorage.setItem("sae-api-key", decodeURIComponent(location.hash.slice(5)));
  history.replaceState(null, "", location.pathname + "#/");
}
keyInput.value = localStorage.getItem("sae-api-key") || "";
keyInput.addEventListener("change", () => localStorage.setItem("sae-api-key", keyInput.value));

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

function setStatus(text, isError = false) {
  statusLine.textContent = text;
  statusLine.className = isError ? "error" : "";
}

async function api(path, body) {
  const headers = { Accept: "application/json" };
  const init = { headers };
  if (body !== undefined) {
    init.method = "POST";
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  if (keyInput.value) headers.Authorization = "Bearer " + keyInput.value;
  const res = await fetch(path, init);
  const data = await res.json();
  if (!res.ok) {
    const err = data.error || { message: res.statusText };
    throw new Error(`${res.status} ${err.code || ""}: ${err.message}`);
  }
  return data;
}

function fmt(x) {
  if (x === null || x === undefined) return "–";
  if (Math.abs(x) >= 100 || x === 0) return String(Math.round(x * 100) / 100);
  return x.toPrecision(3);
}

// Tokens with a background whose opacity is the activation over `scale` (the max).
function tokenRow(tokens, values, scale, onClick) {
  const row = el("div", { class: "tokens" });
  tokens.forEach((t, i) => {
    const v = values[i] || 0;
    const a = scale > 0 ? Math.max(0, Math.min(1, v / scale)) : 0;
    // A newline shows as ↵ so each example stays on one line.
    const span = el("span", { class: "tok", text: t.replace(/\n/g, "↵"), title: `${JSON.stringify(t)}: ${fmt(v)}` });
    span.dataset.value = String(v);
    if (a > 0) span.style.background = `rgba(255, 120, 0, ${0.15 + 0.85 * a})`;
    if (onClick) span.addEventListener("click", () => onClick(i, span));
    row.append(span);
  });
  return row;
}

function featureLink(address, text) {
  const [d, id] = address.split("/");
  return el("a", { href: `#/f/${encodeURIComponent(d)}/${id}`, text: text || address });
}

function currentDict() {
  return dictSelect.value;
}

// -- views -----------------------------------------------------------------------------------

const ORDERS = { feature_id: "feature id", max_activation: "max activation ↓", frequency: "frequency ↓" };

// A dictionary opens on its live features, densest first; without analysis, in id order.
async function showList(dict, offset, order) {
  const info = dictionaries.find((d) => d.name === dict);
  if (!(order in ORDERS)) order = info && info.has_analysis ? "frequency" : "feature_id";
  const desc = order !== "feature_id";
  // Page sizes are the server's defaults (capped by its max_page); `page.limit` tells them.
  const page = await api(`/api/features/${encodeURIComponent(dict)}?offset=${offset}&order_by=${order}&descending=${desc}`);
  const href = (o, ord = order) => `#/d/${encodeURIComponent(dict)}/${o}/${ord}`;
  renderFeaturePage(`Features of ${dict}`, page, (o) => href(o));
  const select = el("select", { id: "order-by", "aria-label": "order by" },
    ...Object.entries(ORDERS).map(([k, v]) => el("option", { value: k, text: v })));
  select.value = order;
  select.addEventListener("change", () => { location.hash = href(0, select.value); });
  view.querySelector("h1").after(el("label", {}, "order by ", select));
  // The held-out figures saved with the dictionary: the line `sae info` prints.
  if (info && info.evaluation_summary) {
    const on = info.evaluation_source ? ` (on ${info.evaluation_source})` : "";
    view.querySelector("h1").after(el("p", { class: "evaluation", text: info.evaluation_summary + on }));
  }
}

// Density on a log scale, 1e-6 (a sliver) to 1 (full width), so rare features stay visible.
function densityBar(frequency) {
  const bar = el("span", { class: "density", title: frequency === null || frequency === undefined ? "no analysis" : `fires on ${fmt(100 * frequency)}% of tokens` });
  if (frequency > 0) {
    const fill = el("span", { class: "fill" });
    fill.style.width = `${Math.round(100 * Math.max(0.04, Math.min(1, (Math.log10(frequency) + 6) / 6)))}%`;
    bar.append(fill);
  }
  return bar;
}

function renderFeaturePage(title, page, hrefFor) {
  const table = el("table", { class: "feature-list" },
    el("thead", {}, el("tr", {}, ...["feature", "label", "max act", "frequency", "score"].map((h) => el("th", { text: h })))));
  const body = el("tbody");
  for (const f of page.items) {
    const dead = f.frequency === 0; // analysed, and never fired in the analysis
    body.append(el("tr", dead ? { class: "dead" } : {},
      el("td", {}, featureLink(f.address)),
      el("td", { text: f.label || "" }),
      el("td", { text: dead ? "never fired" : fmt(f.max_activation) }),
      el("td", { class: "frequency" }, densityBar(f.frequency), dead ? "never fired" : fmt(f.frequency)),
      el("td", { text: fmt(f.score) })));
  }
  table.append(body);
  const nav = el("p", { class: "pager" });
  if (page.offset > 0) nav.append(el("a", { href: hrefFor(Math.max(0, page.offset - page.limit)), text: "← previous" }), " ");
  if (page.offset + page.items.length < page.total) nav.append(el("a", { href: hrefFor(page.offset + page.limit), text: "next →" }));
  view.replaceChildren(el("h1", { text: title }), table, nav);
  if (!page.items.length) view.append(el("p", { class: "muted", text: "No features." }));
}

async function showFeature(dict, id) {
  const f = await api(`/api/features/${encodeURIComponent(dict)}/${id}`);
  const node = document.getElementById("tpl-feature").content.firstElementChild.cloneNode(true);
  node.querySelector(".addr").textContent = f.address;
  node.querySelector(".label-text").textContent = f.label || "(no label)";
  const stats = node.querySelector(".stats");
  const s = f.stats || {};
  for (const [k, v] of [["max activation", s.max_activation], ["mean activation", s.mean_activation],
    ["frequency", s.frequency], ["tokens firing", s.count]]) {
    stats.append(el("dt", { text: k }), el("dd", { text: fmt(v) }));
  }
  if (!f.stats) stats.append(el("dd", { class: "muted", text: "no analysis: run `sae analyze`" }));
  else if (!s.count) {
    stats.replaceChildren(el("dt", { text: "activity" }), el("dd", { class: "never-fired", text: "never fired in the analysis" }));
  }
  const hist = node.querySelector(".hist");
  if (f.histogram) {
    const top = Math.max(1, ...f.histogram.counts);
    f.histogram.counts.forEach((c, i) => {
      const bar = el("span", { class: "bar", title: `${fmt(f.histogram.bin_edges[i])}–${fmt(f.histogram.bin_edges[i + 1])}: ${c}` });
      bar.style.height = `${Math.round((100 * c) / top)}%`;
      hist.append(bar);
    });
  }
  const addEffects = (ul, list) => list.forEach((e) => ul.append(el("li", {}, el("code", { text: JSON.stringify(e.token) }), " ", el("span", { class: "muted", text: fmt(e.value) }))));
  addEffects(node.querySelector(".pos"), f.logit_effects.positive);
  addEffects(node.querySelector(".neg"), f.logit_effects.negative);
  const labels = node.querySelector(".labels");
  f.labels.forEach((l) => labels.append(el("li", { text: `${l.text} — ${l.author || "anonymous"}` })));

  const examples = node.querySelector(".examples");
  const more = node.querySelector(".more-examples");
  const scale = (f.stats && f.stats.max_activation) || Math.max(0, ...f.top_examples.items.map((e) => e.max_value));
  let shown = 0;
  const addExamples = (page) => {
    for (const ex of page.items) examples.append(el("div", { class: "example" }, el("span", { class: "muted act", text: fmt(ex.max_value) }), tokenRow(ex.tokens, ex.values, scale)));
    shown = page.offset + page.items.length;
    more.hidden = shown >= page.total;
  };
  addExamples(f.top_examples);
  if (!f.top_examples.total) examples.append(el("p", { class: "muted", text: "No stored examples." }));
  more.addEventListener("click", async () => addExamples((await api(`/api/features/${encodeURIComponent(dict)}/${id}?offset=${shown}`)).top_examples));

  node.querySelector(".label-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const form = ev.target;
    try {
      await api(`/api/features/${encodeURIComponent(dict)}/${id}/labels`, { text: form.text.value, author: form.author.value || null });
      setStatus("label saved");
      route();
    } catch (e) { setStatus(e.message, true); }
  });
  node.querySelector(".try-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const out = node.querySelector(".try-out");
    try {
      const r = await api("/api/activations", { text: ev.target.text.value, features: [f.address] });
      const tr = r.features[0];
      out.replaceChildren(el("p", { class: "muted", text: `max ${fmt(tr.max_value)}` }), tokenRow(r.tokens, tr.values, Math.max(scale, tr.max_value)));
    } catch (e) { setStatus(e.message, true); }
  });
  const steer = el("p", {}, el("a", { href: `#/steer/${encodeURIComponent(dict)}/${id}`, text: "Steer with this feature →" }));
  node.append(steer);
  view.replaceChildren(node);
}

async function showSearch(dict, by, q, offset) {
  const page = await api(`/api/search?dictionary=${encodeURIComponent(dict)}&by=${by}&q=${encodeURIComponent(q)}&offset=${offset}`);
  renderFeaturePage(`Search ${dict} by ${by}: ${q}`, page, (o) => `#/search/${encodeURIComponent(dict)}/${by}/${encodeURIComponent(q)}/${o}`);
}

function showText() {
  const text = el("textarea", { rows: "5", "aria-label": "text", id: "text-input" });
  text.value = sessionStorage.getItem("sae-text") || "import os\nprint(os.getcwd())\n";
  const out = el("div", { id: "text-out" });
  const form = el("form", { id: "text-form" }, text, el("button", { type: "submit", text: "Which features fire?" }));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    sessionStorage.setItem("sae-text", text.value);
    const dict = currentDict();
    const r = await api("/api/top-features", { text: text.value, dictionary: dict, k: 5, limit: 20 });
    const perToken = el("div", { class: "per-token muted", text: "Click a token to see its features." });
    const strongest = r.per_token.map((fs) => (fs.length ? fs[0].value : 0));
    const tokens = tokenRow(r.tokens, strongest, Math.max(0, ...strongest), (i) => {
      perToken.replaceChildren(el("strong", { text: JSON.stringify(r.tokens[i]) }),
        el("ul", {}, ...r.per_token[i].map((tf) => el("li", {}, featureLink(`${dict}/${tf.feature_id}`), ` ${fmt(tf.value)}`))));
    });
    const overall = el("ol", { class: "overall" }, ...r.overall.map((o) => el("li", {}, featureLink(o.address), ` max ${fmt(o.max_value)} on ${o.count} token(s) `, el("span", { class: "muted", text: o.label || "" }))));
    out.replaceChildren(el("h2", { text: "Tokens" }), tokens, perToken, el("h2", { text: "Top features overall" }), overall);
  });
  view.replaceChildren(el("h1", { text: "Features on your text" }), form, out);
}

function showSteer(dict, id) {
  const f = (name, attrs) => el("label", {}, name + " ", el("input", { name, ...attrs }));
  const form = el("form", { id: "steer-form", class: "steer" },
    el("label", {}, "prompt ", el("textarea", { name: "prompt", rows: "3", text: "def main():\n" })),
    f("feature", { value: dict ? `${dict}/${id}` : `${currentDict()}/0`, placeholder: "DICT/ID" }),
    el("label", {}, "mode ", el("select", { name: "mode" }, el("option", { value: "add", text: "add (× max activation)" }), el("option", { value: "clamp", text: "clamp (activation value)" }))),
    f("strength", { type: "number", step: "any", value: "5" }),
    f("max_new_tokens", { type: "number", min: "1", value: "16" }),
    f("temperature", { type: "number", step: "any", min: "0", value: "0" }),
    f("seed", { type: "number", min: "0", value: "0" }),
    el("button", { type: "submit", text: "Generate" }));
  const out = el("div", { id: "steer-out" });
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const v = (n) => form.elements[n].value;
    try {
      const r = await api("/api/steer", {
        prompt: v("prompt"),
        interventions: [{ feature: v("feature"), mode: v("mode"), strength: Number(v("strength")) }],
        max_new_tokens: Number(v("max_new_tokens")), temperature: Number(v("temperature")), seed: Number(v("seed")),
      });
      const iv = r.interventions[0];
      out.replaceChildren(
        el("p", { class: "muted", text: `unit ${fmt(iv.unit)} (${iv.unit_source}), seed ${r.seed}` }),
        el("div", { class: "cols" },
          el("div", {}, el("h2", { text: "Baseline" }), el("pre", { class: "baseline", text: r.baseline.text })),
          el("div", {}, el("h2", { text: "Steered" }), el("pre", { class: "steered", text: r.steered.text }))));
    } catch (e) { setStatus(e.message, true); }
  });
  view.replaceChildren(el("h1", { text: "Steering" }), form, out);
}

// -- routing ---------------------------------------------------------------------------------

async function route() {
  const parts = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  setStatus("");
  try {
    if (parts[0] === "f" && parts.length >= 3) {
      if (dictionaries.some((d) => d.name === parts[1])) dictSelect.value = parts[1];
      await showFeature(parts[1], Number(parts[2]));
    } else if (parts[0] === "search") await showSearch(parts[1], parts[2], parts[3], Number(parts[4] || 0));
    else if (parts[0] === "text") showText();
    else if (parts[0] === "steer") showSteer(parts[1], parts[2]);
    else if (parts[0] === "d") await showList(parts[1], Number(parts[2] || 0), parts[3]);
    else await showList(currentDict(), 0);
  } catch (e) {
    setStatus(e.message, true);
  }
  document.body.dataset.ready = "1"; // for the browser test: the view has rendered
}

document.getElementById("search-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const q = document.getElementById("search-q").value.trim();
  if (!q) return;
  const by = document.getElementById("search-by").value;
  location.hash = `#/search/${encodeURIComponent(currentDict())}/${by}/${encodeURIComponent(q)}`;
});
dictSelect.addEventListener("change", () => { location.hash = `#/d/${encodeURIComponent(currentDict())}/0`; });
window.addEventListener("hashchange", () => { document.body.dataset.ready = ""; route(); });

(async () => {
  try {
    dictionaries = (await api("/api/dictionaries")).dictionaries;
  } catch (e) {
    setStatus(e.message, true);
    return;
  }
  for (const d of dictionaries) {
    dictSelect.append(el("option", { value: d.name, text: `${d.name} (${d.architecture}, ${d.d_sae})` }));
  }
  route();
})();
