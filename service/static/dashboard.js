/* maskmill: the requester dashboard.
 *
 * A static page over the REST API: the API key is asked once and kept in sessionStorage (this tab
 * only), then projects, campaigns, progress, the timeline and the workers are fetched and drawn, and
 * refreshed every few seconds while the tab is visible.
 */
(function () {
  "use strict";

  const NS = window.Maskmill;
  const KEY_STORE = "maskmill.apiKey";
  const REFRESH_MS = 10000;
  const CLUSTER_STATES = [
    "candidate",
    "active",
    "accepted",
    "rejected",
    "split",
    "auto_rejected",
    "auto_split",
    "skipped",
    "pending",
  ];
  const $ = (id) => document.getElementById(id);

  const state = { key: null, projectId: null, campaignId: null, timer: null };

  function loadKey() {
    try {
      return sessionStorage.getItem(KEY_STORE);
    } catch (err) {
      return null;
    }
  }

  function storeKey(key) {
    try {
      if (key) sessionStorage.setItem(KEY_STORE, key);
      else sessionStorage.removeItem(KEY_STORE);
    } catch (err) {
      /* the key then lives only in memory, for this page view */
    }
  }

  async function call(url, options) {
    const result = await NS.api(url, Object.assign({ apiKey: state.key }, options || {}));
    if (!result.ok && result.status === 401) {
      signOut("The API key was refused: " + result.error.message);
    }
    return result;
  }

  function signOut(message) {
    clearInterval(state.timer);
    state.key = null;
    storeKey(null);
    $("dash").hidden = true;
    $("forget-key").hidden = true;
    $("key-panel").hidden = false;
    $("key-error").textContent = message || "";
  }

  async function signIn(key) {
    state.key = key;
    const result = await call("/api/v1/projects");
    if (!result.ok) {
      if (result.status !== 401) $("key-error").textContent = result.error.message;
      return;
    }
    storeKey(key);
    $("key-panel").hidden = true;
    $("forget-key").hidden = false;
    $("dash").hidden = false;
    fillSelect($("project-select"), result.data.projects || [], (p) => p.name + " (#" + p.id + ")");
    if (!(result.data.projects || []).length) {
      status("No projects yet: create one with POST /api/v1/projects.");
      return;
    }
    await selectProject(Number($("project-select").value));
    clearInterval(state.timer);
    state.timer = setInterval(() => {
      if (document.visibilityState === "visible") refresh();
    }, REFRESH_MS);
  }

  function fillSelect(select, items, label) {
    const keep = select.value;
    select.textContent = "";
    for (const item of items) {
      const option = NS.el("option", "", label(item));
      option.value = String(item.id);
      select.append(option);
    }
    if (items.some((item) => String(item.id) === keep)) select.value = keep;
  }

  function status(text) {
    $("dash-status").textContent = text;
  }

  function usd(value) {
    const number = Number(value || 0);
    return "$" + number.toFixed(number < 10 ? 2 : 0);
  }

  function listOf(data, key) {
    if (Array.isArray(data)) return data;
    return (data && data[key]) || [];
  }

  async function selectProject(projectId) {
    state.projectId = projectId;
    const result = await call("/api/v1/projects/" + projectId + "/campaigns");
    if (!result.ok) {
      status(result.error.message);
      return;
    }
    const campaigns = listOf(result.data, "campaigns")
      .slice()
      .sort((a, b) => b.id - a.id);
    fillSelect($("campaign-select"), campaigns, (c) => "#" + c.id + " · " + (c.status || ""));
    state.campaignId = campaigns.length ? Number($("campaign-select").value) : null;
    $("campaign-panel").hidden = !campaigns.length;
    $("no-campaign").hidden = !!campaigns.length;
    await refresh();
  }

  async function refresh() {
    if (!state.key || state.projectId === null) return;
    const jobs = [drawWorkers()];
    if (state.campaignId !== null) jobs.push(drawCampaign(), drawTimeline());
    else drawClusters({});
    await Promise.all(jobs);
    status("Updated " + new Date().toLocaleTimeString() + ".");
  }

  // ------------------------------------------------------------------------------ campaign

  async function drawCampaign() {
    const result = await call("/api/v1/campaigns/" + state.campaignId);
    if (!result.ok) {
      status(result.error.message);
      return;
    }
    const p = result.data;
    $("campaign-name").textContent = "#" + state.campaignId;
    $("campaign-status").textContent = p.status;
    $("campaign-pause").disabled = p.status !== "running";
    $("campaign-resume").disabled = p.status !== "paused";
    $("campaign-stop").disabled = !(p.status === "running" || p.status === "paused");

    const budget = Number(p.budget_usd || 0);
    const spent = Number(p.spent_usd || 0);
    const reserved = Number(p.reserved_usd || 0);
    const share = (v) => (budget > 0 ? Math.min(100, (100 * v) / budget) : 0);
    $("budget-spent").style.width = share(spent) + "%";
    $("budget-reserved").style.left = share(spent) + "%";
    $("budget-reserved").style.width = share(reserved) + "%";
    $("budget-text").textContent =
      "Spent " + usd(spent) + " of " + usd(budget) + " (" + usd(reserved) + " reserved for open HITs, " +
      usd(Math.max(0, budget - spent - reserved)) + " left).";

    const q = p.questions || {};
    const m = p.masks || {};
    const w = p.workers || {};
    const kpis = [
      ["Questions answered", (q.answered || 0) + " / " + (q.asked || 0)],
      ["Masks accepted", m.accepted || 0],
      ["Masks rejected", m.rejected || 0],
      ["Masks pending", m.pending || 0],
      ["Workers active", w.active || 0],
      ["Workers blocked", w.blocked || 0],
    ];
    const host = $("kpis");
    host.textContent = "";
    for (const [label, value] of kpis) {
      const box = NS.el("div", "kpi");
      box.append(NS.el("span", "value", String(value)), NS.el("span", "label", label));
      host.append(box);
    }
    drawClusters(p.clusters || {});
  }

  function drawClusters(clusters) {
    const table = $("clusters-table");
    table.textContent = "";
    const names = CLUSTER_STATES.filter((s) => s in clusters).concat(
      Object.keys(clusters).filter((s) => !CLUSTER_STATES.includes(s)),
    );
    const max = Math.max(1, ...names.map((s) => Number(clusters[s]) || 0));
    const head = table.createTHead().insertRow();
    for (const title of ["State", "Clusters", ""]) head.append(NS.el("th", "", title));
    const body = table.createTBody();
    for (const name of names) {
      const row = body.insertRow();
      row.insertCell().textContent = name.replace("_", " ");
      row.insertCell().textContent = String(clusters[name]);
      const bar = NS.el("div", "bar");
      bar.style.width = (100 * (Number(clusters[name]) || 0)) / max + "%";
      row.insertCell().append(bar);
    }
  }

  async function act(action) {
    if (action === "stop" && !window.confirm("Stop this campaign? Open HITs are withdrawn.")) return;
    const result = await call("/api/v1/campaigns/" + state.campaignId + "/" + action, {
      method: "POST",
    });
    status(result.ok ? "Campaign " + action + " done." : result.error.message);
    await selectProject(state.projectId);
  }

  // ------------------------------------------------------------------------------ timeline

  const SVG = "http://www.w3.org/2000/svg";

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  async function drawTimeline() {
    const result = await call("/api/v1/campaigns/" + state.campaignId + "/timeline?buckets=48");
    const chart = $("timeline-chart");
    chart.textContent = "";
    if (!result.ok) {
      $("timeline-note").textContent = result.error.message;
      return;
    }
    const points = result.data.points || [];
    const width = 640;
    const height = 220;
    const pad = { left: 56, right: 12, top: 12, bottom: 28 };
    const t0 = Date.parse(result.data.start);
    const t1 = Math.max(Date.parse(result.data.end), t0 + 1000);
    const top = Math.max(1, ...points.map((p) => Math.max(p.accepted_masks, p.rejected_masks)));
    const x = (t) => pad.left + ((t - t0) / (t1 - t0)) * (width - pad.left - pad.right);
    const y = (v) => height - pad.bottom - (v / top) * (height - pad.top - pad.bottom);

    chart.append(svg("line", { class: "axis", x1: pad.left, y1: y(0), x2: width - pad.right, y2: y(0) }));
    chart.append(svg("line", { class: "axis", x1: pad.left, y1: pad.top, x2: pad.left, y2: y(0) }));
    chart.append(svg("text", { x: pad.left - 6, y: y(top) + 4, "text-anchor": "end" }, String(top)));
    chart.append(svg("text", { x: pad.left - 6, y: y(0) + 4, "text-anchor": "end" }, "0"));
    chart.append(svg("text", { x: pad.left, y: height - 8 }, new Date(t0).toLocaleString()));
    chart.append(
      svg("text", { x: width - pad.right, y: height - 8, "text-anchor": "end" }, new Date(t1).toLocaleString()),
    );
    for (const [key, cls] of [
      ["accepted_masks", "series"],
      ["rejected_masks", "series rejected"],
    ]) {
      const coords = [[x(t0), y(0)]].concat(points.map((p) => [x(Date.parse(p.t)), y(p[key])]));
      const d = coords.map((c, i) => (i ? "L" : "M") + c[0].toFixed(1) + " " + c[1].toFixed(1)).join(" ");
      chart.append(svg("path", { class: cls, d }));
    }
    const last = points.length ? points[points.length - 1] : { accepted_masks: 0, rejected_masks: 0 };
    $("timeline-note").textContent =
      "Solid: accepted masks (" + last.accepted_masks + "). Dashed: rejected masks (" +
      last.rejected_masks + ").";
  }

  // ------------------------------------------------------------------------------ workers

  function accuracy(worker) {
    if (typeof worker.gold_accuracy === "number") return worker.gold_accuracy;
    if (worker.gold_total) return worker.gold_correct / worker.gold_total;
    return null;
  }

  async function drawWorkers() {
    const result = await call("/api/v1/projects/" + state.projectId + "/workers");
    const table = $("workers-table");
    table.textContent = "";
    if (!result.ok) {
      status(result.error.message);
      return;
    }
    const workers = listOf(result.data, "workers");
    const head = table.createTHead().insertRow();
    for (const title of ["Worker", "Qualified", "Gold accuracy", "Gold answers", "Status"]) {
      head.append(NS.el("th", "", title));
    }
    const body = table.createTBody();
    for (const worker of workers) {
      const row = body.insertRow();
      row.insertCell().textContent = "#" + (worker.worker_id !== undefined ? worker.worker_id : worker.id);
      row.insertCell().textContent = worker.qualified ? "yes" : "no";
      const acc = accuracy(worker);
      row.insertCell().textContent = acc === null ? "–" : (100 * acc).toFixed(0) + "%";
      row.insertCell().textContent = String(worker.gold_total || 0);
      const cell = row.insertCell();
      if (worker.blocked) {
        cell.className = "blocked";
        cell.textContent = "blocked: " + (worker.blocked_reason || "");
      } else {
        cell.textContent = "active";
      }
    }
    if (!workers.length) {
      const row = body.insertRow();
      const cell = row.insertCell();
      cell.colSpan = 5;
      cell.textContent = "No workers yet.";
    }
  }

  async function invite() {
    const result = await call("/api/v1/projects/" + state.projectId + "/workers", { method: "POST" });
    const out = $("invite-output");
    if (!result.ok) {
      out.textContent = result.error.message;
      return;
    }
    out.textContent = "Invite link (shown once): " + result.data.url;
    await drawWorkers();
  }

  // ------------------------------------------------------------------------------ wiring

  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("api-key").value.trim();
    $("api-key").value = "";
    $("key-error").textContent = "";
    if (key) signIn(key);
  });
  $("forget-key").addEventListener("click", () => signOut("Key forgotten."));
  $("project-select").addEventListener("change", (e) => selectProject(Number(e.target.value)));
  $("campaign-select").addEventListener("change", (e) => {
    state.campaignId = Number(e.target.value);
    refresh();
  });
  $("campaign-pause").addEventListener("click", () => act("pause"));
  $("campaign-resume").addEventListener("click", () => act("resume"));
  $("campaign-stop").addEventListener("click", () => act("stop"));
  $("invite-worker").addEventListener("click", invite);

  const saved = loadKey();
  if (saved) signIn(saved);
})();
