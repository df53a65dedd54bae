// The rater's page: welcome -> headphone check -> questionnaire -> familiarisation -> trials -> done.
// Every clip of a page is fetched once and decoded; all of them play together through one gain each, and
// only the selected gain is open, so switching keeps the playhead. Text from the link or the server is
// always set with textContent.
"use strict";

const params = new URLSearchParams(location.search);
const study = (params.get("study") || "").trim();
const PLATFORM_KEYS = ["rater", "PROLIFIC_PID", "STUDY_ID", "SESSION_ID"];
const storageKey = `ptq-lab:${study}:${params.get("PROLIFIC_PID") || params.get("rater") || ""}`;
const $ = (selector) => document.querySelector(selector);
let token = localStorage.getItem(storageKey);
let audioContext = null;

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(path, body) {
  const options = {method: body === undefined ? "GET" : "POST", cache: "no-store",
    headers: {"Content-Type": "application/json", ...(token ? {"X-Rater-Token": token} : {})}};
  if (body !== undefined) options.body = JSON.stringify(body);
  const response = await fetch(`api/study/${encodeURIComponent(study)}/${path}`, options);
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new ApiError(response.status, data.error || `The server answered ${response.status}.`);
  return data;
}

function show(id) {
  for (const page of document.querySelectorAll("section.page")) page.hidden = page.id !== id;
  window.scrollTo(0, 0);
}

function showError(message) {
  const error = $("#error");
  error.textContent = message;
  error.hidden = !message;
}

function element(tag, attributes = {}, text = "") {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  if (text) node.textContent = text;
  return node;
}

function context() {
  audioContext = audioContext || new AudioContext();
  return audioContext;
}

async function fetchAudio(url) {
  const response = await fetch(url, {headers: {"X-Rater-Token": token}, cache: "no-store"});
  if (!response.ok) {
    const data = await response.json().catch(() => ({}));
    throw new ApiError(response.status, data.error || "A clip could not be loaded: reload the page.");
  }
  return context().decodeAudioData(await response.arrayBuffer());
}

// ---- the player ---------------------------------------------------------------------------------------

class Player {
  constructor(slot, clips) {
    this.clips = clips;
    this.selected = 0;
    this.playing = false;
    this.offset = 0;
    this.sources = [];
    this.plays = Object.fromEntries(clips.map((clip) => [clip.label, 0]));
    this.root = element("div", {class: "player"});
    slot.replaceChildren(this.root);
  }

  async load() {
    const ctx = context();
    this.buffers = await Promise.all(this.clips.map((clip) => fetchAudio(clip.url)));
    this.duration = Math.max(...this.buffers.map((buffer) => buffer.duration));
    this.loop = [0, this.duration];
    this.levels = this.buffers.map((_, index) => (index === this.selected ? 1 : 0));
    this.gains = this.buffers.map((_, index) => {
      const gain = ctx.createGain();
      gain.gain.value = this.levels[index];
      gain.connect(ctx.destination);
      return gain;
    });
    this.drawTransport();
    this.tick();
  }

  drawTransport() {
    const transport = element("div", {class: "transport"});
    this.playButton = element("button", {class: "play", type: "button", "aria-keyshortcuts": "Space"}, "▶ Play");
    this.playButton.addEventListener("click", () => this.toggle());
    this.timeline = element("div", {class: "timeline", title: "Click to move the playhead; drag the handles to loop a part"});
    this.region = element("div", {class: "loop-region"});
    this.playhead = element("div", {class: "playhead"});
    this.loopStart = element("input", {type: "range", class: "loop-start", min: 0, max: 1000, value: 0,
      "aria-label": "Loop start"});
    this.loopEnd = element("input", {type: "range", class: "loop-end", min: 0, max: 1000, value: 1000,
      "aria-label": "Loop end"});
    this.loopStart.addEventListener("input", () => this.loopFromHandles(this.loopStart));
    this.loopEnd.addEventListener("input", () => this.loopFromHandles(this.loopEnd));
    this.timeline.addEventListener("click", (event) => {
      if (event.target !== this.timeline && event.target !== this.region) return;
      const box = this.timeline.getBoundingClientRect();
      this.seek(((event.clientX - box.left) / box.width) * this.duration);
    });
    this.timeline.append(this.region, this.playhead, this.loopStart, this.loopEnd);
    this.time = element("span", {class: "time"});
    const reset = element("button", {class: "loop-reset", type: "button"}, "Whole clip");
    reset.addEventListener("click", () => this.setLoop(0, this.duration));
    transport.append(this.playButton, this.timeline, this.time, reset);
    this.root.append(transport);
  }

  position() {
    if (!this.playing) return this.offset;
    const [start, end] = this.loop;
    const reached = this.startOffset + Math.max(0, context().currentTime - this.startedAt);
    return reached < end ? reached : start + ((reached - start) % (end - start));
  }

  play() {
    if (this.playing) return;
    const ctx = context();
    if (ctx.state === "suspended") ctx.resume();
    const [start, end] = this.loop;
    this.startOffset = this.offset >= start && this.offset < end - 0.01 ? this.offset : start;
    this.startedAt = ctx.currentTime + 0.02;
    this.sources = this.buffers.map((buffer, index) => {
      const source = ctx.createBufferSource();
      Object.assign(source, {buffer, loop: true, loopStart: start, loopEnd: end});
      source.connect(this.gains[index]);
      source.start(this.startedAt, this.startOffset);
      return source;
    });
    this.playing = true;
    this.plays[this.clips[this.selected].label] += 1;
    this.playButton.textContent = "❚❚ Pause";
  }

  pause() {
    if (!this.playing) return;
    this.offset = this.position();
    for (const source of this.sources) source.stop();
    this.sources = [];
    this.playing = false;
    this.playButton.textContent = "▶ Play";
  }

  toggle() { this.playing ? this.pause() : this.play(); }

  select(index) {
    if (index < 0 || index >= this.clips.length || !this.gains) return;
    const now = context().currentTime;
    this.gains.forEach((gain, other) => {
      gain.gain.cancelScheduledValues(now);
      gain.gain.setTargetAtTime(other === index ? 1 : 0, now, 0.004);  // a 4 ms crossfade: no click, no gap
    });
    this.levels = this.gains.map((_, other) => (other === index ? 1 : 0));  // what each gain is heading to
    if (this.playing && index !== this.selected) this.plays[this.clips[index].label] += 1;
    this.selected = index;
    for (const button of document.querySelectorAll("button.clip")) {
      const on = button.dataset.label === this.clips[index].label;
      button.classList.toggle("selected", on);
      button.setAttribute("aria-pressed", on);
    }
  }

  selectLabel(label) { this.select(this.clips.findIndex((clip) => clip.label === label)); }

  restartAt(seconds) {
    const playing = this.playing;
    this.pause();
    this.offset = Math.min(Math.max(seconds, this.loop[0]), this.loop[1]);
    if (playing) this.play();
  }

  seek(seconds) { this.restartAt(seconds); }

  setLoop(start, end) {
    const minimum = Math.min(0.1, this.duration);
    start = Math.max(0, Math.min(start, this.duration - minimum));
    end = Math.min(this.duration, Math.max(end, start + minimum));
    const position = this.position();
    this.loop = [start, end];
    this.loopStart.value = Math.round((start / this.duration) * 1000);
    this.loopEnd.value = Math.round((end / this.duration) * 1000);
    this.restartAt(position >= start && position < end ? position : start);
  }

  loopFromHandles(moved) {
    let start = (this.loopStart.value / 1000) * this.duration;
    let end = (this.loopEnd.value / 1000) * this.duration;
    if (start >= end) [start, end] = moved === this.loopStart ? [end - 0.1, end] : [start, start + 0.1];
    this.setLoop(start, end);
  }

  tick() {
    if (this.stopped) return;
    const [start, end] = this.loop;
    const position = this.position();
    this.region.style.left = `${(start / this.duration) * 100}%`;
    this.region.style.width = `${((end - start) / this.duration) * 100}%`;
    this.playhead.style.left = `${(position / this.duration) * 100}%`;
    this.time.textContent = `${position.toFixed(1)} / ${this.duration.toFixed(1)} s`;
    requestAnimationFrame(() => this.tick());
  }

  dispose() {
    this.pause();
    this.stopped = true;
    for (const gain of this.gains || []) gain.disconnect();
  }

  state() {
    return {selected: this.clips[this.selected].label, position: this.position(), playing: this.playing,
      loop: [...this.loop], duration: this.duration, plays: {...this.plays},
      audible: this.clips.filter((_, index) => this.levels[index] > 0).map((clip) => clip.label)};
  }
}

let player = null;
window.raterPlayer = {state: () => (player ? player.state() : null)};

async function newPlayer(slot, clips) {
  if (player) player.dispose();
  player = new Player(slot, clips);
  await player.load();
  return player;
}

function clipButton(clip, index, key) {
  const button = element("button", {class: "clip", type: "button", "data-label": clip.label,
    "aria-pressed": "false", "aria-keyshortcuts": key}, clip.label);
  const hint = element("kbd", {}, key);
  button.append(" ", hint);
  button.addEventListener("click", () => player.select(index));
  return button;
}

document.addEventListener("keydown", (event) => {
  const typing = event.target instanceof Element && event.target.matches("input[type=text], textarea, select");
  if (!player || !player.gains || typing || event.ctrlKey || event.metaKey || event.altKey) return;
  const keys = player.keys || {};
  if (event.key === " ") {
    event.preventDefault();
    player.toggle();
  } else if (keys[event.key.toUpperCase()] !== undefined) {
    event.preventDefault();
    player.select(keys[event.key.toUpperCase()]);
  }
});
document.addEventListener("keyup", (event) => { if (event.key === " " && player) event.preventDefault(); });

// ---- rating controls ----------------------------------------------------------------------------------

function mushraControls(page, clips) {
  const box = element("div", {class: "mushra"});
  const scale = page.scale;
  const reference = clips.findIndex((clip) => clip.label === "Reference");
  if (reference >= 0) {
    const row = element("div", {class: "row reference"});
    row.append(clipButton(clips[reference], reference, "R"));
    box.append(row);
  }
  const legend = element("div", {class: "row legend"});
  const bands = element("div", {class: "bands"});
  for (const [low, high, words] of scale.bands) {
    const band = element("div", {class: "band"});
    band.style.flex = String(high - low);  // CSSOM, not a style attribute: the page's CSP allows no inline style
    band.append(element("span", {class: "band-words"}, words), element("span", {class: "band-range"}, `${low}–${high}`));
    bands.append(band);
  }
  legend.append(element("span"), bands, element("span"));
  box.append(legend);
  let rank = 0;
  clips.forEach((clip, index) => {
    if (clip.label === "Reference") return;
    rank += 1;
    const row = element("div", {class: "row"});
    const slider = element("input", {type: "range", class: "score unset", min: scale.minimum, max: scale.maximum,
      step: 1, value: (scale.minimum + scale.maximum) / 2, "data-label": clip.label,
      "aria-label": `Rating of clip ${clip.label} (not set yet)`});
    const value = element("output", {class: "value"}, "–");
    const moved = () => {
      slider.classList.remove("unset");
      slider.setAttribute("aria-label", `Rating of clip ${clip.label}`);
      value.textContent = slider.value;
      player.select(index);
    };
    slider.addEventListener("input", moved);
    slider.addEventListener("pointerup", moved);  // a click on the hidden thumb's spot moves nothing, yet sets it
    row.append(clipButton(clip, index, String(rank)), slider, value);
    box.append(row);
  });
  return {node: box, scores: () => Object.fromEntries([...box.querySelectorAll("input.score")].map(
    (slider) => [slider.dataset.label, slider.classList.contains("unset") ? null : Number(slider.value)]))};
}

function choiceControls(page, clips) {
  const box = element("div", {class: "choice-page"});
  const buttons = element("div", {class: "row clips"});
  clips.forEach((clip, index) => buttons.append(clipButton(clip, index, String(index + 1))));
  const choice = element("fieldset", {id: "choice"});
  choice.append(element("legend", {}, page.scale.question));
  for (const [value, words] of [...page.scale.labels].sort((a, b) => b[0] - a[0])) {
    const label = element("label", {class: "option"});
    const shown = page.scale.minimum < 0 && value > 0 ? `+${value}` : String(value);
    label.append(element("input", {type: "radio", name: "choice", value}), ` ${shown} ${words}`);
    choice.append(label);
  }
  box.append(buttons, choice);
  return {node: box, scores: () => {
    const picked = choice.querySelector("input:checked");
    return picked ? Number(picked.value) : null;
  }};
}

// ---- pages ----------------------------------------------------------------------------------------------

let controls = null;
let trialId = null;

async function showTrial() {
  const page = await api("page");
  if (page.stage === "done") return showDone(page);
  show("trial");
  trialId = page.trial_id;
  $("#trial-header").textContent = `Page ${page.number} of ${page.total}`;
  $("#prompt").textContent = page.prompt ? `Prompt: ${page.prompt}` : "";
  $("#trial-instructions").textContent = page.instructions;
  $("#comment").value = "";
  $("#status").textContent = "Loading the clips…";
  $("#submit").disabled = true;
  const slot = $("#trial .player-slot");
  const clips = page.clips;
  await newPlayer(slot, clips);
  player.keys = {};
  let rank = 0;
  clips.forEach((clip, index) => { player.keys[clip.label === "Reference" ? "R" : String(++rank)] = index; });
  controls = page.test_type === "mushra" ? mushraControls(page, clips) : choiceControls(page, clips);
  player.root.append(controls.node);
  player.select(0);
  $("#status").textContent = `Listen to every clip (about ${Math.ceil(page.listening_seconds)} s in all), `
    + (page.test_type === "mushra" ? "move every slider, " : "choose a rating, ") + "then submit.";
  $("#submit").disabled = false;
}

async function submitTrial() {
  $("#submit").disabled = true;
  try {
    await api("submit", {trial_id: trialId, scores: controls.scores(), plays: player.plays,
      comment: $("#comment").value});
    await showTrial();
  } catch (error) {
    $("#status").textContent = error.message;
    $("#submit").disabled = false;
  }
}

function showDone(page) {
  if (player) player.dispose();
  player = null;
  show("done");
  $("#done-text").textContent = page.message;
  const link = $("#done-link");
  if (page.redirect_url && /^https?:\/\//i.test(page.redirect_url)) {
    link.href = page.redirect_url;
    link.hidden = false;
    setTimeout(() => { location.href = page.redirect_url; }, 5000);
  }
}

async function showFamiliarisation() {
  const {clips} = await api("familiarisation");
  show("familiarisation");
  await newPlayer($("#familiarisation .player-slot"), clips);
  const row = element("div", {class: "row clips"});
  player.keys = {};
  clips.forEach((clip, index) => {
    row.append(clipButton(clip, index, String(index + 1)));
    player.keys[String(index + 1)] = index;
  });
  player.root.append(row);
  player.select(0);
}

async function showHeadphones() {
  const {trials} = await api("headphones");
  show("headphones");
  const box = $("#headphone-trials");
  box.replaceChildren();
  let interval = null;
  for (const trial of trials) {
    const fieldset = element("fieldset", {class: "headphone-trial"});
    fieldset.append(element("legend", {}, trial.question));
    const buffers = await Promise.all(trial.intervals.map((clip) => fetchAudio(clip.url)));
    trial.intervals.forEach((clip, index) => {
      const button = element("button", {type: "button", class: "interval"}, `Play sound ${clip.label}`);
      button.addEventListener("click", () => {
        if (interval) interval.stop();  // one sound at a time
        interval = context().createBufferSource();
        interval.buffer = buffers[index];
        interval.connect(context().destination);
        interval.start();
      });
      const label = element("label", {class: "option"});
      label.append(element("input", {type: "radio", name: `headphones-${trial.index}`, value: clip.label}),
        ` Sound ${clip.label} has the tone`);
      const choice = element("div", {class: "interval-choice"});
      choice.append(button, label);
      fieldset.append(choice);
    });
    box.append(fieldset);
  }
  return new Promise((resolve) => {
    $("#headphones-done").onclick = async () => {
      const answers = [...box.querySelectorAll("fieldset")].map((set) => {
        const picked = set.querySelector("input:checked");
        return picked ? Number(picked.value) : null;
      });
      if (answers.includes(null)) return showError("Answer every question of the headphone check.");
      try {
        await api("headphones", {answers});
        showError("");
        resolve();
      } catch (error) { showError(error.message); }
    };
  });
}

async function showQuestionnaire(fields) {
  show("questionnaire");
  const form = $("#questionnaire-form");
  form.replaceChildren();
  for (const [field, choices] of Object.entries(fields)) {
    const label = element("label", {class: "question"}, `${field[0].toUpperCase()}${field.slice(1)} `);
    const select = element("select", {name: field});
    select.append(element("option", {value: ""}, "(no answer)"));
    for (const choice of choices) select.append(element("option", {value: choice}, choice));
    label.append(select);
    form.append(label);
  }
  return new Promise((resolve) => {
    const send = async (answers) => {
      try {
        await api("questionnaire", {answers});
        showError("");
        resolve();
      } catch (error) { showError(error.message); }
    };
    $("#questionnaire-send").onclick = () => send(Object.fromEntries(
      [...form.querySelectorAll("select")].filter((select) => select.value).map((select) => [select.name, select.value])));
    $("#questionnaire-skip").onclick = () => send({});
  });
}

async function begin(state) {
  $("#start").disabled = true;
  try {
    if (state.headphone_check) await showHeadphones();
    if (state.questionnaire) await showQuestionnaire(state.questionnaire);
    if (state.done === 0) {
      const continued = new Promise((resolve) => { $("#to-trials").onclick = resolve; });
      await showFamiliarisation();
      await continued;
    }
    await showTrial();
  } catch (error) { showError(error.message); }
}

async function register() {
  const platform = {};
  for (const key of PLATFORM_KEYS) if (params.get(key)) platform[key] = params.get(key);
  const registration = await api("register", {platform});
  token = registration.token;
  localStorage.setItem(storageKey, token);
}

async function main() {
  if (!study) {
    $("#welcome-text").textContent = "Open the study link you were given (it ends in ?study=...). "
      + "Experimenters: the console is at /admin.";
    return;
  }
  try {
    if (!token) await register();
    const state = await api("state");
    $("#title").textContent = state.title;
    document.title = state.title;
    const resume = state.done ? ` Welcome back: you have rated ${state.done} of ${state.total} pages and will `
      + "continue where you stopped." : "";
    const pages = state.total === 1 ? "There is 1 page" : `There are ${state.total} pages`;
    $("#welcome-text").textContent = `${state.task}. ${pages}: on each, the clips play in step, and picking `
      + `another clip (button or number key) switches the sound without losing your place.${resume}`;
    $("#instructions").textContent = state.instructions;
    $("#participant").textContent = state.participant;
    $("#participant-line").hidden = false;
    $("#start").hidden = false;
    $("#start").onclick = () => begin(state);
  } catch (error) {
    $("#welcome-text").textContent = error.message;
  }
}

$("#submit").addEventListener("click", submitTrial);
main();
