// The avatar picker: the server's avatars (GET /avatars) as poster buttons; the chosen id goes into the
// offer as options.avatar (app.js asks window.avatarPicker.offerOptions()). Kept apart from app.js so
// the page's session code and the picker change independently.
"use strict";

(() => {
  const REFRESH_MS = 15000;
  const picker = {
    selected: null,
    locked: false,
    offerOptions() {
      return picker.selected ? { avatar: picker.selected } : {};
    },
  };
  window.avatarPicker = picker;

  const box = document.getElementById("avatars");
  const list = document.getElementById("avatar-list");
  const video = document.getElementById("avatar");
  if (!box || !list) return;

  function card(avatar) {
    const ready = avatar.state === "ready";
    const button = document.createElement("button");
    button.type = "button";
    button.className = "avatar-card";
    button.dataset.id = avatar.id;
    button.setAttribute("role", "radio");
    button.setAttribute("aria-checked", String(avatar.id === picker.selected));
    button.disabled = !ready || picker.locked;
    const picture = document.createElement(ready ? "img" : "div");
    picture.className = "avatar-poster";
    if (ready) {
      picture.src = avatar.poster_url;
      picture.alt = "";
      picture.loading = "lazy";
    } else {
      picture.textContent = avatar.state === "failed" ? "failed" : `${Math.round(100 * (avatar.progress || 0))}%`;
    }
    const label = document.createElement("span");
    label.className = "avatar-name";
    label.textContent = avatar.name;
    button.title = ready ? `${avatar.name}: ${avatar.width}x${avatar.height}, ${avatar.frames} frames at ${avatar.fps} fps`
                         : (avatar.error || `${avatar.name}: preparing`);
    button.append(picture, label);
    button.addEventListener("click", () => choose(avatar.id, avatar.poster_url));
    return button;
  }

  function choose(id, posterUrl) {
    if (picker.locked) return;
    picker.selected = id;
    for (const el of list.querySelectorAll(".avatar-card")) {
      el.setAttribute("aria-checked", String(el.dataset.id === id));
    }
    if (video && posterUrl) video.poster = posterUrl;
  }

  async function refresh() {
    let body;
    try {
      const resp = await fetch("/avatars", { cache: "no-store" });
      if (!resp.ok) return;
      body = await resp.json();
    } catch (err) {
      return; // the page's own status line reports an unreachable server
    }
    const avatars = body.avatars || [];
    if (!avatars.some((a) => a.id === picker.selected && a.state === "ready")) picker.selected = body.default;
    list.replaceChildren(...avatars.map(card));
    box.hidden = avatars.length < 2; // one avatar: nothing to choose
    const chosen = avatars.find((a) => a.id === picker.selected);
    if (chosen) choose(chosen.id, chosen.poster_url);
  }

  // While a session runs its avatar is fixed: follow the Start button that app.js disables then.
  const start = document.getElementById("start");
  if (start) {
    new MutationObserver(() => {
      picker.locked = start.disabled;
      for (const el of list.querySelectorAll(".avatar-card")) {
        el.disabled = picker.locked || el.querySelector("img") === null;
      }
    }).observe(start, { attributes: true, attributeFilter: ["disabled"] });
  }

  refresh();
  setInterval(() => { if (!document.hidden) refresh(); }, REFRESH_MS);
  window.addEventListener("focus", refresh);
})();
