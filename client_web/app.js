// Lip-sync avatar page: one WebRTC session with the server, no build step.
//
// Start: (microphone) -> offer with a recvonly video transceiver -> POST /offer -> answer.
// The avatar video and its audio arrive in one MediaStream, so the browser keeps them in sync.
// Audio files and text go through the push API of the same session.
"use strict";

const $ = (id) => document.getElementById(id);

const ui = {
  video: $("avatar"),
  placeholder: $("placeholder"),
  stage: document.querySelector(".stage"),
  status: $("status"),
  state: $("status-state"),
  fps: $("status-fps"),
  latency: $("status-latency"),
  drops: $("status-drops"),
  link: $("status-link"),
  message: $("message"),
  lost: $("lost"),
  lostText: $("lost-text"),
  reconnect: $("reconnect"),
  start: $("start"),
  stop: $("stop"),
  interrupt: $("interrupt"),
  file: $("file"),
  sendFile: $("send-file"),
  filePanel: $("file-panel"),
  text: $("text"),
  say: $("say"),
  textPanel: $("text-panel"),
  textLabel: $("source-text-label"),
  info: $("server-info"),
};

let serverConfig = { ice_servers: [], say: false };
let session = null; // { pc, id, token, micStream, timers }
let lastOptions = null; // the offer options of the last session: Reconnect opens the same avatar again

// -- small helpers -------------------------------------------------------------------------------

// The session ended under us (the link dropped for longer than the server waits, or the connection
// failed): say so, and offer a new session on the same avatar in one click.
function showLost(text) {
  ui.lostText.textContent = text;
  ui.lost.hidden = false;
}

function showMessage(text, kind = "error") {
  ui.message.textContent = text;
  ui.message.className = kind === "info" ? "message info" : "message";
  ui.message.hidden = !text;
}

function setState(state) {
  ui.state.textContent = state;
  ui.status.dataset.state = state;
  document.body.dataset.state = state;
}

function selectedSource() {
  return document.querySelector('input[name="source"]:checked').value;
}

async function readError(resp) {
  try {
    const body = await resp.json();
    return body.error || `HTTP ${resp.status}`;
  } catch (_) {
    return `HTTP ${resp.status}`;
  }
}

function setBusy(connected) {
  ui.start.disabled = connected;
  ui.stop.disabled = !connected;
  ui.interrupt.disabled = !connected;
  ui.sendFile.disabled = !connected || !ui.file.files.length;
  ui.say.disabled = !connected || !ui.text.value.trim();
  for (const input of document.querySelectorAll('input[name="source"]')) input.disabled = connected;
}

function updatePanels() {
  const source = selectedSource();
  ui.filePanel.hidden = source !== "file";
  ui.textPanel.hidden = source !== "text";
}

// -- server config -------------------------------------------------------------------------------

async function loadConfig() {
  try {
    const resp = await fetch("/config", { cache: "no-store" });
    if (resp.ok) serverConfig = await resp.json();
  } catch (_) {
    showMessage("The server does not answer. Is it running?");
  }
  ui.textLabel.hidden = !serverConfig.say;
  if (!serverConfig.say && selectedSource() === "text") {
    document.querySelector('input[name="source"][value="mic"]').checked = true;
  }
  if (serverConfig.renderer) {
    const numerics = [serverConfig.runtime, serverConfig.precision].filter(Boolean).join(" ");
    const renderer = numerics ? `${serverConfig.renderer} (${numerics})` : serverConfig.renderer;
    ui.info.textContent = `avatar ${serverConfig.avatar} · ${renderer} · ${serverConfig.fps} fps`;
  }
  updatePanels();
}

// -- microphone ----------------------------------------------------------------------------------

async function openMicrophone() {
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    throw new Error("This page cannot use the microphone here: browsers only allow it on https:// " +
                    "or http://localhost. Choose 'Audio file' or 'Text', or serve with --cert-file/--key-file.");
  }
  try {
    return await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true },
      video: false,
    });
  } catch (err) {
    if (err.name === "NotAllowedError" || err.name === "SecurityError") {
      throw new Error("Microphone access was refused. Allow it in the browser's site settings and " +
                      "press Start again, or choose 'Audio file' or 'Text'.");
    }
    if (err.name === "NotFoundError" || err.name === "OverconstrainedError") {
      throw new Error("No microphone was found. Plug one in, or choose 'Audio file' or 'Text'.");
    }
    if (err.name === "NotReadableError") {
      throw new Error("The microphone is in use by another program.");
    }
    throw new Error(`Cannot open the microphone: ${err.message || err.name}`);
  }
}

// -- connecting ----------------------------------------------------------------------------------

function waitForIceGathering(pc, timeoutMs = 3000) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      if (pc.iceGatheringState === "complete") {
        pc.removeEventListener("icegatheringstatechange", done);
        resolve();
      }
    };
    pc.addEventListener("icegatheringstatechange", done);
    setTimeout(resolve, timeoutMs); // send what we have; host candidates come first
  });
}

// TURN credentials live minutes (server --turn-ttl): fetched for each connection, just before the offer.
// `?ice=relay` in the page's address forces every path through the TURN relay (to test a deployment).
async function peerConfiguration() {
  let iceServers = serverConfig.ice_servers || [];
  if (serverConfig.turn) {
    const resp = await fetch("/ice-servers", { cache: "no-store" });
    if (resp.status === 429) throw new Error(`Too many connection attempts from this address: ${await readError(resp)}`);
    if (!resp.ok) throw new Error(`Cannot get the relay's credentials: ${await readError(resp)}`);
    iceServers = (await resp.json()).ice_servers;
  }
  const relayOnly = new URLSearchParams(window.location.search).get("ice") === "relay";
  return { iceServers, iceTransportPolicy: relayOnly ? "relay" : "all" };
}

async function start({ options = null } = {}) {
  showMessage("");
  ui.lost.hidden = true;
  setBusy(true);
  setState("connecting");
  const source = selectedSource();
  let micStream = null;
  let pc = null;
  try {
    if (source === "mic") micStream = await openMicrophone();

    pc = new RTCPeerConnection(await peerConfiguration());
    session = { pc, id: null, token: null, micStream, timers: [], lastStats: null, connected: false };

    if (micStream) {
      for (const track of micStream.getAudioTracks()) {
        pc.addTransceiver(track, { direction: "sendrecv", streams: [micStream] });
      }
    } else {
      pc.addTransceiver("audio", { direction: "recvonly" });
    }
    pc.addTransceiver("video", { direction: "recvonly" });

    const remote = new MediaStream();
    pc.addEventListener("track", (event) => {
      const stream = event.streams && event.streams[0];
      if (stream) {
        if (ui.video.srcObject !== stream) ui.video.srcObject = stream;
      } else {
        remote.addTrack(event.track);
        if (ui.video.srcObject !== remote) ui.video.srcObject = remote;
      }
      ui.video.play().catch(() => showMessage("Press play on the video to hear the avatar.", "info"));
    });
    pc.addEventListener("connectionstatechange", () => onConnectionState(pc));

    await pc.setLocalDescription(await pc.createOffer());
    await waitForIceGathering(pc);

    const offerOptions = options || (window.avatarPicker ? window.avatarPicker.offerOptions() : {});
    const resp = await fetch("/offer", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ sdp: pc.localDescription.sdp, type: pc.localDescription.type,
                             options: offerOptions }),
    });
    if (resp.status === 503 || resp.status === 429) {
      const body = await resp.json().catch(() => ({}));
      const retry = body.retry_after_s || resp.headers.get("Retry-After") || "a few";
      const why = resp.status === 429 ? (body.error || "Too many sessions from this address.")
                                      : `The server is full (${body.max_sessions || "all"} sessions in use).`;
      throw new Error(`${why} Try again in ${retry} seconds.`);
    }
    if (!resp.ok) throw new Error(`The server refused the connection: ${await readError(resp)}`);
    const answer = await resp.json();
    if (session === null || session.pc !== pc) return; // stopped meanwhile
    session.id = answer.session_id;
    session.token = answer.session_token; // the session's routes need it; it is never sent again
    lastOptions = { ...offerOptions, avatar: answer.avatar || offerOptions.avatar };
    await pc.setRemoteDescription({ type: answer.type, sdp: answer.sdp });
    ui.placeholder.hidden = true;
    session.timers.push(setInterval(updateStats, 1000));
    setBusy(true);
  } catch (err) {
    await stop({ quiet: true });
    setState("error");
    showMessage(err.message || String(err));
  }
}

function onConnectionState(pc) {
  if (!session || session.pc !== pc) return;
  const state = pc.connectionState;
  setState(state);
  if (state === "failed") {
    const wasConnected = session.connected;
    stop({ quiet: true }).then(() => {
      setState("failed");
      if (wasConnected) {
        showLost("The connection was lost.");
      } else {
        showMessage("The connection failed. If the server is on another network, it needs a " +
                    "STUN/TURN server (--ice-server).");
      }
    });
  } else if (state === "disconnected") {
    showMessage("Connection interrupted; trying to recover…", "info");
  } else if (state === "connected") {
    session.connected = true;
    showMessage("");
  }
}

async function stop({ quiet = false } = {}) {
  const current = session;
  session = null;
  if (current) {
    for (const timer of current.timers) clearInterval(timer);
    if (current.id) {
      sessionFetch(current, "", { method: "DELETE", keepalive: true }).catch(() => {});
    }
    if (current.micStream) for (const track of current.micStream.getTracks()) track.stop();
    current.pc.close();
  }
  ui.video.srcObject = null;
  ui.placeholder.hidden = false;
  setBusy(false);
  if (!quiet) setState("idle");
  ui.fps.textContent = "– fps";
  ui.latency.textContent = "latency –";
  ui.drops.textContent = "drops –";
  ui.link.textContent = "link –";
}

// -- status line ---------------------------------------------------------------------------------

function engineLatencyMs(metrics) {
  // Server side: audio in -> mouth on screen (median of recent frames), else the fixed budget.
  const engine = (metrics && metrics.engine) || {};
  if (engine.latency_ms && typeof engine.latency_ms.p50 === "number") return engine.latency_ms.p50;
  if (typeof engine.latency_budget_ms === "number") return engine.latency_budget_ms;
  return null;
}

async function updateStats() {
  const current = session;
  if (!current) return;
  let fps = null, dropped = 0, jitterMs = null, rttMs = null, lost = 0, received = 0;
  const report = await current.pc.getStats();
  const previous = current.lastStats || {};
  report.forEach((s) => {
    if (s.type === "candidate-pair" && s.nominated && typeof s.currentRoundTripTime === "number") {
      rttMs = 1000 * s.currentRoundTripTime;
    }
    if (s.type === "inbound-rtp") {
      // Loss over the last second, from the counters' deltas (what arrives, both media).
      const prev = previous[s.id];
      lost += Math.max(0, (s.packetsLost || 0) - ((prev && prev.packetsLost) || 0));
      received += Math.max(0, (s.packetsReceived || 0) - ((prev && prev.packetsReceived) || 0));
    }
    if (s.type === "inbound-rtp" && s.kind === "video") {
      fps = s.framesPerSecond ?? fps;
      dropped += s.framesDropped || 0;
      if (s.jitterBufferEmittedCount) jitterMs = (1000 * s.jitterBufferDelay) / s.jitterBufferEmittedCount;
    }
  });
  if (fps === null && current.lastStats) {
    // Older browsers: derive fps from framesDecoded.
    report.forEach((s) => {
      if (s.type === "inbound-rtp" && s.kind === "video" && current.lastStats[s.id]) {
        const prev = current.lastStats[s.id];
        fps = ((s.framesDecoded - prev.framesDecoded) * 1000) / (s.timestamp - prev.timestamp);
      }
    });
  }
  current.lastStats = {};
  report.forEach((s) => { if (s.type === "inbound-rtp") current.lastStats[s.id] = s; });

  let serverDrops = 0, latencyMs = null;
  if (current.id) {
    try {
      const resp = await sessionFetch(current, "", { cache: "no-store" });
      if (resp.ok) {
        const metrics = await resp.json();
        latencyMs = engineLatencyMs(metrics);
        const engine = metrics.engine || {};
        serverDrops = (engine.frames_dropped || 0) + (metrics.video_skipped || 0);
        if (metrics.server_notice && session === current) {  // draining before a restart
          current.notice = metrics.server_notice.message;
          showMessage(`The ${metrics.server_notice.message}: this session ends in ` +
                      `${Math.ceil(metrics.server_notice.ends_in_s)} s. Press Start again after it.`, "info");
        }
      } else if (resp.status === 404 && session === current) {
        const wasConnected = current.connected;
        await stop({ quiet: true });
        setState("closed");
        if (current.notice) {
          showMessage(`The ${current.notice}: press Start again in a few seconds.`, "info");
        } else if (wasConnected) {
          showLost("The connection was lost: the server ended this session.");
        } else {
          showMessage("The server ended this session.", "info");
        }
        return;
      }
    } catch (_) { /* the status line is best effort */ }
  }
  if (session !== current) return;
  ui.fps.textContent = fps === null ? "– fps" : `${fps.toFixed(1)} fps`;
  const shownLatency = latencyMs === null ? jitterMs : latencyMs + (jitterMs || 0);
  ui.latency.textContent = shownLatency === null ? "latency –" : `latency ${Math.round(shownLatency)} ms`;
  ui.drops.textContent = `drops ${dropped + serverDrops}`;
  const lossPct = lost + received > 0 ? (100 * lost) / (lost + received) : null;
  ui.link.textContent = lossPct === null && rttMs === null ? "link –"
    : `loss ${lossPct === null ? "–" : lossPct.toFixed(1)} % · rtt ${rttMs === null ? "–" : Math.round(rttMs)} ms`;
}

// -- push API: file and text ---------------------------------------------------------------------

// A request to one of the session's routes (/sessions/{id}...), with its session_token.
function sessionFetch(current, path, init = {}) {
  const headers = { ...(init.headers || {}), Authorization: `Bearer ${current.token}` };
  return fetch(`/sessions/${encodeURIComponent(current.id)}${path}`, { ...init, headers });
}

async function sendFile() {
  const file = ui.file.files[0];
  if (!file || !session || !session.id) return;
  if (serverConfig.max_upload_bytes && file.size > serverConfig.max_upload_bytes) {
    showMessage(`That file is too large (limit ${Math.round(serverConfig.max_upload_bytes / 1048576)} MB).`);
    return;
  }
  ui.sendFile.disabled = true;
  try {
    const resp = await sessionFetch(session, "/audio", {
      method: "POST",
      headers: { "Content-Type": file.type || "application/octet-stream" },
      body: file,
    });
    if (!resp.ok) {
      const reason = await readError(resp);
      showMessage(resp.status === 415 ? `Cannot play that file: ${reason}` : reason);
    } else {
      showMessage("");
    }
  } finally {
    setBusy(Boolean(session));
  }
}

async function say() {
  const text = ui.text.value.trim();
  if (!text || !session || !session.id) return;
  ui.say.disabled = true;
  try {
    const resp = await sessionFetch(session, "/say", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ text }),
    });
    if (!resp.ok) showMessage(await readError(resp));
    else showMessage("");
  } finally {
    setBusy(Boolean(session));
  }
}

async function interrupt() {
  if (!session || !session.id) return;
  await sessionFetch(session, "/interrupt", { method: "POST" }).catch(() => {});
}

// -- wiring --------------------------------------------------------------------------------------

ui.start.addEventListener("click", () => start());
ui.reconnect.addEventListener("click", () => start({ options: lastOptions }));
ui.stop.addEventListener("click", () => stop());
ui.interrupt.addEventListener("click", interrupt);
ui.sendFile.addEventListener("click", sendFile);
ui.say.addEventListener("click", say);
ui.file.addEventListener("change", () => setBusy(Boolean(session)));
ui.text.addEventListener("input", () => setBusy(Boolean(session)));
ui.text.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); say(); }
});
for (const input of document.querySelectorAll('input[name="source"]')) {
  input.addEventListener("change", updatePanels);
}
ui.video.addEventListener("loadedmetadata", () => {
  if (ui.video.videoWidth && ui.video.videoHeight) {
    ui.stage.style.setProperty("--ar", String(ui.video.videoWidth / ui.video.videoHeight));
  }
});
window.addEventListener("pagehide", () => { if (session) stop({ quiet: true }); });

setState("idle");
setBusy(false);
loadConfig();
