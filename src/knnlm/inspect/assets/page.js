// knnlm inspect: draws what the server computed (or, on a static page, what is embedded).
// No probability is computed here: every number on the page comes from the server.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const embedded = $("knnlm-data");
  const STATIC = embedded ? JSON.parse(embedded.textContent).static : null;
  let config = null;
  let page = null; // static: the page shown
  let view = null; // the last view drawn
  let selected = null;
  let generated = 0; // tokens at the end of the text that generation added
  let sequence = 0; // only the newest request's answer is drawn

  const fmt = (x, digits) => (x === null || x === undefined ? "—" : Number(x).toPrecision(digits || 4));
  const el = (tag, text, cls) => {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = text;
    if (cls) e.className = cls;
    return e;
  };
  const num = (tag, x, digits) => {
    const e = el(tag, fmt(x, digits), "num");
    e.dataset.value = x === null ? "" : String(x);
    return e;
  };
  const say = (msg) => { $("message").textContent = msg || ""; };

  function settings() {
    const s = {
      k: parseInt($("k").value, 10),
      knn_weight: parseFloat($("weight").value),
      temperature: parseFloat($("temperature").value),
    };
    if (config.gate) s.retrieval_rate = parseFloat($("rate").value);
    if (config.memory) s.memory_weight = parseFloat($("memory-weight").value);
    return s;
  }

  function showSettings(s) {
    $("k").value = s.k; $("weight").value = s.knn_weight; $("temperature").value = s.temperature;
    $("rate").value = s.retrieval_rate; $("memory-weight").value = s.memory_weight;
    $("k-out").textContent = s.k; $("weight-out").textContent = s.knn_weight;
    $("rate-out").textContent = s.retrieval_rate; $("memory-weight-out").textContent = s.memory_weight;
  }

  async function post(path, body) {
    const r = await fetch(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    let data = null;
    try { data = await r.json(); } catch (e) { data = { error: r.status + " " + r.statusText }; }
    if (!r.ok) throw new Error(data.error || r.statusText);
    return data;
  }

  async function request(path, body, draw) {
    const mine = ++sequence;
    say("");
    document.body.classList.add("busy");
    try {
      const data = await post(path, body);
      if (mine === sequence) draw(data);
    } catch (e) {
      if (mine === sequence) say(e.message);
    } finally {
      if (mine === sequence) document.body.classList.remove("busy");
    }
  }

  function analyse(token) {
    if (STATIC) return;
    const body = Object.assign({ text: $("text").value }, settings());
    if (token) body.token = token;
    request("api/view", body, (data) => drawView(data, token));
  }

  function drawView(data, token) {
    view = data;
    showSettings(data.settings);
    const ppl = data.perplexity;
    const last = (xs) => (xs.length ? xs[xs.length - 1] : null);
    $("summary").hidden = false;
    $("ppl-lm").textContent = fmt(last(ppl.lm)); $("ppl-lm").dataset.value = String(last(ppl.lm));
    $("ppl-knnlm").textContent = fmt(last(ppl.knnlm)); $("ppl-knnlm").dataset.value = String(last(ppl.knnlm));
    $("ppl-memory-wrap").hidden = !ppl.lm_memory;
    if (ppl.lm_memory) $("ppl-memory").textContent = fmt(last(ppl.lm_memory));
    $("figure").innerHTML = data.figure; // SVG drawn by the server from numbers only
    drawTokens(data.tokens);
    if (data.token) drawDetails(data.token);
    else if (!token) { selected = null; $("details").hidden = true; $("ppl-at").textContent = ""; }
  }

  function drawTokens(tokens) {
    const box = $("tokens");
    box.replaceChildren();
    const n = tokens.length;
    for (const t of tokens) {
      const span = el("span", t.text, "tok");
      span.dataset.index = t.index;
      if (t.index === 0) {
        span.classList.add("first");
        span.title = "the first token has no prediction";
      } else {
        span.style.backgroundColor = t.colour;
        span.dataset.gain = t.gain === null ? "" : String(t.gain);
        span.title = "log p_lm " + fmt(t.lm) + ", log p_knn " + fmt(t.knn) + ", log p_mix " + fmt(t.mix) + ", gain " + fmt(t.gain);
        if (!t.searched) span.classList.add("skipped");
        if (t.index >= n - generated) span.classList.add("generated");
        span.addEventListener("click", () => choose(t.index));
      }
      if (t.index === selected) span.classList.add("selected");
      box.appendChild(span);
    }
  }

  function choose(index) {
    selected = index;
    for (const s of document.querySelectorAll(".tok.selected")) s.classList.remove("selected");
    const span = document.querySelector('.tok[data-index="' + index + '"]');
    if (span) span.classList.add("selected");
    if (STATIC) drawDetails(page.details[String(index)]);
    else analyse(index);
  }

  function drawDetails(d) {
    $("details").hidden = false;
    $("chosen").textContent = "#" + d.index + " " + JSON.stringify(d.target.token);
    const ppl = view.perplexity;
    $("ppl-at").textContent = "Up to this token: LM " + fmt(ppl.lm[d.index - 1]) + ", kNN-LM " + fmt(ppl.knnlm[d.index - 1]) + ".";
    const probs = $("target-probs");
    probs.replaceChildren();
    const names = { lm: "p_lm", knn: "p_knn", mix: "mixture", memory: "p_memory", lm_memory: "LM + memory" };
    for (const [name, p] of Object.entries(d.probs)) {
      const b = num("b", p); b.id = "p-" + name;
      probs.append(names[name] + "(target) = ", b, "   ");
    }
    if (!d.searched) probs.append(el("span", "(the gate skipped this token: the mixture is p_lm)"));
    drawDistributions(d.top, names);
    drawNeighbours(d);
  }

  function drawDistributions(top, names) {
    const box = $("dists");
    box.replaceChildren();
    for (const [name, rows] of Object.entries(top)) {
      const table = el("table"); table.id = "dist-" + name;
      table.appendChild(el("caption", "top next tokens: " + names[name]));
      const body = el("tbody");
      for (const r of rows) {
        const tr = el("tr"); tr.dataset.id = r.id; tr.dataset.p = String(r.p);
        if (r.target) tr.classList.add("target");
        tr.append(el("td", JSON.stringify(r.token)), num("td", r.p));
        body.appendChild(tr);
      }
      table.appendChild(body);
      box.appendChild(table);
    }
  }

  function drawNeighbours(d) {
    $("found").textContent = d.found + " of k = " + d.k + " found, " + d.neighbours.length + " listed";
    const body = $("neighbours").querySelector("tbody");
    body.replaceChildren();
    for (const nb of d.neighbours) {
      const tr = el("tr"); tr.dataset.row = nb.row; tr.dataset.distance = String(nb.distance);
      tr.dataset.weight = String(nb.weight); tr.dataset.target = nb.target_id;
      if (nb.hit) tr.classList.add("hit");
      const ctx = el("td", null, "context");
      ctx.append(nb.before, el("mark", nb.target), el("span", nb.after, "after"));
      const shares = nb.shares.length ? "#" + nb.shares.slice(0, 12).join(", #") + (nb.shares.length > 12 ? " …" : "") : "";
      tr.append(el("td", nb.rank), num("td", nb.distance), num("td", nb.weight), ctx,
        el("td", shares + (shares ? " (" : "(") + "p_knn " + fmt(nb.target_p, 3) + ")"));
      body.appendChild(tr);
    }
  }

  function generate() {
    const body = Object.assign({ text: $("text").value, steps: parseInt($("steps").value, 10) }, settings());
    request("api/generate", body, (data) => {
      $("text").value = data.text;
      generated = data.steps.length;
      drawView(data.view);
      drawSteps(data.steps);
    });
  }

  function drawSteps(steps) {
    $("steps-view").hidden = false;
    const body = $("steps-table").querySelector("tbody");
    body.replaceChildren();
    for (const s of steps) {
      const tr = el("tr");
      const nbs = s.neighbours.map((n) => n.before.slice(-30) + "[" + n.target + "] w=" + fmt(n.weight, 3)).join("\n");
      tr.append(el("td", s.step), el("td", JSON.stringify(s.token)), num("td", s.probs.lm), num("td", s.probs.knn), num("td", s.probs.mix), el("td", nbs, "context"));
      body.appendChild(tr);
    }
  }

  function showPage(i) {
    page = STATIC[i];
    $("text").value = page.text;
    selected = null;
    drawView(page.view);
  }

  function setUp(cfg) {
    config = cfg;
    $("about").textContent = "model " + cfg.model + " · datastore " + cfg.datastore + " (" + cfg.entries + " entries) · k ≤ " + cfg.k_max;
    $("k").max = cfg.k_max;
    $("gate-controls").hidden = !cfg.gate;
    $("memory-controls").hidden = !cfg.memory;
    showSettings(cfg.defaults);
  }

  if (STATIC) {
    setUp(STATIC[0].config);
    for (const id of ["text", "k", "weight", "temperature", "rate", "memory-weight", "analyse"]) $(id).disabled = true;
    $("generate-controls").hidden = true;
    if (STATIC.length > 1) {
      const menu = $("pages");
      menu.hidden = false;
      STATIC.forEach((p, i) => menu.appendChild(Object.assign(el("option", p.label), { value: i })));
      menu.addEventListener("change", () => showPage(parseInt(menu.value, 10)));
    }
    showPage(0);
    return;
  }
  for (const id of ["k", "weight", "rate", "memory-weight"]) {
    $(id).addEventListener("input", () => { $(id + "-out").textContent = $(id).value; });
    $(id).addEventListener("change", () => analyse(selected));
  }
  $("temperature").addEventListener("change", () => analyse(selected));
  $("analyse").addEventListener("click", () => { generated = 0; selected = null; analyse(null); });
  $("generate").addEventListener("click", generate);
  fetch("api/config").then((r) => r.json()).then(setUp).catch((e) => say("cannot reach the server: " + e.message));
})();
