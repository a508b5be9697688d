// Shared helpers of the studio pages (no framework, nothing from the internet).
"use strict";
async function api(path, opts) {
  const r = await fetch(path, opts);
  if (!r.ok) {
    let msg = r.status + " " + r.statusText;
    try { const j = await r.json(); if (j.detail) msg = typeof j.detail === "string" ? j.detail : JSON.stringify(j.detail); } catch (e) {}
    const err = new Error(msg); err.status = r.status; throw err;
  }
  return r.json();
}
function enc(rel) { return rel.split("/").map(encodeURIComponent).join("/"); }
function thumbUrl(rel, size) { return "/thumb/" + enc(rel) + "?size=" + (size || 160); }
function fileUrl(rel) { return "/file/" + enc(rel); }
function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (k === "text") e.textContent = v; else e.setAttribute(k, v);
  }
  for (const k of kids) if (k != null) e.append(k);
  return e;
}
function img(rel, size, cls, title) {
  return el("img", {src: thumbUrl(rel, size), loading: "lazy", class: cls || "thumb", title: title || "", alt: title || ""});
}
function pathId(n) { return decodeURIComponent(location.pathname.split("/")[n] || ""); }
function fmtBytes(b) { return b >= 2**30 ? (b / 2**30).toFixed(2) + " GiB" : (b / 2**20).toFixed(1) + " MiB"; }
