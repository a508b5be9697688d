// Labelling page: marks are events sent in order to the server journal; the shown state is
// the server's fold of every tab's events (plus this tab's not yet acknowledged ones).
"use strict";
const setId = pathId(2);
const tab = Math.random().toString(36).slice(2, 10) + Date.now().toString(36);
const pendingKey = "studio-pending-" + setId;
let data = null, idx = 0, marks = {}, undoStack = [];
let pending = JSON.parse(localStorage.getItem(pendingKey) || "[]");  // survives a closed tab
let sending = false;

function newId() { return tab + "-" + Date.now().toString(36) + "-" + Math.random().toString(36).slice(2, 8); }
function setStatus(s, cls) { const e = document.getElementById("status"); e.textContent = s; e.className = cls; }
function savePending() { localStorage.setItem(pendingKey, JSON.stringify(pending)); }

function applyLocal(ev) {  // optimistic view of one event
  if (ev.undo) return;
  const m = marks[ev.scenario] = marks[ev.scenario] || {};
  if (ev.label === "none") delete m[ev.candidate]; else m[ev.candidate] = ev.label;
}
function acceptServer(res) {
  marks = res.marks;
  for (const ev of pending) applyLocal(ev);
  showProgress(res.progress);
  render();
}
async function pump() {
  if (sending) return;
  sending = true;
  while (pending.length) {
    setStatus(`saving ${pending.length}\u2026`, "saving");
    try {
      const res = await api(`/api/sets/${setId}/marks`, {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(pending[0])});
      pending.shift(); savePending(); acceptServer(res);
    } catch (e) {
      if (e.status && e.status < 500) { pending.shift(); savePending(); alert("mark refused: " + e.message); continue; }
      setStatus("server unreachable, retrying\u2026", "offline");
      await new Promise(r => setTimeout(r, 1000));
    }
  }
  setStatus("saved", "saved");
  sending = false;
}
function send(ev) { pending.push(ev); savePending(); applyLocal(ev); render(); pump(); }

function mark(k, label) {
  const s = data.scenarios[idx];
  if (!s || k >= s.candidates.length) return;
  const cur = (marks[s.id] || {})[k];
  const ev = {id: newId(), tab, scenario: s.id, candidate: k, label: cur === label ? "none" : label};
  undoStack.push(ev.id); send(ev);
}
function undo() { const id = undoStack.pop(); if (id) send({id: newId(), tab, undo: id}); }
function go(d) { idx = Math.max(0, Math.min(data.scenarios.length - 1, idx + d)); history.replaceState(null, "", "#" + idx); render(); }
function showProgress(p) {
  document.getElementById("progress").textContent = `${p.labelled} of ${p.scenarios} scenarios have a winner and a loser`;
}
let shown = -1;
function render() {
  const s = data.scenarios[idx];
  document.getElementById("scenario-index").textContent = `scenario ${idx + 1} of ${data.scenarios.length}: ${s.id}`;
  document.getElementById("prev").disabled = idx === 0;
  document.getElementById("next").disabled = idx === data.scenarios.length - 1;
  if (shown !== idx) {  // rebuild the pictures only when the scenario changes
    document.getElementById("prompt").textContent = s.prompt;
    document.getElementById("characters").textContent = s.characters.length ? "characters: " + s.characters.join(", ") : "";
    document.getElementById("refs").replaceChildren(...s.references.map((r, j) =>
      el("div", {class: "ref"}, img(r, 256, "", "reference " + (j + 1)), el("div", {class: "muted", text: s.characters[j] || "reference " + (j + 1)}))));
    document.getElementById("cands").replaceChildren(...s.candidates.map(c =>
      el("div", {class: "cand", "data-k": c.k},
        c.exists ? img(c.file, 256, "", "candidate " + (c.k + 1)) : el("div", {class: "muted", text: "not drawn yet"}),
        el("div", {class: "bar"}, el("span", {class: "num", text: c.k + 1}),
          el("button", {class: "win", onclick: () => mark(c.k, "winner"), text: "winner"}),
          el("button", {class: "lose", onclick: () => mark(c.k, "loser"), text: "loser"}),
          el("span", {class: "mark"})),
        el("div", {class: "muted", text: "seed " + c.seed}))));
    shown = idx;
  }
  const m = marks[s.id] || {};
  document.querySelectorAll(".cand").forEach(e => {
    const l = m[e.dataset.k];
    e.classList.toggle("winner", l === "winner"); e.classList.toggle("loser", l === "loser");
  });
}
document.addEventListener("keydown", ev => {
  if (ev.ctrlKey && ev.key === "z") { undo(); ev.preventDefault(); return; }
  if (ev.ctrlKey || ev.altKey || ev.metaKey) return;
  const dm = /^Digit([0-9])$/.exec(ev.code) || /^Numpad([0-9])$/.exec(ev.code);
  if (dm) { const n = parseInt(dm[1], 10); mark(n === 0 ? 9 : n - 1, ev.shiftKey ? "loser" : "winner"); ev.preventDefault(); }
  else if (ev.key === "n" || ev.key === "ArrowRight") go(1);
  else if (ev.key === "p" || ev.key === "ArrowLeft") go(-1);
  else if (ev.key === "u") undo();
});
document.getElementById("prev").onclick = () => go(-1);
document.getElementById("next").onclick = () => go(1);
document.getElementById("undo").onclick = undo;
document.getElementById("export").onclick = async () => {
  const out = document.getElementById("export-result");
  try {
    const r = await api(`/api/sets/${setId}/export`, {method: "POST"});
    out.textContent = `wrote ${r.path}: ${r.pairs} pairs from ${r.scenarios} scenarios` + (r.skipped.length ? `; skipped (no winner and loser): ${r.skipped.join(", ")}` : "");
    out.dataset.pairs = r.pairs;
  } catch (e) { out.textContent = "export failed: " + e.message; }
};
async function load() {
  data = await api(`/api/sets/${setId}`);
  document.getElementById("title").textContent = "label \u2014 " + data.path;
  idx = Math.max(0, Math.min(data.scenarios.length - 1, parseInt(location.hash.slice(1) || "0", 10) || 0));
  acceptServer({marks: data.marks, progress: data.progress});
  pump();
  setInterval(async () => {  // other tabs' marks
    if (pending.length || sending) return;
    try { acceptServer(await api(`/api/sets/${setId}/marks`)); } catch (e) {}
  }, 3000);
}
load();
