// Record / Stop recording: keeps what the avatar says, in the browser only.
//
// The returned WebRTC stream (the avatar video and the avatar's audio, the one MediaStream the <video>
// plays) goes through MediaRecorder; the pieces stay in memory and become a Blob offered as a download
// (mp4 where the browser records it, else webm). Nothing is uploaded or stored on the server.
//
// Self-contained: it watches the <video id="avatar"> element, so the session code (app.js) needs no
// hooks. A stream that starts playing enables Record; a stream that goes away (Stop, a failed
// connection) ends a running recording and still offers what was recorded.
"use strict";

(() => {
  // Preferred first: mp4 plays everywhere (and carries its duration); webm is what every Chromium
  // and Firefox can record.
  const MIME_TYPES = [
    "video/mp4;codecs=avc1,mp4a.40.2",
    "video/mp4;codecs=avc1,opus",
    "video/mp4",
    "video/webm;codecs=vp8,opus",
    "video/webm;codecs=vp9,opus",
    "video/webm",
  ];
  const TIMESLICE_MS = 1000; // hand over data every second: a crash loses at most one second

  const el = (id) => document.getElementById(id);
  const ui = {
    video: el("avatar"),
    button: el("record"),
    clock: el("record-clock"),
    result: el("recording"),
    link: el("recording-link"),
    details: el("recording-details"),
  };

  function chooseMimeType() {
    if (typeof MediaRecorder === "undefined") return null;
    return MIME_TYPES.find((type) => MediaRecorder.isTypeSupported(type)) || "";
  }

  function formatDuration(ms) {
    const total = Math.max(0, Math.round(ms / 1000));
    return `${Math.floor(total / 60)}:${String(total % 60).padStart(2, "0")}`;
  }

  function formatSize(bytes) {
    return bytes >= 1048576 ? `${(bytes / 1048576).toFixed(1)} MB` : `${Math.max(1, Math.round(bytes / 1024))} kB`;
  }

  function timestamp() {
    const d = new Date();
    const pad = (n) => String(n).padStart(2, "0");
    return `${d.getFullYear()}${pad(d.getMonth() + 1)}${pad(d.getDate())}-${pad(d.getHours())}${pad(d.getMinutes())}` +
      `${pad(d.getSeconds())}`;
  }

  let recording = null; // { recorder, chunks, startedAt, timer, mimeType }
  let downloadUrl = null;

  function liveStream() {
    const stream = ui.video.srcObject;
    return stream && stream.getTracks().some((t) => t.readyState === "live") ? stream : null;
  }

  function updateButton() {
    const supported = chooseMimeType() !== null;
    ui.button.hidden = !supported;
    ui.button.disabled = !recording && !liveStream();
    ui.button.textContent = recording ? "Stop recording" : "Record";
    ui.button.classList.toggle("is-recording", Boolean(recording));
    ui.button.setAttribute("aria-pressed", recording ? "true" : "false");
    ui.clock.hidden = !recording;
  }

  function start() {
    const stream = liveStream();
    if (!stream || recording) return;
    const mimeType = chooseMimeType();
    // A copy of the stream's tracks as they are now: the recorder keeps exactly these.
    const recorder = new MediaRecorder(new MediaStream(stream.getTracks()), mimeType ? { mimeType } : {});
    const current = { recorder, chunks: [], startedAt: performance.now(), stoppedAt: null, timer: null };
    recorder.addEventListener("dataavailable", (event) => {
      if (event.data && event.data.size) current.chunks.push(event.data);
    });
    recorder.addEventListener("stop", () => {
      if (recording === current) { // stopped by itself: the stream's tracks ended
        current.stoppedAt = performance.now();
        clearInterval(current.timer);
        recording = null;
        updateButton();
      }
      finish(current);
    });
    recorder.addEventListener("error", () => stop());
    recorder.start(TIMESLICE_MS);
    current.timer = setInterval(() => {
      ui.clock.textContent = formatDuration(performance.now() - current.startedAt);
    }, 250);
    ui.clock.textContent = formatDuration(0);
    recording = current;
    updateButton();
  }

  function stop() {
    const current = recording;
    if (!current) return;
    current.stoppedAt = performance.now();
    clearInterval(current.timer);
    recording = null;
    if (current.recorder.state !== "inactive") current.recorder.stop(); // "stop" then calls finish
    else finish(current);
    updateButton();
  }

  function finish(current) {
    if (current.finished) return;
    current.finished = true;
    const durationMs = (current.stoppedAt ?? performance.now()) - current.startedAt;
    const type = current.recorder.mimeType || (current.chunks[0] && current.chunks[0].type) || "video/webm";
    const blob = new Blob(current.chunks, { type });
    if (!blob.size) return;
    const extension = type.startsWith("video/mp4") ? "mp4" : "webm";
    if (downloadUrl) URL.revokeObjectURL(downloadUrl);
    downloadUrl = URL.createObjectURL(blob);
    ui.link.href = downloadUrl;
    ui.link.download = `avatar-${timestamp()}.${extension}`;
    ui.link.textContent = `Download recording (${extension})`;
    ui.details.textContent = `${formatDuration(durationMs)} · ${formatSize(blob.size)}`;
    ui.result.dataset.durationMs = String(Math.round(durationMs));
    ui.result.hidden = false;
  }

  ui.button.addEventListener("click", () => (recording ? stop() : start()));
  // A stream appears (connected) or goes away (Stop sets srcObject to null: "emptied").
  ui.video.addEventListener("loadedmetadata", updateButton);
  ui.video.addEventListener("playing", updateButton);
  ui.video.addEventListener("emptied", () => { stop(); updateButton(); });
  window.addEventListener("pagehide", () => stop());
  updateButton();
})();
