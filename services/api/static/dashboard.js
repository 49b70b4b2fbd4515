// dosebench dashboard: job list polling, stage progress bars, sortable tables, cancel / retry.
// Plain browser JavaScript, no dependencies. The API is called with the login cookie (same origin).
"use strict";

const dosebench = (() => {
  const POLL_MS = 2000;
  // updated_since is set this far before the server's clock of the last answer, so an update that was
  // committed while that answer was being read is still seen by the next poll
  const OVERLAP_MS = 5000;

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v;
      else if (k === "style") node.style.cssText = v;
      else node.setAttribute(k, v);
    }
    for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    return node;
  }

  function doseLabel(d) { return Number(d).toFixed(2); }

  // Polls url() every POLL_MS with the last ETag: a 304 (nothing changed) costs a few hundred bytes;
  // a 200 goes to onChange(response). A 401 goes to the login page; errors show in status and the
  // polling goes on. The first poll runs after `delay` ms (0: at once).
  function pollWithEtag({url, status, etag = null, delay = 0, onChange}) {
    async function poll() {
      const headers = etag ? {"If-None-Match": etag} : {};
      try {
        // no-store: the browser's cache stays out of it; the 304 comes to this script as it is
        const response = await fetch(url(), {headers, credentials: "same-origin", cache: "no-store"});
        if (response.status === 401) { window.location = "/login"; return; }
        if (response.status === 304) {
          status.textContent = `up to date (${new Date().toLocaleTimeString()})`;
          return;
        }
        if (!response.ok) throw new Error(`${response.status}`);
        etag = response.headers.get("ETag");
        await onChange(response);
        status.textContent = `updated ${new Date().toLocaleTimeString()}`;
      } catch (error) {
        status.textContent = `poll failed: ${error.message}`;
      } finally {
        window.setTimeout(poll, POLL_MS);
      }
    }
    window.setTimeout(poll, delay);
  }

  function bar(stage) {
    const pct = Math.round((stage.progress || 0) * 100);
    const title = `${stage.name}${stage.dose != null ? " " + doseLabel(stage.dose) : ""}: ${stage.state}, ` +
      `${pct} %, attempt ${stage.attempt}` + (stage.error ? ` — ${stage.error}` : "");
    const wrap = el("div", {class: `stage s-${stage.state}`, title,
                             "data-stage": stage.name + (stage.dose != null ? "-" + doseLabel(stage.dose) : "")});
    wrap.append(el("div", {class: "bar"}, el("i", {style: `width:${pct}%`})));
    const note = [];
    if (stage.attempt > 1) note.push(`attempt ${stage.attempt}`);
    if (note.length) wrap.append(el("small", {}, note.join(" ")));
    if (stage.error) wrap.append(el("small", {class: "error"}, stage.error));
    return wrap;
  }

  // acquire; simulate / reconstruct / segment per dose (one column each); evaluate
  function stageGrid(job) {
    const stages = job.stages || [];
    const doses = [...new Set(stages.filter(s => s.dose != null).map(s => s.dose))].sort((a, b) => b - a);
    const table = el("table", {class: "stage-grid"});
    const head = el("tr", {}, el("th", {}, ""));
    for (const d of doses) head.append(el("th", {}, `${Math.round(d * 1000) / 10} %`));
    table.append(head);
    const row = (name) => {
      const tr = el("tr", {}, el("th", {}, name));
      const perDose = stages.filter(s => s.name === name && s.dose != null);
      if (perDose.length) {
        for (const d of doses) {
          const s = perDose.find(x => x.dose === d);
          tr.append(el("td", {}, s ? bar(s) : ""));
        }
      } else {
        const s = stages.find(x => x.name === name);
        const td = el("td", {colspan: String(Math.max(doses.length, 1))}, s ? bar(s) : "");
        tr.append(td);
      }
      return tr;
    };
    for (const name of ["acquire", "simulate", "reconstruct", "segment", "evaluate"]) {
      if (stages.some(s => s.name === name)) table.append(row(name));
    }
    return table;
  }

  function jobRow(job) {
    const tr = el("tr", {id: `job-${job.id}`, "data-state": job.state});
    tr.append(el("td", {}, el("a", {href: `/jobs/${job.id}`}, job.id.slice(0, 8))));
    const state = el("td", {}, el("span", {class: `state s-${job.state}`}, job.state));
    if (job.error) state.append(el("div", {class: "error small"}, job.error));
    tr.append(state);
    tr.append(el("td", {}, job.protocol));
    tr.append(el("td", {}, (job.doses || []).map(doseLabel).join(", ")));
    tr.append(el("td", {}, stageGrid(job)));
    tr.append(el("td", {class: "small"}, (job.updated_at || "").replace("T", " ").slice(0, 19)));
    return tr;
  }

  async function api(method, url, body) {
    const options = {method, credentials: "same-origin", headers: {}};
    if (body instanceof FormData) options.body = body;
    else if (body !== undefined) {
      options.body = JSON.stringify(body);
      options.headers["Content-Type"] = "application/json";
    }
    const response = await fetch(url, options);
    if (response.status === 401) { window.location = "/login"; throw new Error("not logged in"); }
    const data = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(data.detail || `${response.status} ${response.statusText}`);
    return data;
  }

  function jobList() {
    const jobs = new Map();
    let since = null;
    let total = 0;
    const tbody = document.getElementById("jobs");
    const status = document.getElementById("poll-status");

    function render() {
      const sorted = [...jobs.values()].sort((a, b) => (b.created_at || "").localeCompare(a.created_at || ""));
      tbody.replaceChildren(...(sorted.length ? sorted.map(jobRow)
        : [el("tr", {class: "empty"}, el("td", {colspan: "6"}, "no jobs yet"))]));
      document.getElementById("job-count").textContent = `(${jobs.size}${total > jobs.size ? " of " + total : ""})`;
    }

    function url() {
      let url = "/v1/jobs?stages=true&limit=100";
      if (since) url += "&updated_since=" + encodeURIComponent(since);
      return url;
    }

    async function onChange(response) {
      const data = await response.json();
      for (const job of data.jobs) jobs.set(job.id, job);
      if (!since) total = data.total;
      since = new Date(Date.parse(data.server_time) - OVERLAP_MS).toISOString();
      render();
    }

    const form = document.getElementById("new-job");
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const say = document.getElementById("submit-status");
      const button = document.getElementById("submit-job");
      button.disabled = true;
      try {
        say.textContent = "uploading…";
        const upload = new FormData();
        upload.append("file", document.getElementById("study-file").files[0]);
        const study = await api("POST", "/v1/studies", upload);
        say.textContent = "submitting…";
        const doses = document.getElementById("doses").value.split(/[ ,]+/).filter(Boolean).map(Number);
        const job = await api("POST", "/v1/jobs", {
          study_id: study.id, doses, protocol: document.getElementById("protocol").value,
          segmenter: document.getElementById("segmenter").value,
          seed: Number(document.getElementById("seed").value || 7)});
        say.textContent = `job ${job.id.slice(0, 8)} ${job.state}`;
      } catch (error) {
        say.textContent = `failed: ${error.message}`;
      } finally {
        button.disabled = false;
      }
    });
    pollWithEtag({url, status, onChange});
  }

  function sortable(table) {
    const headers = table.querySelectorAll("thead th");
    headers.forEach((th, column) => {
      th.classList.add("sort");
      th.addEventListener("click", () => {
        const ascending = th.dataset.order !== "asc";
        headers.forEach(h => { delete h.dataset.order; });
        th.dataset.order = ascending ? "asc" : "desc";
        const numeric = th.dataset.type === "number";
        const key = (tr) => {
          const text = tr.children[column].textContent.trim();
          if (!numeric) return text;
          const value = parseFloat(text);
          return Number.isNaN(value) ? -Infinity : value;
        };
        const rows = [...table.tBodies[0].rows];
        rows.sort((a, b) => {
          const x = key(a), y = key(b);
          const order = numeric ? x - y : String(x).localeCompare(String(y));
          return ascending ? order : -order;
        });
        table.tBodies[0].append(...rows);
      });
    });
  }

  function jobDetail() {
    const job = JSON.parse(document.getElementById("job-data").textContent);
    const holder = document.getElementById("stages");
    holder.replaceChildren(stageGrid(job));
    document.querySelectorAll("table.sortable").forEach(sortable);
    const say = document.getElementById("action-status");
    for (const action of ["cancel", "retry"]) {
      document.getElementById(action).addEventListener("click", async () => {
        try {
          await api("POST", `/v1/jobs/${job.id}/${action}`);
          window.location.reload();
        } catch (error) {
          say.textContent = `${action} failed: ${error.message}`;
        }
      });
    }
    if (["succeeded", "failed", "cancelled"].includes(job.state)) return;
    // while it runs: refresh the bars; when it ends, reload for the results
    const refresh = async () => {
      try {
        const now = await api("GET", `/v1/jobs/${job.id}`);
        holder.replaceChildren(stageGrid(now));
        const badge = document.getElementById("job-state");
        badge.textContent = now.state;
        badge.className = `state s-${now.state}`;
        if (["succeeded", "failed", "cancelled"].includes(now.state)) { window.location.reload(); return; }
      } catch (error) {
        say.textContent = `refresh failed: ${error.message}`;
      }
      window.setTimeout(refresh, POLL_MS);
    };
    window.setTimeout(refresh, POLL_MS);
  }

  // the evaluations page: its runs and schedules part is a server-rendered fragment; an idle poll is a 304
  function evaluationList() {
    const holder = document.getElementById("evaluations-live");
    const status = document.getElementById("poll-status");
    const etag = holder.dataset.etag || null;

    async function onChange(response) {
      holder.innerHTML = await response.text();  // our own template's output, escaped by Jinja
    }

    const form = document.getElementById("evaluate-now");
    if (form) {
      form.addEventListener("submit", async (event) => {
        event.preventDefault();
        const say = document.getElementById("evaluate-status");
        const button = document.getElementById("evaluate");
        button.disabled = true;
        try {
          say.textContent = "starting…";
          const doses = document.getElementById("eval-doses").value.split(/[ ,]+/).filter(Boolean).map(Number);
          const run = await api("POST", "/v1/evaluations", {
            cohort: document.getElementById("eval-cohort").value, doses,
            protocol: document.getElementById("eval-protocol").value,
            segmenter: document.getElementById("eval-segmenter").value,
            seed: Number(document.getElementById("eval-seed").value || 7)});
          say.textContent = `run ${run.id.slice(0, 8)} ${run.state}`;
          window.location = `/evaluations/${run.id}`;
        } catch (error) {
          say.textContent = `failed: ${error.message}`;
          button.disabled = false;
        }
      });
    }
    // the page came with the fragment and its ETag: the first poll is due after one interval
    pollWithEtag({url: () => "/evaluations/live", status, etag, delay: POLL_MS, onChange});
  }

  // one evaluation run: while it runs, ask the API (which also finalises a run whose jobs have all
  // ended) and reload the page for the results once it has
  function evaluationDetail() {
    const run = JSON.parse(document.getElementById("run-data").textContent);
    document.querySelectorAll("table.sortable").forEach(sortable);
    if (run.state !== "running") return;
    const say = document.getElementById("action-status");
    const refresh = async () => {
      try {
        const now = await api("GET", `/v1/evaluations/${run.id}`);
        if (now.state !== "running") { window.location.reload(); return; }
        say.textContent = `still running (${new Date().toLocaleTimeString()})`;
      } catch (error) {
        say.textContent = `refresh failed: ${error.message}`;
      }
      window.setTimeout(refresh, POLL_MS);
    };
    window.setTimeout(refresh, POLL_MS);
  }

  return {jobList, jobDetail, evaluationList, evaluationDetail};
})();
