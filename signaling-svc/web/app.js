// Talkgroup browser client: plain ES module, native WebSocket and RTCPeerConnection.
//
// Flow: sign in (development token endpoint, or a pasted token) -> WebSocket /ws with the token
// in the `voiceping` subprotocol -> list-channels -> join-channel -> a recv transport (the
// channel's one stream) and, when a microphone is available, a send transport with a muted
// producer -> hold the button or the space bar: ptt-start, unmute on `granted`, mute and
// ptt-stop on release. A lost connection is resumed with the token of the `session` push:
// channel, transports and audio stay; a refused resume rejoins from scratch. See
// docs/protocol.md.

const $ = (id) => document.getElementById(id);
const BACKOFF_MS = [1000, 2000, 4000, 8000, 16000, 30000];
// Close codes after which the session is over for good: no resume.
const FINAL_CLOSES = new Set([1000, 4000, 4001, 4003, 4004, 4005]);
const REQUEST_TIMEOUT_MS = 10000;

const state = {
  token: sessionStorage.getItem("talkgroup.token"),
  ws: null,
  nextId: 1,
  pending: new Map(),
  reconnects: 0,
  resumeToken: null,   // single use: takes the session over after a lost connection
  channel: null,       // joined channel id
  epoch: 0,            // highest epoch seen for the joined channel
  speaker: null,
  members: [],
  membersVersion: 0,   // version of `members`; newer changes apply to it
  recvPc: null,
  sendPc: null,
  mic: null,           // the microphone track (disabled while not talking)
  pressed: false,
  talking: false,
};

function log(text) {
  $("log").textContent = text;
}

// ---- the WebSocket protocol ----

function request(type, data = {}) {
  const ws = state.ws;
  if (!ws || ws.readyState !== WebSocket.OPEN) {
    return Promise.reject(new Error("not connected"));
  }
  const id = String(state.nextId++);
  ws.send(JSON.stringify({ type, id, data }));
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      state.pending.delete(id);
      reject(new Error(`${type}: no reply`));
    }, REQUEST_TIMEOUT_MS);
    state.pending.set(id, { resolve, reject, timer });
  });
}

function onFrame(frame) {
  if (frame.id !== undefined && state.pending.has(frame.id)) {
    const { resolve, reject, timer } = state.pending.get(frame.id);
    clearTimeout(timer);
    state.pending.delete(frame.id);
    if (frame.type === "error") {
      const e = new Error(frame.error?.message ?? "error");
      e.code = frame.error?.code;
      reject(e);
    } else {
      resolve(frame.data ?? {});
    }
    return;
  }
  const data = frame.data ?? {};
  switch (frame.type) {
    case "session":
      onSession(data);
      break;
    case "speaker-changed":
      if (data.channelId === state.channel && data.epoch >= state.epoch) {
        state.epoch = data.epoch;
        setSpeaker(data.speaker, data.reason);
      }
      break;
    case "channel-state":
      if (data.channelId === state.channel) {
        applyChannelState(data);
      }
      break;
    case "members-changed":
      if (data.channelId === state.channel) {
        applyMemberChanges(data.changes ?? []);
      }
      break;
    case "ptt-denied":
      if (data.channelId === state.channel) {
        showDenied(data.speaker);
      }
      break;
    case "ptt-interrupted":
      if (data.channelId === state.channel) {
        stopTalking();
        const who = data.by ? data.by.userName || data.by.userId : "a dispatcher";
        $("denied").textContent =
          data.reason === "emergency" ? `Emergency broadcast by ${who}` : `Interrupted by ${who}`;
      }
      break;
    case "permission-update":
      applyPermissions(data);
      break;
    case "transport-closed":
      if (data.channelId === state.channel) {
        moveTransport(data);
      }
      break;
    case "error":
      log(`server: ${frame.error?.code ?? "error"}`);
      break;
  }
}

// The socket's session, its first push: a resume kept the channel and its media; a new session
// (first connect, or a refused resume) joins again from scratch.
async function onSession(session) {
  state.resumeToken = session.resumeToken;
  await refreshChannels();
  clearInterval(state.listTimer);
  state.listTimer = setInterval(refreshChannels, 10000);
  if (session.resumed && state.channel && (session.channels ?? []).includes(state.channel)) {
    log("reconnected; the channel and its audio were kept");
    return;
  }
  closeMedia();
  if (state.channel) {
    const rejoin = state.channel;
    state.channel = null;
    await joinChannel(rejoin);
  }
}

function connect() {
  setConnection("connecting");
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const resume = state.resumeToken ? `?resume=${encodeURIComponent(state.resumeToken)}` : "";
  const ws = new WebSocket(`${scheme}://${location.host}/ws${resume}`, [
    "voiceping",
    state.token,
  ]);
  // Kept until the `session` push brings the next one: an attempt that fails before it may try
  // again with the same token.
  state.ws = ws;
  ws.onopen = () => {
    ws.opened = true;
    state.reconnects = 0;
    setConnection("online");
    $("signin").hidden = true;
    $("channels").hidden = false;
  };
  ws.onmessage = (event) => {
    try {
      onFrame(JSON.parse(event.data));
    } catch (e) {
      log(`bad frame: ${e.message}`);
    }
  };
  ws.onclose = (event) => {
    if (state.ws !== ws) return;
    for (const { reject, timer } of state.pending.values()) {
      clearTimeout(timer);
      reject(new Error("disconnected"));
    }
    state.pending.clear();
    clearInterval(state.listTimer);
    stopTalking();
    // A lost connection keeps the media for the resume; a final close ends it.
    const resumable = state.resumeToken && !FINAL_CLOSES.has(event.code);
    if (!resumable) {
      state.resumeToken = null;
      closeMedia();
    }
    if (event.code === 4005) {
      setConnection("offline");
      log("this session continues on another connection");
      return;
    }
    if (!ws.opened && state.reconnects === 0) {
      // Refused before the upgrade: most likely a bad or expired token.
      signOut("Sign-in failed: the token was refused.");
      return;
    }
    // The first try of a resume comes at once: the floor's lease and the grace period run.
    const delay = resumable && state.reconnects === 0
      ? 250
      : BACKOFF_MS[Math.min(state.reconnects, BACKOFF_MS.length - 1)];
    state.reconnects += 1;
    setConnection("reconnecting");
    log(`disconnected (${event.code}); retrying in ${delay / 1000} s`);
    setTimeout(connect, delay);
  };
}

function setConnection(text) {
  const pill = $("connection");
  pill.textContent = text;
  pill.dataset.state = text;
}

// ---- channels ----

async function refreshChannels() {
  let reply;
  try {
    reply = await request("list-channels");
  } catch (e) {
    log(`list-channels: ${e.message}`);
    return;
  }
  const list = $("channel-list");
  list.replaceChildren();
  for (const c of reply.channels ?? []) {
    const li = document.createElement("li");
    const label = document.createElement("span");
    const who = c.speaker ? ` - ${c.speaker.userName || c.speaker.userId} talking` : "";
    label.textContent = `${c.channelId} (${c.memberCount} present)${who}`;
    label.className = c.busy ? "busy" : "";
    const join = document.createElement("button");
    join.type = "button";
    join.textContent = "Join";
    join.dataset.channel = c.channelId;
    join.addEventListener("click", () => joinChannel(c.channelId));
    li.append(label, join);
    list.append(li);
  }
}

async function joinChannel(channelId) {
  if (state.channel === channelId) return;
  if (state.channel) await leaveChannel();
  let reply;
  try {
    reply = await request("join-channel", { channelId });
  } catch (e) {
    log(`join ${channelId}: ${e.code ?? e.message}`);
    return;
  }
  state.channel = channelId;
  state.role = reply.role;
  state.epoch = 0;
  state.membersVersion = 0;
  $("channel").hidden = false;
  $("channel-name").textContent = channelId;
  $("denied").textContent = "";
  applyChannelState(reply.channel);
  await setUpMedia(channelId);
}

// The server already left revoked channels; follow it here, and mute where talk was taken away.
function applyPermissions(update) {
  const channelId = state.channel;
  if (channelId && (update.revoked ?? []).includes(channelId)) {
    stopTalking();
    closeMedia();
    state.channel = null;
    $("channel").hidden = true;
    log(`access to ${channelId} was withdrawn`);
  } else if (channelId) {
    const named = (update.channels ?? []).find((c) => c.channelId === channelId);
    const role = named ? named.role : update.defaultRole;
    if (role === "listen" && state.role !== "listen") {
      stopTalking();
      $("ptt").disabled = true;
      $("media").textContent = "Listening only: your role in this channel";
    }
    state.role = role;
  }
  refreshChannels();
}

async function leaveChannel() {
  const channelId = state.channel;
  stopTalking();
  closeMedia();
  state.channel = null;
  $("channel").hidden = true;
  try {
    await request("leave-channel", { channelId });
  } catch (e) {
    log(`leave: ${e.message}`);
  }
  refreshChannels();
}

function applyChannelState(channel) {
  if (channel.epoch >= state.epoch) {
    state.epoch = channel.epoch;
    setSpeaker(channel.speaker, null);
  }
  // A full list replaces ours unless ours is newer.
  if ((channel.membersVersion ?? 0) >= state.membersVersion) {
    state.membersVersion = channel.membersVersion ?? 0;
    state.members = channel.members ?? [];
    renderMembers();
  }
}

// Who joined and left, each change with the members version it made: the ones newer than
// ours apply, in order.
function applyMemberChanges(changes) {
  for (const change of changes) {
    if (change.version <= state.membersVersion) continue;
    state.membersVersion = change.version;
    if (change.joined && !state.members.some((m) => m.userId === change.joined.userId)) {
      state.members.push(change.joined);
    }
    if (change.left) {
      state.members = state.members.filter((m) => m.userId !== change.left);
    }
  }
  renderMembers();
}

function renderMembers() {
  const list = $("members");
  list.replaceChildren();
  for (const m of state.members) {
    const li = document.createElement("li");
    li.textContent = m.userName || m.userId;
    li.dataset.user = m.userId;
    list.append(li);
  }
}

function setSpeaker(speaker, reason) {
  state.speaker = speaker;
  const el = $("speaker");
  el.dataset.busy = speaker ? "true" : "false";
  el.textContent = speaker
    ? `${speaker.userName || speaker.userId} is talking`
    : "Nobody is talking";
  if (speaker) $("denied").textContent = "";
  // The floor was taken from us (max talk time, pre-emption, revoke).
  if (state.talking && (!speaker || speaker.userId !== state.me) && reason) {
    stopTalking();
    log(`your floor ended: ${reason}`);
  }
}

function showDenied(speaker) {
  const who = speaker ? speaker.userName || speaker.userId : "someone";
  $("denied").textContent = `Denied: ${who} is talking`;
}

// ---- media ----

function waitForGathering(pc) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      if (pc.iceGatheringState === "complete") {
        pc.removeEventListener("icegatheringstatechange", done);
        resolve();
      }
    };
    pc.addEventListener("icegatheringstatechange", done);
    // Host candidates are enough for a media node with a public address.
    setTimeout(resolve, 2000);
  });
}

// The server offers; `prepare` runs before the offer is applied (track handlers must be in
// place by then), `attach` after it (to put the microphone on the offered transceiver).
async function negotiate(channelId, direction, { prepare = () => {}, attach = async () => {} }) {
  const created = await request("create-transport", { channelId, direction });
  // The deployment's TURN relays (short-lived credentials), for networks that reach the media
  // node neither over UDP nor over ICE/TCP; none when it has no relay.
  const pc = new RTCPeerConnection({
    bundlePolicy: "max-bundle",
    iceServers: created.iceServers || [],
  });
  prepare(pc);
  await pc.setRemoteDescription(created.offer);
  await attach(pc);
  await pc.setLocalDescription(await pc.createAnswer());
  await waitForGathering(pc);
  await request("connect-transport", {
    transportId: created.transportId,
    answer: { type: "answer", sdp: pc.localDescription.sdp },
  });
  const restartIce = watchConnection(pc, created.transportId);
  return { pc, transportId: created.transportId, restartIce };
}

// A connection that drops (Wi-Fi to LTE, a NAT that forgot us) is restarted in place: the
// server offers new ICE credentials for the same transport; DTLS, the stream and the floor stay.
// `disconnected` for a moment is enough: waiting for `failed` would cost seconds of audio.
const RESTART_AFTER_MS = 1500;

function watchConnection(pc, transportId) {
  let timer = null;
  let restarting = false;
  const restart = async () => {
    timer = null;
    if (pc.connectionState === "closed" || restarting) return;
    restarting = true;
    const media = $("media");
    const before = media.textContent;
    media.dataset.state = "reconnecting";
    media.textContent = "Reconnecting audio...";
    try {
      const restarted = await request("restart-ice", { transportId });
      if (restarted.iceServers) {
        pc.setConfiguration({ ...pc.getConfiguration(), iceServers: restarted.iceServers });
      }
      await pc.setRemoteDescription(restarted.offer);
      await pc.setLocalDescription(await pc.createAnswer());
      await request("connect-transport", {
        transportId,
        answer: { type: "answer", sdp: pc.localDescription.sdp },
      });
      log("audio reconnected");
      media.dataset.state = "ready";
      media.textContent = before;
    } catch (e) {
      log(`audio reconnect failed: ${e.code ?? e.message}`);
      media.dataset.state = "failed";
      media.textContent = `Audio failed: ${e.code ?? e.message}`;
    } finally {
      restarting = false;
    }
  };
  pc.addEventListener("connectionstatechange", () => {
    const s = pc.connectionState;
    if ((s === "disconnected" || s === "failed") && !timer) {
      timer = setTimeout(restart, s === "failed" ? 0 : RESTART_AFTER_MS);
    } else if (s === "connected" && timer) {
      clearTimeout(timer);
      timer = null;
    }
  });
  // The browser joined another network: restart at once rather than wait for consent to fail.
  window.addEventListener("online", () => {
    if (pc.connectionState !== "closed") restart();
  });
  return restart;
}

async function setUpRecv(channelId) {
  const recv = await negotiate(channelId, "recv", {
    prepare: (pc) => {
      pc.ontrack = (event) => {
        const audio = $("audio");
        audio.srcObject = event.streams[0] ?? new MediaStream([event.track]);
        audio.play().catch(() => {
          log("click anywhere to hear the channel");
          document.addEventListener("click", () => audio.play(), { once: true });
        });
      };
    },
  });
  state.recvPc = recv.pc;
  state.restartRecvIce = recv.restartIce;
  await request("consume", { channelId });
}

async function setUpSend(channelId, mic) {
  const send = await negotiate(channelId, "send", {
    attach: async (pc) => {
      const transceiver = pc.getTransceivers()[0];
      transceiver.direction = "sendonly";
      await transceiver.sender.replaceTrack(mic);
    },
  });
  state.sendPc = send.pc;
  await request("produce", { transportId: send.transportId, channelId, kind: "audio" });
}

async function setUpMedia(channelId) {
  const media = $("media");
  media.dataset.state = "connecting";
  try {
    await setUpRecv(channelId);
  } catch (e) {
    media.dataset.state = "failed";
    media.textContent = `Audio failed: ${e.code ?? e.message}`;
    return;
  }
  if (state.role === "listen") {
    media.dataset.state = "listen-only";
    media.textContent = "Listening only: your role in this channel";
    return;
  }
  let mic = null;
  try {
    const stream = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true },
    });
    mic = stream.getAudioTracks()[0];
  } catch (e) {
    media.dataset.state = "listen-only";
    media.textContent = "Listening only: no microphone permission";
    return;
  }
  mic.enabled = false;
  state.mic = mic;
  try {
    await setUpSend(channelId, mic);
  } catch (e) {
    media.dataset.state = "listen-only";
    media.textContent = `Listening only: ${e.code ?? e.message}`;
    return;
  }
  if (state.channel !== channelId) return;
  media.dataset.state = "ready";
  media.textContent = "Audio connected";
  $("ptt").disabled = false;
}

// The channel moved to another media node (its node died or drains): a new transport replaces
// the closed one, the floor and the microphone's state stay. A draining node's transport still
// carries audio until its replacement is up, so it is closed only then.
async function moveTransport(closed) {
  const key = closed.direction === "recv" ? "recvPc" : "sendPc";
  const old = state[key];
  state[key] = null;
  if (closed.reason !== "node-draining") old?.close();
  log(`audio moving to another media server (${closed.reason})`);
  try {
    if (closed.direction === "recv") {
      await setUpRecv(closed.channelId);
    } else if (state.mic) {
      await setUpSend(closed.channelId, state.mic);
    }
    log("audio moved");
  } catch (e) {
    $("media").dataset.state = "failed";
    $("media").textContent = `Audio failed: ${e.code ?? e.message}`;
  } finally {
    old?.close();
  }
}

function closeMedia() {
  for (const key of ["recvPc", "sendPc"]) {
    state[key]?.close();
    state[key] = null;
  }
  state.mic?.stop();
  state.mic = null;
  $("ptt").disabled = true;
  $("media").dataset.state = "idle";
  $("media").textContent = "Connecting audio...";
}

// ---- push to talk ----

async function press() {
  if (state.pressed || !state.channel || $("ptt").disabled) return;
  state.pressed = true;
  setPtt("requesting");
  $("denied").textContent = "";
  let reply;
  try {
    reply = await request("ptt-start", { channelId: state.channel });
  } catch (e) {
    state.pressed = false;
    setPtt("idle");
    $("denied").textContent = `Cannot talk: ${e.code ?? e.message}`;
    return;
  }
  if (!reply.granted) {
    state.pressed = false;
    setPtt("idle");
    showDenied(reply.speaker);
    return;
  }
  if (!state.pressed) {
    // Let go before the grant arrived.
    request("ptt-stop", { channelId: state.channel }).catch(() => {});
    setPtt("idle");
    return;
  }
  state.talking = true;
  if (state.mic) state.mic.enabled = true;
  setPtt("talking");
}

function release() {
  if (!state.pressed) return;
  state.pressed = false;
  if (state.talking) {
    stopTalking();
    request("ptt-stop", { channelId: state.channel }).catch(() => {});
  }
}

function stopTalking() {
  state.talking = false;
  state.pressed = false;
  if (state.mic) state.mic.enabled = false;
  setPtt("idle");
}

function setPtt(mode) {
  const button = $("ptt");
  button.dataset.state = mode;
  button.setAttribute("aria-pressed", mode === "talking" ? "true" : "false");
  button.firstChild.textContent =
    mode === "talking" ? "Talking - release to stop" : mode === "requesting" ? "Requesting..." : "Hold to talk";
}

// ---- sign in ----

function tokenSubject(token) {
  try {
    const payload = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const claims = JSON.parse(atob(payload));
    return { userId: claims.sub, name: claims.name ?? claims.sub };
  } catch {
    return null;
  }
}

function signIn(token) {
  const subject = tokenSubject(token);
  if (!subject) {
    $("signin-error").textContent = "That is not a token.";
    return;
  }
  state.token = token;
  state.me = subject.userId;
  sessionStorage.setItem("talkgroup.token", token);
  $("who").textContent = subject.name;
  $("signin-error").textContent = "";
  connect();
}

function signOut(message) {
  sessionStorage.removeItem("talkgroup.token");
  state.token = null;
  state.ws = null;
  setConnection("offline");
  $("signin").hidden = false;
  $("channels").hidden = true;
  $("channel").hidden = true;
  $("signin-error").textContent = message;
}

async function devSignIn(name) {
  const response = await fetch("/dev/token", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ name }),
  });
  if (response.status === 404) {
    $("signin-error").textContent =
      "This server does not hand out development tokens: sign in with a token from your administrator.";
    return;
  }
  if (!response.ok) {
    $("signin-error").textContent = "Names are 1 to 64 characters.";
    return;
  }
  signIn((await response.json()).token);
}

// ---- wiring ----

$("signin-form").addEventListener("submit", (event) => {
  event.preventDefault();
  devSignIn($("name").value.trim()).catch((e) => {
    $("signin-error").textContent = `Sign-in failed: ${e.message}`;
  });
});
$("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  signIn($("token").value.trim());
});
$("join-form").addEventListener("submit", (event) => {
  event.preventDefault();
  joinChannel($("channel-id").value.trim());
});
$("leave").addEventListener("click", () => leaveChannel());

const ptt = $("ptt");
ptt.addEventListener("pointerdown", (event) => {
  ptt.setPointerCapture(event.pointerId);
  press();
});
ptt.addEventListener("pointerup", release);
ptt.addEventListener("pointercancel", release);
document.addEventListener("keydown", (event) => {
  if (event.code === "Space" && !event.repeat && !(event.target instanceof HTMLInputElement)) {
    event.preventDefault();
    press();
  }
});
document.addEventListener("keyup", (event) => {
  if (event.code === "Space") {
    event.preventDefault();
    release();
  }
});
window.addEventListener("blur", release);

// For tests and debugging: the inbound audio statistics of the channel stream.
window.talkgroup = {
  state,
  // Restarts the channel stream's ICE now, as a network change would.
  restartIce: () => state.restartRecvIce?.(),
  async inboundAudio() {
    if (!state.recvPc) return null;
    const stats = await state.recvPc.getStats();
    for (const report of stats.values()) {
      if (report.type === "inbound-rtp" && report.kind === "audio") {
        return {
          packetsReceived: report.packetsReceived ?? 0,
          totalAudioEnergy: report.totalAudioEnergy ?? 0,
          audioLevel: report.audioLevel ?? 0,
        };
      }
    }
    return { packetsReceived: 0, totalAudioEnergy: 0, audioLevel: 0 };
  },
};

if (state.token) {
  signIn(state.token);
}
