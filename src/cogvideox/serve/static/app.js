// The page: submit a prompt, poll the queue, show each video with its progress, then play it in place.
// Plain DOM, no build step. Cards are kept by id and updated in place, so a playing video is never reloaded.
"use strict";

const $ = (selector) => document.querySelector(selector);
const cards = new Map(); // id -> card element
let apiKey = localStorage.getItem("cogvideox-api-key") || "";
let model = null;

// A request the server turned away for want of the right key: the page waits for one (refresh stops polling).
class NeedsKey extends Error {}

async function api(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  const sent = apiKey;
  if (sent) headers.Authorization = `Bearer ${sent}`;
  let response;
  try {
    response = await fetch(path, { ...options, headers });
  } catch (_) { // the network failed: the server is down or restarting, or the connection is gone
    throw new Error("cannot reach the server; is it running?");
  }
  if (response.status === 401) {
    if (apiKey && apiKey !== sent) return api(path, options); // a key given meanwhile: asked again with it
    if (sent && apiKey === sent) { // a wrong key is forgotten, so the next visit asks again
      apiKey = "";
      localStorage.removeItem("cogvideox-api-key");
    }
    askForKey();
    throw new NeedsKey(sent ? "the server refused this API key; enter the right one" : "this server needs an API key");
  }
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try { message = (await response.json()).error.message; } catch (_) { /* not JSON */ }
    throw new Error(message);
  }
  return response;
}

function askForKey() {
  const form = $("#key-form");
  if (!form.hidden) return;
  form.hidden = false;
  if (document.activeElement === document.body) $("#api-key").focus(); // nobody is typing elsewhere
}

function say(text, isError = false) {
  const message = $("#message");
  message.textContent = text;
  message.classList.toggle("error", isError);
}

async function loadModel() {
  const { data } = await (await api("/v1/models")).json();
  model = data[0];
  const clip = `${inSeconds(model.num_frames / model.fps)} at ${model.fps} fps`;
  $("#model").textContent = `${model.id} · ${model.default_size} · ${clip}`;
  const size = $("#size");
  size.replaceChildren(...model.sizes.map((s) => new Option(s, s)));
  $("#num_inference_steps").max = model.max_steps;
  $("#num_inference_steps").placeholder = model.num_inference_steps; // left empty: the server's default
  $("#seconds").placeholder = model.max_seconds; // not rounded: 6.125 shown as 6.13 would be over the max
  $("#guidance_scale").placeholder = model.guidance_scale;
  // An image-to-video model starts every video from a picture; a text-to-video model may redraw a video;
  // a model with RoPE can go longer with RIFLEx.
  const picture = Boolean(model.image_to_video);
  $("#input-label").textContent = picture ? "First frame" : "Video to redraw (optional)";
  $("#input_reference").accept = picture ? "image/png,image/jpeg,image/webp" : "video/*";
  $("#input_reference").required = picture;
  $("#input-file").hidden = false;
  $("#last-file").hidden = !picture;
  $("#riflex-option").hidden = !model.riflex_max_seconds;
  $("#riflex").disabled = !model.riflex_max_seconds || Boolean(remixing); // a remix keeps the video's
  const loras = model.loras || []; // the server's LoRAs, one chosen per video here (the API takes several)
  $("#lora").replaceChildren(new Option("none", ""), ...loras.map((name) => new Option(name, name)));
  offer("#lora-option", loras.length);
  offer("#lora-scale-option", loras.length);
  longest();
  chosen();
}

function offer(option, shown) { // an option shown, or hidden with its fields disabled: a value left in one
  $(option).hidden = !shown; // neither holds the form back (the browser cannot point at it) nor is sent
  for (const field of $(option).querySelectorAll("input, select")) field.disabled = !shown;
}

function sendsVideo() { // a video chosen for a text-to-video model to redraw (not while remixing)
  return Boolean(!remixing && model && !model.image_to_video && $("#input_reference").files.length);
}

function inSeconds(seconds) { // exact: 49 frames at 8 fps are 6.125 s, not 6.13 (over the longest clip)
  if (Number(seconds.toFixed(6)) === seconds) return `${seconds} s`; // 81 frames at 16 fps: 5.0625 s
  return `about ${seconds.toFixed(3)} s`; // 49 frames at 12 fps: 4.0833…
}

function longest() { // the seconds a request may ask for: twice as long with RIFLEx
  if (!model) return;
  const seconds = $("#riflex").checked && model.riflex_max_seconds ? model.riflex_max_seconds : model.max_seconds;
  $("#seconds").max = seconds;
  $("#seconds").title = `at most ${inSeconds(seconds)}`;
}

function chosen() { // a file chosen (or none): the picture shown small; the fit, and a video's strength, offered
  $("#remove-input").hidden = !$("#input_reference").files.length;
  $("#remove-last").hidden = !$("#last_frame").files.length;
  const image = $("#first-frame-preview");
  if (image.src.startsWith("blob:")) URL.revokeObjectURL(image.src);
  const [file] = $("#input_reference").files;
  const picture = Boolean(model && model.image_to_video);
  image.hidden = !(file && picture);
  image.src = file && picture ? URL.createObjectURL(file) : "";
  offer("#resize-option", picture || sendsVideo());
  offer("#strength-option", remixing || sendsVideo());
}

let remixing = null; // the completed video the form remixes, or null to create one

function remixMode(video) { // video: remix it; null: back to creating
  remixing = video;
  $("#remixing").hidden = !video;
  $("#remix-of").textContent = video ? video.prompt : "";
  $("#input-file").hidden = Boolean(video); // a remix redraws the served video
  chosen();
  for (const name of ["size", "seconds"]) { // a remix keeps the video's
    $(`#${name}`).disabled = Boolean(video);
  }
  $("#riflex").disabled = Boolean(video) || !(model && model.riflex_max_seconds);
  for (const name of ["num_inference_steps", "guidance_scale", "seed"]) { // and defaults to its settings
    const input = $(`#${name}`);
    input.dataset.own ??= input.placeholder; // the creating form's, the first time through
    input.placeholder = video ? "the video's" : input.dataset.own;
  }
  $("#lora").options[0].text = video ? "the video's" : "none"; // a remix keeps the video's LoRAs by default
  $("#submit").textContent = video ? "Remix" : "Generate";
  if (video) { // what the prompt is for now, heard as the focus comes to it (the note above it is not)
    $("#prompt").setAttribute("aria-describedby", "remix-note");
    $("#prompt").value = video.prompt;
    $("#prompt").focus();
  } else {
    $("#prompt").removeAttribute("aria-describedby");
  }
}

async function submit(event) {
  event.preventDefault();
  if ($("#submit").disabled) return; // the last one is still on its way
  const body = { prompt: $("#prompt").value };
  const texts = remixing ? ["negative_prompt"] : ["negative_prompt", "size"];
  const numbers = remixing || sendsVideo() ? ["num_inference_steps", "guidance_scale", "seed", "strength"]
    : ["seconds", "num_inference_steps", "guidance_scale", "seed"];
  if (sendsVideo()) numbers.push("seconds");
  const fields = (names) => names.map((name) => $(`#${name}`)).filter((field) => !field.disabled);
  for (const field of fields(texts)) {
    if (field.value) body[field.name] = field.value;
  }
  for (const field of fields(numbers)) {
    if (field.value !== "") body[field.name] = Number(field.value);
  }
  if (!remixing && $("#riflex").checked) body.riflex = true;
  if ($("#lora").value) { // "name" or "name:scale", the form the API takes in JSON and in forms alike
    const scale = $("#lora_scale").value;
    body.lora = scale === "" ? $("#lora").value : `${$("#lora").value}:${Number(scale)}`;
  }
  let request = { headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  if (!remixing && model && (model.image_to_video || sendsVideo())) { // the file goes in a multipart form
    const form = new FormData();
    for (const [name, value] of Object.entries(body)) form.append(name, String(value));
    form.append("resize", $("#resize").value);
    form.append("input_reference", $("#input_reference").files[0]);
    const [last] = $("#last_frame").files;
    if (model.image_to_video && last) form.append("last_frame", last);
    request = { body: form }; // the browser writes the multipart Content-Type, with its boundary
  }
  $("#submit").disabled = true;
  try {
    const path = remixing ? `/v1/videos/${remixing.id}/remix` : "/v1/videos";
    const video = await (await api(path, { method: "POST", ...request })).json();
    say(`Queued ${video.id}`);
    render(video, true);
    if (remixing) remixMode(null);
    schedule(300);
  } catch (error) {
    say(error.message, true);
  } finally {
    $("#submit").disabled = false;
  }
}

function describe(video) {
  const parts = [`seed ${video.seed}`, video.size, `${video.num_frames} frames at ${video.fps} fps`, `${video.num_inference_steps} steps`];
  const timings = Object.entries(video.timings || {});
  if (timings.length) {
    const total = timings.reduce((sum, [, seconds]) => sum + seconds, 0);
    parts.push(`${total.toFixed(1)} s (${timings.map(([stage, s]) => `${stage} ${s.toFixed(1)}`).join(", ")})`);
  }
  if (video.remixed_from_video_id) {
    parts.push(`remix of ${video.remixed_from_video_id} at strength ${video.strength}`);
  }
  if (video.input_reference) {
    const redrawn = video.strength && !video.remixed_from_video_id ? ` at strength ${video.strength}` : "";
    parts.push(`from ${video.input_reference} (${video.resize})${redrawn}`);
  }
  if (video.last_frame) parts.push(`to ${video.last_frame}`);
  if (video.riflex) parts.push("RIFLEx");
  if (video.lora) parts.push(`LoRA ${video.lora.map((l) => `${l.name} ×${l.scale}`).join(", ")}`);
  if (video.expires_at) parts.push(`kept until ${new Date(video.expires_at * 1000).toLocaleString()}`);
  return parts.join(" · ");
}

async function attachVideo(card, video) {
  const url = `/v1/videos/${video.id}/content`;
  // A <video> cannot send a Bearer header: with a key, fetch the file and play it from memory.
  const src = apiKey ? URL.createObjectURL(await (await api(url)).blob()) : url;
  const player = document.createElement("video");
  // It plays at once, looping, unless the user asked for less motion (prefers-reduced-motion): then on a click
  const still = window.matchMedia("(prefers-reduced-motion: reduce)").matches;
  Object.assign(player, { src, controls: true, loop: true, muted: true, autoplay: !still, playsInline: true, preload: "auto" });
  // Its text alternative (the clip has no sound): named by its prompt, described by its settings
  player.setAttribute("aria-labelledby", `prompt-${video.id}`);
  player.setAttribute("aria-describedby", `details-${video.id}`);
  card.querySelector(".player").replaceChildren(player);
  const download = card.querySelector(".download");
  download.href = src;
  download.download = `${video.id}.mp4`;
  download.hidden = false;
  card.querySelector(".remix").hidden = Boolean(model && model.image_to_video); // the API remixes text-to-video only
  const gif = card.querySelector(".gif"); // made by the server on the first request
  gif.download = `${video.id}.gif`;
  if (apiKey) { // a link cannot send a Bearer header either: fetched on the first click, then kept
    gif.href = "#";
    gif.onclick = async (event) => {
      if (gif.href.startsWith("blob:")) return; // the second, programmatic click downloads it
      event.preventDefault();
      try {
        gif.href = URL.createObjectURL(await (await api(`${url}?variant=gif`)).blob());
        gif.click();
      } catch (error) {
        say(error.message, true);
      }
    };
  } else {
    gif.href = `${url}?variant=gif`;
  }
  gif.hidden = false;
}

function render(video, prepend = false) {
  let card = cards.get(video.id);
  if (!card) {
    card = $("#card").content.firstElementChild.cloneNode(true);
    card.dataset.id = video.id;
    const prompt = card.querySelector(".prompt");
    prompt.textContent = video.enhanced_prompt ? `${video.prompt} → ${video.enhanced_prompt}` : video.prompt;
    prompt.id = `prompt-${video.id}`; // describes the card's controls: which video a "Delete" deletes
    card.querySelector(".details").id = `details-${video.id}`;
    for (const control of card.querySelectorAll(".actions > *, progress")) {
      control.setAttribute("aria-describedby", prompt.id);
    }
    card.querySelector(".delete").addEventListener("click", () => remove(video.id));
    card.querySelector(".remix").addEventListener("click", () => remixMode(video));
    cards.set(video.id, card);
    if (prepend) $("#videos").prepend(card); else $("#videos").append(card);
  }
  const previous = card.dataset.status;
  card.dataset.status = video.status;
  card.querySelector(".status").textContent = video.status.replace("_", " ");
  card.querySelector("progress").value = video.progress;
  card.querySelector(".percent").textContent = video.status === "in_progress" ? `${video.progress}%` : "";
  card.querySelector(".details").textContent = describe(video);
  card.querySelector(".error").textContent = video.error ? video.error.message : "";
  card.querySelector(".delete").textContent = ["queued", "in_progress"].includes(video.status) ? "Cancel" : "Delete";
  if (previous && previous !== video.status) tell(video);
  if (video.status === "completed" && (previous !== "completed" || card.needsKey)) {
    card.needsKey = false;
    attachVideo(card, video).catch((error) => {
      card.needsKey = error instanceof NeedsKey; // fetched again by the refresh the key given starts
      say(error.message, true);
    });
  }
  $("#empty").hidden = cards.size > 0;
}

function tell(video) { // a video's new status, for a screen reader: the cards are not live regions (every poll
  const line = document.createElement("p"); // rewrites them), this log is, and it keeps the last few lines
  line.textContent = `Video “${video.prompt}” ${video.status.replace("_", " ")}`
    + (video.error ? `: ${video.error.message}` : "");
  const news = $("#news");
  news.append(line);
  while (news.children.length > 5) news.firstElementChild.remove();
}

function drop(id) { // a card off the page, with the downloaded copy of its video (fetched with a key)
  const card = cards.get(id);
  if (!card) return;
  if (remixing && remixing.id === id) remixMode(null); // its video is gone
  if (card.contains(document.activeElement)) { // the focus not lost with it: on the next card's, or the prompt
    const next = card.nextElementSibling || card.previousElementSibling;
    (next ? next.querySelector(".delete") : $("#prompt")).focus();
  }
  const player = card.querySelector("video");
  if (player && player.src.startsWith("blob:")) URL.revokeObjectURL(player.src);
  const gif = card.querySelector(".gif");
  if (gif.href.startsWith("blob:")) URL.revokeObjectURL(gif.href);
  card.remove();
  cards.delete(id);
}

async function remove(id) {
  try {
    const result = await (await api(`/v1/videos/${id}`, { method: "DELETE" })).json();
    if (result.deleted) {
      drop(id);
      $("#empty").hidden = cards.size > 0;
    }
    schedule(0);
  } catch (error) {
    say(error.message, true);
  }
}

let timer = null;
function schedule(delay) {
  clearTimeout(timer);
  timer = setTimeout(refresh, delay);
}

let refreshError = ""; // the message a failed refresh put up, taken down by the next one that works
let wanted = 50; // newest videos listed; "Show older videos" lists 50 more

async function listVideos() { // the newest `wanted` videos, newest first, a page of at most 100 at a time
  const data = [];
  let after = null;
  for (;;) {
    const limit = Math.min(100, wanted - data.length);
    const query = `/v1/videos?limit=${limit}` + (after ? `&after=${encodeURIComponent(after)}` : "");
    const page = await (await api(query)).json();
    data.push(...page.data);
    if (!page.has_more || !page.data.length || data.length >= wanted) return { data, more: page.has_more };
    after = page.data[page.data.length - 1].id;
  }
}

function order(data) { // the cards in the list's order, newest first; a card already in place is not moved
  let previous = null; // (moving a card would stop its video playing)
  for (const video of data) {
    const card = cards.get(video.id);
    const place = previous ? previous.nextElementSibling : $("#videos").firstElementChild;
    if (card !== place) {
      if (previous) previous.after(card); else $("#videos").prepend(card);
    }
    previous = card;
  }
}

async function refresh() {
  const key = apiKey; // a refresh begun under a key forgotten or replaced since shows nothing: the change
  let active = false; // cleared the list and started a refresh of its own, which keeps the polling going
  try {
    const { data, more } = await listVideos();
    if (apiKey !== key) return;
    $("#older").hidden = !more;
    if (refreshError && $("#message").textContent === refreshError) say("");
    refreshError = "";
    if (!model) loadModel().catch((error) => say(error.message, true)); // it failed when the page loaded
    const seen = new Set(data.map((v) => v.id));
    for (const video of data) render(video);
    order(data);
    for (const id of [...cards.keys()]) {
      if (!seen.has(id)) drop(id); // deleted elsewhere
    }
    active = data.some((v) => v.status === "queued" || v.status === "in_progress");
    $("#empty").hidden = cards.size > 0;
  } catch (error) {
    if (apiKey !== key && !(error instanceof NeedsKey)) return;
    say(error.message, true);
    if (error instanceof NeedsKey) { // until a key is given (the key form starts again)
      $("#empty").hidden = true; // the list is unknown, not empty
      return;
    }
    refreshError = error.message;
  }
  schedule(active ? 500 : 3000);
}

$("#create").addEventListener("submit", submit);
$("#create").addEventListener("invalid", (event) => { // the field the browser points at, seen: its Options opened
  const details = event.target.closest("details");
  if (details) details.open = true;
}, true); // (invalid does not bubble)
$("#stop-remix").addEventListener("click", () => { // the button goes: back to the prompt, as a remix began
  remixMode(null);
  $("#prompt").focus();
});
$("#riflex").addEventListener("change", longest);
$("#input_reference").addEventListener("change", chosen);
$("#last_frame").addEventListener("change", chosen);
for (const [button, input] of [["#remove-input", "#input_reference"], ["#remove-last", "#last_frame"]]) {
  $(button).addEventListener("click", () => { // the file unchosen, and what it offered; the picker focused
    $(input).value = "";
    chosen();
    $(input).focus(); // the button goes
  });
}
$("#older").addEventListener("click", () => { wanted += 50; schedule(0); });
$("#prompt").addEventListener("keydown", (event) => { // Enter is a new line; Ctrl+Enter (⌘+Enter) generates
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
    event.preventDefault();
    $("#create").requestSubmit();
  }
});
$("#key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  apiKey = $("#api-key").value.trim();
  localStorage.setItem("cogvideox-api-key", apiKey);
  $("#key-form").hidden = true;
  say("");
  start();
});
$("#forget-key").addEventListener("click", () => { // another key, or none left behind on a shared computer
  apiKey = "";
  localStorage.removeItem("cogvideox-api-key");
  clearTimeout(timer);
  for (const id of [...cards.keys()]) drop(id);
  $("#api-key").value = "";
  $("#forget-key").hidden = true;
  start(); // the server asks for a key again
});

function start() {
  $("#forget-key").hidden = !apiKey;
  loadModel().catch((error) => say(error.message, true));
  refresh();
}
start();
