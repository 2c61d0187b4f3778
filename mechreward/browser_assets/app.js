// mechreward feature browser: a static page over window.MECHREWARD_DATA (written by mechreward.browser).
// No network, no framework: it opens from disk.
"use strict";

(function () {
  const DATA = window.MECHREWARD_DATA;
  const MAX_ROWS = 1000; // rows rendered at once; filter or sort to see others
  const features = DATA.features;
  const hasRollouts = features.some((f) => f.auroc !== undefined);
  const hasPack = features.some((f) => f.pack_role);

  const fmt = (v, digits) => (v === null || v === undefined || Number.isNaN(v) ? "" : Number(v).toPrecision(digits));
  const pct = (v) => (v === null || v === undefined ? "" : (100 * v).toPrecision(3) + "%");
  const tokText = (t) => (t === "\n" ? "⏎" : t);
  const topTokens = (list, n) => (list || []).slice(0, n).map((p) => JSON.stringify(tokText(p[0]))).join(" ");
  const firstContext = (f) => {
    const c = (f.contexts || [])[0];
    if (!c) return "";
    return c.tokens.map((t, i) => (i === c.center ? "[" + tokText(t) + "]" : tokText(t))).join("");
  };

  const COLUMNS = [
    { key: "index", label: "feature", value: (f) => f.index, show: (f) => String(f.index) },
    { key: "density", label: "density", value: (f) => f.density || "", show: (f) => f.density || "",
      cls: (f) => "density-" + f.density },
    { key: "fire_rate", label: "fire rate", value: (f) => f.fire_rate, show: (f) => pct(f.fire_rate) },
    { key: "mean_activation", label: "mean act", value: (f) => f.mean_activation, show: (f) => fmt(f.mean_activation, 3) },
    { key: "max_activation", label: "max act", value: (f) => f.max_activation, show: (f) => fmt(f.max_activation, 3) },
  ];
  if (hasRollouts) {
    COLUMNS.push({ key: "auroc", label: "AUROC (correct)", value: (f) => f.auroc, show: (f) => fmt(f.auroc, 3) });
    COLUMNS.push({ key: "d", label: "d", value: (f) => f.d, show: (f) => fmt(f.d, 3) });
  }
  if (hasPack) {
    COLUMNS.push({ key: "pack_role", label: "pack", value: (f) => f.pack_role || "", show: (f) => f.pack_role || "",
      cls: (f) => (f.pack_role ? "role-" + f.pack_role : "") });
  }
  COLUMNS.push({ key: "promoted", label: "promotes", value: (f) => topTokens(f.promoted, 3),
    show: (f) => topTokens(f.promoted, 3), text: true });
  COLUMNS.push({ key: "context", label: "top context", value: firstContext, show: firstContext, text: true });

  let sortKey = "fire_rate";
  let sortDir = -1; // -1 descending, 1 ascending
  let selected = null;

  function el(tag, attrs, text) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") e.className = v;
      else e.setAttribute(k, v);
    }
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function renderOverview() {
    const m = DATA.meta;
    document.getElementById("meta").textContent =
      `model ${m.model} · layer ${m.layer} · SAE ${m.sae_path || "?"} (d_sae ${m.d_sae}, k ${m.k}) · ` +
      `${Number(m.tokens).toLocaleString()} tokens`;
    const t = el("table");
    for (const [k, v] of m.summary) {
      const tr = el("tr");
      tr.appendChild(el("td", {}, k));
      tr.appendChild(el("td", {}, String(v)));
      t.appendChild(tr);
    }
    document.getElementById("summary").appendChild(t);
    const imgs = document.getElementById("images");
    for (const im of DATA.images) {
      const fig = el("figure");
      fig.appendChild(el("img", { src: im.src, alt: im.caption }));
      fig.appendChild(el("figcaption", {}, im.caption));
      imgs.appendChild(fig);
    }
    document.getElementById("logit-note").textContent = m.logit_effect || "";
  }

  function renderHeader() {
    const row = document.getElementById("header-row");
    row.textContent = "";
    for (const c of COLUMNS) {
      const th = el("th", { "data-key": c.key, scope: "col" }, c.label);
      if (c.key === sortKey) th.setAttribute("aria-sort", sortDir < 0 ? "descending" : "ascending");
      th.addEventListener("click", () => {
        if (sortKey === c.key) sortDir = -sortDir;
        else { sortKey = c.key; sortDir = c.text || c.key === "index" || c.key === "density" ? 1 : -1; }
        renderHeader();
        renderRows();
      });
      row.appendChild(th);
    }
  }

  function compare(a, b) {
    const col = COLUMNS.find((c) => c.key === sortKey);
    const va = col.value(a), vb = col.value(b);
    const missA = va === null || va === undefined || va === "", missB = vb === null || vb === undefined || vb === "";
    if (missA || missB) return missA === missB ? a.index - b.index : missA ? 1 : -1; // missing values last
    if (va < vb) return -sortDir;
    if (va > vb) return sortDir;
    return a.index - b.index;
  }

  function visible() {
    const q = document.getElementById("filter").value.trim().toLowerCase();
    const dens = document.getElementById("density").value;
    const packOnly = document.getElementById("pack-only").checked;
    return features.filter((f) => {
      if (dens && f.density !== dens) return false;
      if (packOnly && !f.pack_role) return false;
      if (!q) return true;
      if (String(f.index) === q) return true;
      const hay = [topTokens(f.promoted, 10), f.pack_role || "",
        ...(f.contexts || []).slice(0, 5).map((c) => c.tokens.join(""))].join(" ").toLowerCase();
      return hay.includes(q);
    });
  }

  function renderRows() {
    const body = document.getElementById("rows");
    body.textContent = "";
    const rows = visible().sort(compare);
    document.getElementById("count").textContent = `${rows.length} of ${features.length} features`;
    const trunc = document.getElementById("truncated");
    trunc.hidden = rows.length <= MAX_ROWS;
    trunc.textContent = `showing the first ${MAX_ROWS} rows; filter or sort to see the others`;
    for (const f of rows.slice(0, MAX_ROWS)) {
      const tr = el("tr", { "data-index": String(f.index) });
      if (f.index === selected) tr.classList.add("selected");
      for (const c of COLUMNS) {
        const td = el("td", { class: (c.text ? "text " : "") + (c.cls ? c.cls(f) : "") }, c.show(f));
        if (c.text) td.title = c.show(f);
        tr.appendChild(td);
      }
      tr.addEventListener("click", () => { location.hash = "feature-" + f.index; });
      body.appendChild(tr);
    }
  }

  function logitTable(title, list) {
    const wrap = el("div");
    wrap.appendChild(el("strong", {}, title));
    const t = el("table");
    for (const [tok, v] of list || []) {
      const tr = el("tr");
      tr.appendChild(el("td", {}, JSON.stringify(tokText(tok))));
      tr.appendChild(el("td", {}, fmt(v, 3)));
      t.appendChild(tr);
    }
    wrap.appendChild(t);
    return wrap;
  }

  function showFeature(i) {
    const f = features.find((x) => x.index === i);
    const panel = document.getElementById("panel");
    if (!f) { panel.hidden = true; selected = null; return; }
    selected = i;
    for (const tr of document.querySelectorAll("#rows tr")) {
      tr.classList.toggle("selected", Number(tr.dataset.index) === i);
    }
    panel.hidden = false;
    document.getElementById("panel-title").textContent =
      `Feature ${f.index}` + (f.pack_role ? ` — pack: ${f.pack_role} (weight ${f.pack_weight})` : "");
    const stats = document.getElementById("panel-stats");
    stats.textContent = "";
    const t = el("table");
    const pairs = [["density", f.density], ["fire rate", pct(f.fire_rate)], ["mean activation (when firing)",
      fmt(f.mean_activation, 4)], ["max activation", fmt(f.max_activation, 4)]];
    if (f.auroc !== undefined) {
      pairs.push(["correctness AUROC", fmt(f.auroc, 4)], ["Cohen's d (correct − wrong)", fmt(f.d, 4)],
        ["fires in responses", pct(f.rollout_fire_rate)]);
    }
    for (const [k, v] of pairs) {
      const tr = el("tr");
      tr.appendChild(el("td", {}, k));
      tr.appendChild(el("td", {}, v === undefined ? "" : String(v)));
      t.appendChild(tr);
    }
    stats.appendChild(t);
    const logits = document.getElementById("panel-logits");
    logits.textContent = "";
    const box = el("div", { class: "logits" });
    box.appendChild(logitTable("promoted", f.promoted));
    box.appendChild(logitTable("suppressed", f.suppressed));
    logits.appendChild(box);
    const list = document.getElementById("contexts");
    list.textContent = "";
    const top = Math.max(f.max_activation || 0, ...(f.contexts || []).map((c) => c.activation)) || 1;
    for (const c of f.contexts || []) {
      const li = el("li", { class: "context" });
      li.appendChild(el("span", { class: "ctx-val" }, fmt(c.activation, 3)));
      const span = el("span", { class: "ctx" });
      c.tokens.forEach((tok, j) => {
        const a = c.acts[j];
        const s = el("span", { class: "tok" + (j === c.center ? " center" : ""), title: `activation ${fmt(a, 4)}`,
          "data-act": String(a) }, tokText(tok));
        if (a > 0) s.style.backgroundColor = `rgba(255, 120, 0, ${Math.min(1, 0.1 + 0.9 * a / top).toFixed(3)})`;
        span.appendChild(s);
      });
      li.appendChild(span);
      list.appendChild(li);
    }
    if (!(f.contexts || []).length) list.appendChild(el("li", {}, "no contexts: this feature never fired"));
  }

  function route() {
    const m = /^#feature-(\d+)$/.exec(location.hash);
    showFeature(m ? Number(m[1]) : null);
  }

  renderOverview();
  renderHeader();
  renderRows();
  for (const id of ["filter", "density", "pack-only"]) {
    document.getElementById(id).addEventListener("input", renderRows);
  }
  document.getElementById("close").addEventListener("click", () => { location.hash = ""; });
  window.addEventListener("hashchange", route);
  route();
})();
