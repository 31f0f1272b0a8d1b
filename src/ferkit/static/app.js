// The ferkit page: photos or webcam frames go to POST /v1/predict; each face is boxed with its label,
// and its seven probabilities are drawn as bars. Webcam frames are sent as one stream (?stream=ID&time=T):
// the server tracks the faces and smooths their labels over time, as `ferkit predict` does a video's,
// and each track keeps its box here. A photo too big to send is shrunk here first (a canvas), and its
// boxes scaled back to the photo's own pixels. Plain JS, no dependencies, works offline.
"use strict";

const KEY_STORE = "ferkit-api-key";
const FRAME_INTERVAL_MS = 250; // webcam frames sent a second: at most 4, one in flight at a time
// A photo over this many bytes is shrunk before it is sent (the server's --max-upload-mb is 10 by default);
// one the server still refuses as too large (413: a lower limit, or too many pixels) is sent again smaller.
const SEND_MAX_BYTES = 8 * 1024 * 1024;
const SHRINK_SIDES = [3072, 2048, 1024]; // the longest side of each smaller try, in pixels
const PHOTOS_IN_FLIGHT = 4; // requests at once: a folder of photos must not fill the server's queue (503)

const $ = (id) => document.getElementById(id);

function apiKey() { return localStorage.getItem(KEY_STORE) || ""; }

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (apiKey()) headers.set("Authorization", "Bearer " + apiKey());
  const response = await fetch(path, { ...options, headers });
  let body = null;
  try { body = await response.json(); } catch (_) { body = null; }
  if (response.status === 401) $("key-row").hidden = false;
  if (!response.ok) {
    const error = new Error((body && body.error) || `${response.status} ${response.statusText}`);
    error.status = response.status;
    throw error;
  }
  return body;
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function color(label) { return `var(--${label}, var(--accent))`; }

function topProbability(face) { return face.probabilities[face.label]; }

// Bars for one face's probabilities, in the model's class order, into `container` (reused when live).
function drawBars(container, face) {
  const names = Object.keys(face.probabilities);
  if (container.childElementCount !== names.length * 3) {
    container.replaceChildren();
    for (const name of names) {
      const track = el("div", "bar-track");
      const fill = el("div", "bar-fill");
      fill.style.setProperty("--c", color(name));
      track.append(fill);
      const label = el("span", "bar-name", name);
      label.dataset.emotion = name;
      const value = el("span", "bar-value");
      track.dataset.emotion = name;
      track.className = "bar-track bar";
      container.append(label, track, value);
    }
  }
  names.forEach((name, i) => {
    const p = face.probabilities[name];
    const [label, track, value] = [container.children[3 * i], container.children[3 * i + 1], container.children[3 * i + 2]];
    label.classList.toggle("top", name === face.label);
    track.firstChild.style.width = `${(100 * p).toFixed(1)}%`;
    track.setAttribute("aria-valuenow", p.toFixed(3));
    value.textContent = p.toFixed(2);
  });
}

// A face's name on the page: its track id in a stream ("#3"), else its number in the photo ("1:").
function faceName(face, i) { return face.track != null ? `#${face.track}` : `${i + 1}:`; }

// Boxes as percentages of the image's size, so they follow it at any display size: `layer` is the
// image's .frame (or an overlay filling it), exactly the image as drawn. A tracked face keeps its box
// element from frame to frame (so it glides instead of blinking).
function drawBoxes(layer, record, className) {
  const kept = new Map();
  layer.querySelectorAll(".box").forEach((box) => {
    if (box.dataset.track) kept.set(box.dataset.track, box); else box.remove();
  });
  record.faces.forEach((face, i) => {
    const [x, y, w, h] = face.box;
    const track = face.track != null ? String(face.track) : "";
    const box = kept.get(track) || el("div", `box ${className || ""}`);
    kept.delete(track);
    box.style.left = `${(100 * x) / record.width}%`;
    box.style.top = `${(100 * y) / record.height}%`;
    box.style.width = `${(100 * w) / record.width}%`;
    box.style.height = `${(100 * h) / record.height}%`;
    box.style.setProperty("--c", color(face.label));
    box.dataset.box = face.box.join(",");
    if (track) box.dataset.track = track;
    const label = box.firstChild || el("span", "box-label");
    label.textContent = `${faceName(face, i)} ${face.label} ${topProbability(face).toFixed(2)}`;
    label.dataset.label = face.label;
    if (!label.parentNode) box.append(label);
    if (!box.parentNode) layer.append(box);
  });
  kept.forEach((box) => box.remove());
}

// ------------------------------------------------------------------------------------------------
// Photos

async function predictFiles(files) {
  const images = [...files];
  if (!images.length) return;
  const status = $("photo-status");
  status.className = "status";
  status.textContent = `reading ${images.length} photo${images.length > 1 ? "s" : ""}…`;
  const detect = $("detect").checked;
  // The newest pick on top, its photos in the order picked. One request per photo: each shows as soon
  // as it is read, and a bad one is reported in its own card beside the others.
  const batch = el("div", "batch");
  $("results").prepend(batch);
  const cards = images.map((file) => batch.appendChild(el("article", "result", `${file.name}: waiting…`)));
  let done = 0, failed = 0, next = 0;
  const read = async (file, card) => {
    try {
      const { record, sent } = await predictPhoto(file, detect);
      if (record.error) throw new Error(record.error);
      renderPhoto(card, file, record, sent);
    } catch (err) {
      failed += 1;
      card.replaceChildren(el("h3", "", file.name), el("p", "error", err.message));
    }
    done += 1;
    status.textContent = `${done} of ${images.length} read` + (failed ? `, ${failed} failed` : "");
  };
  const worker = async () => {
    while (next < images.length) { const i = next++; await read(images[i], cards[i]); }
  };
  await Promise.all(Array.from({ length: Math.min(PHOTOS_IN_FLIGHT, images.length) }, worker));
}

// A photo's record, its boxes in the photo's own pixels, and the copy sent (null: the photo itself).
async function predictPhoto(file, detect) {
  const sides = file.size > SEND_MAX_BYTES ? SHRINK_SIDES : [null, ...SHRINK_SIDES];
  for (let i = 0; ; i += 1) { // until a try answers, or fails for good
    const side = sides[i];
    const copy = side === null ? null : await shrink(file, side);
    if (copy && copy.blob.size > SEND_MAX_BYTES && i + 1 < sides.length) continue;
    const form = new FormData();
    form.append("files", copy ? copy.blob : file, file.name);
    try {
      const [record] = await api(`/v1/predict?detect=${detect}`, { method: "POST", body: form });
      return { record: copy ? inOriginalPixels(record, copy) : record, sent: copy };
    } catch (err) {
      // Too large: try smaller, unless the browser could not read it (then the server's answer says why).
      const smaller = err.status === 413 && i + 1 < sides.length && (side === null || copy !== null);
      if (!smaller) throw err;
    }
  }
}

// The photo drawn on a canvas at most `side` pixels on its longest side, as a JPEG; null when the
// browser cannot decode it. EXIF orientation is applied, as the <img> and the server apply it.
async function shrink(file, side) {
  let bitmap;
  try { bitmap = await createImageBitmap(file, { imageOrientation: "from-image" }); } catch (_) { return null; }
  const scale = Math.min(1, side / Math.max(bitmap.width, bitmap.height));
  const canvas = document.createElement("canvas");
  canvas.width = Math.max(1, Math.round(bitmap.width * scale));
  canvas.height = Math.max(1, Math.round(bitmap.height * scale));
  const context = canvas.getContext("2d");
  context.fillStyle = "#fff"; // transparent pixels: white, not the JPEG's black
  context.fillRect(0, 0, canvas.width, canvas.height);
  context.imageSmoothingQuality = "high";
  context.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
  const blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/jpeg", 0.92));
  const copy = { blob, width: canvas.width, height: canvas.height, fromWidth: bitmap.width,
    fromHeight: bitmap.height };
  bitmap.close();
  return blob ? copy : null;
}

// The record of a shrunk copy with its boxes and size scaled back to the photo's own pixels.
function inOriginalPixels(record, copy) {
  if (record.error) return record;
  const sx = copy.fromWidth / copy.width, sy = copy.fromHeight / copy.height;
  const faces = record.faces.map((face) => {
    const [x, y, w, h] = face.box;
    return { ...face, box: [Math.round(x * sx), Math.round(y * sy), Math.round(w * sx), Math.round(h * sy)] };
  });
  return { ...record, faces, width: copy.fromWidth, height: copy.fromHeight };
}

function renderPhoto(card, file, record, sent) {
  const picture = el("div", "picture");
  const frame = el("div", "frame");
  const img = el("img");
  img.alt = file.name;
  img.src = URL.createObjectURL(file);
  frame.append(img);
  drawBoxes(frame, record);
  picture.append(frame);
  if (sent) {
    picture.append(el("p", "muted shrunk", `${(file.size / 1e6).toFixed(1)} MB, ${sent.fromWidth}x${sent.fromHeight}: ` +
      `sent shrunk to ${sent.width}x${sent.height}`));
  }
  const faces = el("div", "faces");
  faces.append(el("h3", "", `${record.path}: ${record.faces.length} face${record.faces.length === 1 ? "" : "s"}`));
  if (!record.faces.length) faces.append(el("p", "muted", "no face found"));
  record.faces.forEach((face, i) => {
    const block = el("div", "face");
    const title = el("div", "face-title", `Face ${i + 1}: `);
    const label = el("span", "label", face.label);
    label.style.color = color(face.label);
    title.append(label, ` (${topProbability(face).toFixed(2)})`);
    const bars = el("div", "bars");
    drawBars(bars, face);
    block.append(title, bars);
    faces.append(block);
  });
  card.replaceChildren(picture, faces);
}

// ------------------------------------------------------------------------------------------------
// Webcam

const webcam = { stream: null, timer: null, busy: false, canvas: document.createElement("canvas"), sent: 0, id: "",
  started: 0 };

function newStreamId() {
  const bytes = crypto.getRandomValues(new Uint8Array(12));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

async function startWebcam() {
  const status = $("webcam-status");
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    status.textContent = "this browser has no camera access here (it needs https or localhost)";
    status.className = "status error";
    return;
  }
  try {
    webcam.stream = await navigator.mediaDevices.getUserMedia({ video: { width: 640, height: 480 }, audio: false });
  } catch (err) {
    status.textContent = `no camera: ${err.message || err.name}`;
    status.className = "status error";
    return;
  }
  $("video").srcObject = webcam.stream;
  $("webcam-start").disabled = true;
  $("webcam-stop").disabled = false;
  status.className = "status";
  status.textContent = "live";
  webcam.id = newStreamId(); // a new stream: new tracks, nothing smoothed over from before
  webcam.started = performance.now();
  webcam.timer = setInterval(sendFrame, FRAME_INTERVAL_MS);
}

function stopWebcam() {
  clearInterval(webcam.timer);
  webcam.timer = null;
  if (webcam.stream) webcam.stream.getTracks().forEach((track) => track.stop());
  webcam.stream = null;
  $("video").srcObject = null;
  $("overlay").replaceChildren();
  $("webcam-start").disabled = false;
  $("webcam-stop").disabled = true;
  $("webcam-status").textContent = "stopped";
}

async function sendFrame() {
  const video = $("video");
  if (webcam.busy || !video.videoWidth) return;
  webcam.busy = true;
  const started = performance.now();
  try {
    const { canvas } = webcam;
    canvas.width = video.videoWidth;
    canvas.height = video.videoHeight;
    canvas.getContext("2d").drawImage(video, 0, 0);
    const seconds = ((performance.now() - webcam.started) / 1000).toFixed(3); // when the frame was taken
    const blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/jpeg", 0.85));
    const form = new FormData();
    form.append("files", blob, `frame-${webcam.sent++}.jpg`);
    const [record] = await api(`/v1/predict?stream=${webcam.id}&time=${seconds}`, { method: "POST", body: form });
    if (!webcam.stream) return;
    drawBoxes($("overlay"), record, "live-box");
    const face = record.faces[0];
    $("live-label").textContent = face ? `${faceName(face, 0)} ${face.label} ${topProbability(face).toFixed(2)}` :
      "no face";
    $("live-label").style.color = face ? color(face.label) : "";
    if (face) drawBars($("live-bars"), face);
    $("webcam-status").className = "status";
    $("webcam-status").textContent = `live: ${record.faces.length} face${record.faces.length === 1 ? "" : "s"}, ` +
      `${Math.round(performance.now() - started)} ms a frame`;
  } catch (err) {
    $("webcam-status").className = "status error";
    $("webcam-status").textContent = err.message;
  } finally {
    webcam.busy = false;
  }
}

// ------------------------------------------------------------------------------------------------
// Page

function showTab(name) {
  for (const tab of ["photos", "webcam"]) {
    $(`tab-${tab}`).setAttribute("aria-selected", String(tab === name));
    $(`${tab}-panel`).hidden = tab !== name;
  }
  if (name !== "webcam" && webcam.stream) stopWebcam();
}

async function showModel() {
  try {
    const models = await api("/v1/models");
    const model = models.find((m) => m.loaded);
    const accuracy = model.accuracy.test ?? model.accuracy.val;
    $("model-info").textContent = `model: ${model.name} (${model.arch}, ${model.views_per_face} view` +
      `${model.views_per_face === 1 ? "" : "s"} a face` +
      (accuracy != null ? `, ${(100 * accuracy).toFixed(1)}% ${model.accuracy.test != null ? "test" : "validation"} accuracy` : "") + ")";
  } catch (err) {
    $("model-info").textContent = `model information unavailable: ${err.message}`;
  }
}

function init() {
  $("tab-photos").addEventListener("click", () => showTab("photos"));
  $("tab-webcam").addEventListener("click", () => showTab("webcam"));
  $("file-input").addEventListener("change", (event) => predictFiles(event.target.files));
  const zone = $("drop-zone");
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("dragging"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    predictFiles(event.dataTransfer.files);
  });
  $("webcam-start").addEventListener("click", startWebcam);
  $("webcam-stop").addEventListener("click", stopWebcam);
  $("api-key").value = apiKey();
  $("save-key").addEventListener("click", () => {
    localStorage.setItem(KEY_STORE, $("api-key").value.trim());
    $("key-row").hidden = true;
    showModel();
  });
  showModel();
}

init();
