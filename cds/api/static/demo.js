// The demo EHR page: calls the service's own CDS Hooks endpoints exactly as an EHR does.
"use strict";
(function () {
  const config = JSON.parse(document.getElementById("demo-config").textContent);
  const md = window.CdsMarkdown;
  const $ = (id) => document.getElementById(id);
  const state = { patient: null, drafts: [], appointments: [], seq: 0, cards: [], lastHook: null, extra: 0 };

  function uuid() {
    if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
    const b = crypto.getRandomValues(new Uint8Array(16));
    b[6] = (b[6] & 0x0f) | 0x40; b[8] = (b[8] & 0x3f) | 0x80;
    const h = [...b].map((x) => x.toString(16).padStart(2, "0")).join("");
    return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
  }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k === "class") node.className = v; else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v === true ? "" : v);
    }
    for (const c of children) if (c !== null && c !== undefined) node.append(c);
    return node;
  }

  function showDev(method, url, request, status, response) {
    $("dev-url").textContent = `${method} ${url}`;
    $("dev-request").textContent = request === undefined ? "" : JSON.stringify(request, null, 2);
    $("dev-status").textContent = String(status);
    $("dev-response").textContent = typeof response === "string" ? response : JSON.stringify(response, null, 2);
  }

  async function call(method, url, body) {
    const init = { method, headers: { Accept: "application/json" } };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = typeof body === "string" ? body : JSON.stringify(body);
    }
    const response = await fetch(url, init);
    const text = await response.text();
    let data = text;
    try { data = JSON.parse(text); } catch (e) { /* shown as text */ }
    return { status: response.status, ok: response.ok, data };
  }

  function problem(data) {
    if (data && Array.isArray(data.issue)) return data.issue.map((i) => i.diagnostics || i.code).join("; ");
    return typeof data === "string" ? data.slice(0, 300) : "unexpected answer";
  }

  // ---- patient
  async function loadPatients() {
    const { data } = await call("GET", "/demo/api/patients");
    for (const p of data.patients) {
      const born = p.birthDate ? `, born ${p.birthDate}` : "";
      $("patient-select").append(el("option", { value: p.name }, `${p.display} (${p.gender || "?"}${born}) [${p.name}]`));
    }
  }

  function list(id, items) {
    const ul = $(id); ul.replaceChildren();
    if (!items.length) ul.append(el("li", { class: "none" }, "none recorded"));
    for (const item of items) ul.append(el("li", {}, item));
  }

  function setPatient(p) {
    state.patient = p; state.drafts = []; state.appointments = []; state.cards = [];
    const s = p.summary;
    $("patient-error").hidden = true;
    $("summary").hidden = false;
    $("summary-name").textContent = s.name;
    $("summary-demo").textContent = `${s.gender || "sex not recorded"}, born ${s.birthDate || "?"} · id ${s.id}`;
    list("summary-conditions", s.conditions); list("summary-allergies", s.allergies);
    list("summary-medications", s.medications);
    $("order-form").disabled = false; $("appointment-form").disabled = false;
    $("area-select").value = "";
    for (const box of document.querySelectorAll("#products input")) box.checked = false;
    $("sign-status").textContent = ""; $("book-status").textContent = "";
    renderDrafts(); renderAppointments(); renderCards([], null);
    hook("patient-view"); // the chart is open: an EHR fires patient-view
  }

  function patientError(message) {
    const p = $("patient-error"); p.textContent = message; p.hidden = false;
  }

  async function choosePatient() {
    const name = $("patient-select").value;
    if (!name) return;
    const r = await call("GET", `/demo/api/patients/${encodeURIComponent(name)}`);
    if (r.ok) setPatient(r.data); else patientError(problem(r.data));
  }

  async function pasteBundle() {
    const r = await call("POST", "/demo/api/bundle", $("bundle-text").value);
    if (r.ok) { $("patient-select").value = ""; setPatient(r.data); } else patientError(problem(r.data));
  }

  // ---- orders
  const draftRef = `ServiceRequest/${config.draftId}`;
  const refOf = (r) => `${r.resourceType}/${r.id}`;

  function mesotherapyOrder() {
    const area = config.orderables.find((o) => o.code === $("area-select").value);
    if (!area) return null;
    const order = {
      resourceType: "ServiceRequest", id: config.draftId, status: "draft", intent: "order",
      code: { coding: [{ system: config.orderableSystem, code: area.code, display: area.display }], text: area.display },
      subject: { reference: `Patient/${state.patient.patientId}` },
    };
    const details = [...document.querySelectorAll("#products input:checked")]
      .map((box) => config.products.find((p) => p.id === box.value).detail);
    if (details.length) order.orderDetail = details;
    return order;
  }

  function label(r) {
    const code = r.code || r.medicationCodeableConcept || {};
    return code.text || (code.coding && code.coding[0] && code.coding[0].display) || r.resourceType;
  }

  function renderDrafts() {
    const ul = $("drafts"); ul.replaceChildren();
    if (!state.drafts.length) ul.append(el("li", { class: "none" }, "No draft orders."));
    for (const r of state.drafts) {
      const details = (r.orderDetail || []).map((d) => d.text).join(", ");
      ul.append(el("li", { "data-ref": refOf(r) }, el("strong", {}, label(r)),
        details ? ` (${details})` : "", " ",
        el("button", { type: "button", class: "remove", onclick: () => removeDraft(refOf(r)) }, "Remove")));
    }
    $("sign").disabled = !state.drafts.length;
  }

  function removeDraft(ref) {
    state.drafts = state.drafts.filter((r) => refOf(r) !== ref);
    if (ref === draftRef) $("area-select").value = "";
    renderDrafts();
  }

  function orderChanged() {
    const order = mesotherapyOrder();
    state.drafts = state.drafts.filter((r) => refOf(r) !== draftRef);
    if (order) state.drafts.unshift(order);
    renderDrafts();
    $("sign-status").textContent = "";
    if (order) hook("order-select"); else renderCards([], null);
  }

  async function sign() {
    const open = state.cards.filter((c) => !c.done);
    if (state.lastHook === "order-sign" && state.cards.length && !open.length) {
      finishSigning();
      return;
    }
    const cards = await hook("order-sign");
    if (cards === null) return;
    if (!cards.length) finishSigning();
    else $("sign-status").textContent = `${cards.length} card(s): accept a suggestion or override each, then sign again.`;
  }

  function finishSigning() {
    const n = state.drafts.length;
    state.drafts = []; $("area-select").value = "";
    renderDrafts(); renderCards([], null);
    $("sign-status").textContent = `${n} order(s) signed.`;
  }

  // ---- appointments
  let appointmentSeq = 0;

  function inDays(n) {
    const d = new Date(); d.setDate(d.getDate() + n);
    return d.toISOString().slice(0, 10);
  }

  function proposedAppointment() {
    const area = config.orderables.find((o) => o.code === $("appointment-area").value);
    const day = $("appointment-date").value || inDays(14);
    return {
      resourceType: "Appointment", id: `mesotherapy-appointment-${++appointmentSeq}`, status: "proposed",
      serviceType: [{ coding: [{ system: config.orderableSystem, code: area.code, display: area.display }], text: area.display }],
      description: area.display, start: `${day}T09:00:00Z`, end: `${day}T09:45:00Z`,
      participant: [{ actor: { reference: `Patient/${state.patient.patientId}` }, status: "accepted" },
        { actor: { reference: "Practitioner/demo-clinician" }, status: "accepted" }],
    };
  }

  function appointmentLabel(a) {
    const st = (a.serviceType || [])[0] || {};
    return a.description || st.text || (st.coding && st.coding[0] && st.coding[0].display) || "Appointment";
  }

  function renderAppointments() {
    const ul = $("appointments"); ul.replaceChildren();
    if (!state.appointments.length) ul.append(el("li", { class: "none" }, "No appointments."));
    for (const a of state.appointments) {
      const day = a.start ? ` on ${a.start.slice(0, 10)}` : "";
      const remove = a.status === "proposed"
        ? el("button", { type: "button", class: "remove", onclick: () => removeAppointment(refOf(a)) }, "Remove") : null;
      ul.append(el("li", { "data-ref": refOf(a), "data-status": a.status }, el("strong", {}, appointmentLabel(a)), day, " ",
        el("span", { class: "appointment-status" }, `(${a.status})`), " ", remove));
    }
  }

  function removeAppointment(ref) {
    state.appointments = state.appointments.filter((a) => refOf(a) !== ref);
    renderAppointments();
  }

  const proposed = () => state.appointments.filter((a) => a.status === "proposed");

  async function book() {
    const open = state.cards.filter((c) => !c.done);
    if (state.lastHook === "appointment-book" && state.cards.length && !open.length && proposed().length) {
      finishBooking();
      return;
    }
    if (!proposed().length) state.appointments.push(proposedAppointment());
    renderAppointments();
    const cards = await hook("appointment-book");
    if (cards === null) return;
    if (!cards.length) finishBooking();
    else $("book-status").textContent = `${cards.length} card(s): accept a suggestion or override each, then book again.`;
  }

  function finishBooking() {
    const booking = proposed();
    for (const a of booking) a.status = "booked";
    renderAppointments(); renderCards([], null);
    $("book-status").textContent = `${booking.length} appointment(s) booked.`;
  }

  // ---- CDS Hooks
  async function hook(name) {
    const serviceId = config.services[name];
    const context = { userId: "Practitioner/demo-clinician", patientId: state.patient.patientId };
    let prefetch = state.patient.prefetch;
    if (name === "order-select" || name === "order-sign") {
      context.draftOrders = { resourceType: "Bundle", type: "collection", entry: state.drafts.map((r) => ({ resource: r })) };
      if (name === "order-select") context.selections = [draftRef];
    } else if (name === "patient-view") {
      prefetch = { ...prefetch, ...state.patient.planned }; // what is planned for the patient, and the record
    } else if (name === "appointment-book") {
      context.appointments = { resourceType: "Bundle", type: "collection", entry: proposed().map((a) => ({ resource: a })) };
      prefetch = { ...prefetch, plannedOrders: state.patient.planned.plannedOrders };
    }
    const body = { hook: name, hookInstance: uuid(), context, prefetch };
    const url = `/cds-services/${serviceId}`;
    const seq = ++state.seq;
    $("cds-hook").textContent = `(${name}: calling…)`;
    const r = await call("POST", url, body);
    if (seq !== state.seq) return null; // a newer call is under way
    showDev("POST", url, body, r.status, r.data);
    $("cds-hook").textContent = `(${name}, HTTP ${r.status})`;
    if (!r.ok || !Array.isArray(r.data.cards)) {
      $("cards").replaceChildren(el("p", { class: "error", role: "alert" }, `The service answered ${r.status}: ${problem(r.data)}`));
      return null;
    }
    state.lastHook = name;
    renderCards(r.data.cards, serviceId);
    return r.data.cards;
  }

  async function feedback(serviceId, entry) {
    const url = `/cds-services/${serviceId}/feedback`;
    const body = { feedback: [{ outcomeTimestamp: new Date().toISOString(), ...entry }] };
    const r = await call("POST", url, body);
    showDev("POST", url, body, r.status, r.data);
    return r;
  }

  function applyActions(actions) {
    for (const a of actions || []) {
      if (a.type === "delete" && a.resourceId) {
        if (a.resourceId.startsWith("Appointment/")) removeAppointment(a.resourceId); else removeDraft(a.resourceId);
      } else if ((a.type === "create" || a.type === "update") && a.resource) {
        const r = { ...a.resource };
        if (!r.id) r.id = `suggested-${++state.extra}`;
        if (r.resourceType === "Appointment") {
          state.appointments = state.appointments.filter((d) => refOf(d) !== refOf(r)).concat([r]);
        } else {
          state.drafts = state.drafts.filter((d) => refOf(d) !== refOf(r)).concat([r]);
        }
      }
    }
    renderDrafts(); renderAppointments();
  }

  function renderCards(cards, serviceId) {
    state.cards = cards.map((c) => ({ card: c, done: false }));
    const box = $("cards"); box.replaceChildren();
    if (!cards.length) {
      const none = !serviceId ? "No advice yet: order something or book an appointment."
        : serviceId === config.services["patient-view"] ? "No cards: nothing to report for what is planned."
        : serviceId === config.services["appointment-book"] ? "No cards: nothing to report for this appointment."
        : "No cards: nothing to report for these orders.";
      box.append(el("p", { class: "none" }, none));
      return;
    }
    state.cards.forEach((entry) => box.append(cardElement(entry, serviceId)));
  }

  function cardElement(entry, serviceId) {
    const c = entry.card;
    const topic = (c.source && c.source.topic && c.source.topic.code) || "";
    const status = el("p", { class: "feedback-status", role: "status" });
    const node = el("article", { class: `card ${c.indicator}`, "data-topic": topic, "data-indicator": c.indicator, "data-uuid": c.uuid });
    const done = (text) => {
      entry.done = true; node.classList.add("done"); status.textContent = text;
      for (const b of node.querySelectorAll("button, select, input")) b.disabled = true;
    };
    node.append(el("div", { class: "head" }, el("span", { class: "indicator" }, c.indicator), el("span", { class: "summary" }, c.summary)));
    if (c.source) {
      const src = c.source.url ? el("a", { href: c.source.url, target: "_blank", rel: "noopener" }, c.source.label) : c.source.label;
      node.append(el("div", { class: "source" }, "Source: ", src));
    }
    if (c.detail) {
      const detail = el("div", { class: "detail" });
      detail.innerHTML = md.render(c.detail); // the renderer escapes everything it does not produce itself
      node.append(detail);
    }
    const actions = el("div", { class: "actions" });
    for (const s of c.suggestions || []) {
      actions.append(el("button", {
        type: "button", class: "suggestion", "data-uuid": s.uuid,
        onclick: async () => {
          applyActions(s.actions);
          const r = await feedback(serviceId, { card: c.uuid, outcome: "accepted", acceptedSuggestions: [{ id: s.uuid }] });
          done(r.ok ? `Accepted: ${s.label}` : `Accepted: ${s.label} (feedback not recorded: ${problem(r.data)})`);
        },
      }, s.label));
    }
    node.append(actions);
    if ((c.overrideReasons || []).length || c.suggestions) {
      const reason = el("select", { class: "override-reason", "aria-label": "Override reason" },
        el("option", { value: "" }, "Override reason…"),
        ...(c.overrideReasons || []).map((r, i) => el("option", { value: String(i) }, r.display || r.code)));
      const comment = el("input", { type: "text", class: "override-comment", placeholder: "comment (optional)", "aria-label": "Comment" });
      const button = el("button", {
        type: "button", class: "override",
        onclick: async () => {
          const chosen = reason.value === "" ? null : c.overrideReasons[Number(reason.value)];
          const entryBody = { card: c.uuid, outcome: "overridden" };
          if (chosen || comment.value) {
            entryBody.overrideReason = {};
            if (chosen) entryBody.overrideReason.reason = chosen;
            if (comment.value) entryBody.overrideReason.userComment = comment.value;
          }
          const r = await feedback(serviceId, entryBody);
          const why = chosen ? (chosen.display || chosen.code) : "no reason given";
          done(r.ok ? `Overridden: ${why}` : `Override not recorded: ${problem(r.data)}`);
        },
      }, "Override");
      node.append(el("div", { class: "override" }, reason, comment, button));
    }
    if ((c.links || []).length) {
      node.append(el("div", { class: "links" }, ...c.links.map((l) => el("a", { href: l.url, target: "_blank", rel: "noopener" }, l.label))));
    }
    node.append(status);
    return node;
  }

  // ---- start
  for (const o of config.orderables) $("area-select").append(el("option", { value: o.code }, o.display));
  for (const p of config.products) {
    $("products").append(el("label", {}, el("input", { type: "checkbox", value: p.id, onchange: orderChanged }), p.display));
  }
  $("patient-select").addEventListener("change", choosePatient);
  $("bundle-load").addEventListener("click", pasteBundle);
  $("area-select").addEventListener("change", orderChanged);
  $("sign").addEventListener("click", sign);
  for (const o of config.orderables) $("appointment-area").append(el("option", { value: o.code }, o.display));
  $("appointment-date").value = inDays(14);
  $("book").addEventListener("click", book);
  loadPatients();
})();
