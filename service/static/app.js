// Demo page: calls the public API (/reconstruct as JSON, /classify, /search when /info names a gallery) with the
// chosen image and options; opens with the first bundled sample chosen.
"use strict";

const $ = (id) => document.getElementById(id);
const NEIGHBORS = 8;  // gallery images shown per query
const state = { image: null, busy: false, again: false, timer: null, gallery: null, thumbnails: [] };

function headers() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function form(image, extra) {
  const body = new FormData();
  body.append("image", image, image.name || "image.png");
  for (const [k, v] of Object.entries(extra)) body.append(k, v);
  return body;
}

async function call(path, image, extra) {
  const response = await fetch(path, { method: "POST", headers: headers(), body: form(image, extra) });
  const body = await response.json();
  if (response.status === 401) $("key-row").hidden = false;
  return { status: response.status, body };
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

function showReconstruction(body) {
  const item = body.data[0];
  for (const name of ["original", "masked", "reconstruction", "pasted"]) {
    $(`img-${name}`).src = `data:image/png;base64,${item.images[name]}`;
  }
  if ($("seed").value === "") $("seed").value = body.seed;
  const visible = body.grid.num_visible, total = body.grid.num_patches;
  $("scores").textContent =
    `${visible} of ${total} patches visible · seed ${body.seed} · MSE on hidden patches ` +
    `${item.mse_masked_pixels.toFixed(4)} (pixels)` +
    (body.denormalized_with_target_stats ? " · hidden patches use the original's patch mean and std" : "");
  const result = $("result");
  result.hidden = false;
  result.dataset.ratio = String(body.mask_ratio);
  result.dataset.seed = String(body.seed);
}

function showLabels(response) {
  const list = $("label-list");
  list.replaceChildren();
  if (response.status !== 200) {
    $("labels").hidden = response.status === 404;  // no classifier in this model
    if (response.status !== 404) setStatus(response.body.error.message, true);
    return;
  }
  for (const p of response.body.data[0].predictions) {
    const li = document.createElement("li");
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.width = `${Math.round(p.score * 100)}%`;
    li.append(`${p.label} `, bar, ` ${(p.score * 100).toFixed(1)}%`);
    list.append(li);
  }
  $("labels").hidden = false;
}

async function thumbnail(id) {
  // fetched, not an <img src>, so that the API key (when one is set) goes with the request
  const response = await fetch(`/gallery/${id}/image`, { headers: headers() });
  if (!response.ok) return null;
  const url = URL.createObjectURL(await response.blob());
  state.thumbnails.push(url);
  return url;
}

async function showNeighbors(response) {
  if (!state.gallery) return;
  if (response.status !== 200) {
    setStatus(response.body.error ? response.body.error.message : `search error ${response.status}`, true);
    return;
  }
  const neighbors = response.body.data[0].neighbors;
  const previous = state.thumbnails.splice(0);
  const urls = state.gallery.images ? await Promise.all(neighbors.map((n) => thumbnail(n.id))) : [];
  previous.forEach((url) => URL.revokeObjectURL(url));  // the last query's pictures, replaced below
  const figures = neighbors.map((n, i) => {
    const figure = document.createElement("figure");
    const img = document.createElement("img");
    img.alt = n.label || n.path || `item ${n.id}`;
    if (urls[i]) img.src = urls[i];
    const caption = document.createElement("figcaption");
    caption.textContent = `${n.label ?? "–"} · ${n.score.toFixed(3)}`;
    figure.dataset.id = String(n.id);
    figure.append(img, caption);
    return figure;
  });
  $("neighbor-list").replaceChildren(...figures);
  $("neighbors").hidden = false;
}

async function run() {
  if (!state.image) return;
  if (state.busy) { state.again = true; return; }
  state.busy = true;
  setStatus("working…");
  try {
    const options = { mask_ratio: $("ratio").value, response_format: "json" };
    if ($("seed").value !== "") options.seed = $("seed").value;
    const image = state.image;
    const [rec, cls, near] = await Promise.all([
      call("/reconstruct", image, options), call("/classify", image, { top_k: 5 }),
      state.gallery ? call("/search", image, { k: Math.min(NEIGHBORS, state.gallery.size) }) : null]);
    if (rec.status === 200) {
      showReconstruction(rec.body);
      $("result").dataset.image = image.name || "";
      setStatus("");
    } else {
      setStatus(rec.body.error ? rec.body.error.message : `error ${rec.status}`, true);
    }
    showLabels(cls);
    if (near) await showNeighbors(near);
  } catch (err) {
    setStatus(`request failed: ${err}`, true);
  } finally {
    state.busy = false;
    if (state.again) { state.again = false; run(); }
  }
}

function schedule() {
  clearTimeout(state.timer);
  state.timer = setTimeout(run, 120);
}

function useImage(blob) {
  state.image = blob;
  $("seed").value = "";
  run();
}

async function useSample(sample) {
  const blob = await (await fetch(sample.url)).blob();
  useImage(new File([blob], `${sample.name}.png`, { type: blob.type }));
}

async function loadSamples() {
  const response = await fetch("/samples");
  if (!response.ok) return [];
  const samples = await response.json();
  for (const sample of samples) {
    const button = document.createElement("button");
    button.type = "button";
    button.title = sample.name;
    const img = document.createElement("img");
    img.src = sample.url;
    img.alt = sample.name;
    button.append(img);
    button.addEventListener("click", () => useSample(sample));
    $("samples").append(button);
  }
  return samples;
}

async function loadInfo() {
  const response = await fetch("/info", { headers: headers() });
  if (!response.ok) return;  // 401 when keys are configured: the page still works once a key is typed
  const info = await response.json();
  const a = info.model.architecture;
  $("model-line").textContent = `${info.model.name} · ${a.img_size}×${a.img_size} pixels in ${a.num_patches} ` +
    `patches of ${a.patch_size}×${a.patch_size} · ${info.runtime.device}`;
  state.gallery = info.gallery;
  if (info.gallery) {
    $("gallery-line").textContent = `${info.gallery.origin} · cosine similarity of ${info.gallery.source} ` +
      `embeddings${info.gallery.pooling ? ` (${info.gallery.pooling})` : ""}`;
  }
}

function init() {
  $("file").addEventListener("change", () => { if ($("file").files[0]) useImage($("file").files[0]); });
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files[0]) useImage(e.dataTransfer.files[0]);
  });
  $("ratio").addEventListener("input", () => { $("ratio-value").textContent = $("ratio").value; schedule(); });
  $("seed").addEventListener("change", schedule);
  $("reseed").addEventListener("click", () => { $("seed").value = ""; run(); });
  $("api-key").addEventListener("change", schedule);
  // the page opens with the first sample chosen, once /info has said whether there is a gallery to search
  Promise.all([loadSamples(), loadInfo()]).then(([samples]) => {
    if (samples.length && !state.image) useSample(samples[0]);
  });
  document.body.dataset.ready = "true";
}

init();
