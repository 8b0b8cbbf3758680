/* Feedback Loop labeling pages: keyboard, drafts, counters and the ranking list. No build step. */
(function () {
  "use strict";

  const DRAFT_PREFIX = "feedback-loop:draft:";
  const DRAFT_MAX_AGE_MS = 7 * 24 * 3600 * 1000;
  const pageOpenedAt = Date.now();

  function onReady(fn) {
    if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", fn);
    else fn();
  }

  function typedText(form) {
    return Array.from(form.querySelectorAll("textarea")).some((t) => t.value.trim() !== "");
  }

  /* --- submitting: Ctrl+Enter, time spent, no double submit --- */
  function setUpForms() {
    document.querySelectorAll("form[data-task-form]").forEach((form) => {
      let submitting = false;
      form.addEventListener("submit", (event) => {
        if (event.defaultPrevented) return;
        if (submitting) {
          event.preventDefault();
          return;
        }
        const spent = form.querySelector("input[name=time_spent_ms]");
        if (spent) spent.value = String(Date.now() - pageOpenedAt);
        if (form.matches("[data-rank-form]")) writeOrder(form);
        submitting = true;
        form.dataset.submitting = "true";
        setTimeout(() => { submitting = false; }, 4000);
      });
      window.addEventListener("beforeunload", (event) => {
        if (form.dataset.submitting !== "true" && form.dataset.dirty === "true" && typedText(form)) {
          event.preventDefault();
          event.returnValue = "";
        }
      });
      form.addEventListener("input", () => { form.dataset.dirty = "true"; });
    });

    document.addEventListener("keydown", (event) => {
      if (event.key !== "Enter" || !(event.ctrlKey || event.metaKey)) return;
      const form = (event.target.closest && event.target.closest("form[data-task-form]")) ||
        document.querySelector("form[data-task-form]");
      if (!form) return;
      event.preventDefault();
      form.requestSubmit();
    });
  }

  /* --- character counters: code points, as the server counts them (no maxlength: a browser would cut a paste
     short without a word; over the limit, the counter says so and the server refuses with the same numbers) --- */
  function setUpCounters() {
    document.querySelectorAll("textarea[data-max-chars]").forEach((textarea) => {
      const max = parseInt(textarea.dataset.maxChars, 10);
      const form = textarea.closest("form");
      const counter = form && form.querySelector("[data-char-count]");
      if (!counter) return;
      const update = () => {
        const n = Array.from(textarea.value).length;
        const over = n - max;
        counter.textContent = over > 0
          ? `${n.toLocaleString()} / ${max.toLocaleString()} characters: ${over.toLocaleString()} over the limit, shorten it to submit`
          : `${n.toLocaleString()} / ${max.toLocaleString()} characters`;
        counter.classList.toggle("over", n > max * 0.95);
        counter.classList.toggle("counter-over", over > 0);
        if (over > 0) textarea.setAttribute("aria-invalid", "true");
      };
      textarea.addEventListener("input", update);
      update();
    });
  }

  /* --- drafts kept in the browser too, so nothing typed is lost even offline --- */
  function setUpDrafts() {
    const now = Date.now();
    for (let i = localStorage.length - 1; i >= 0; i--) {
      const key = localStorage.key(i);
      if (!key || !key.startsWith(DRAFT_PREFIX)) continue;
      try {
        if (now - JSON.parse(localStorage.getItem(key)).savedAt > DRAFT_MAX_AGE_MS) localStorage.removeItem(key);
      } catch (e) {
        localStorage.removeItem(key);
      }
    }
    document.querySelectorAll("form[data-draft-key]").forEach((form) => {
      const key = DRAFT_PREFIX + form.dataset.draftKey;
      const textarea = form.querySelector("textarea[name=text]");
      if (!textarea) return;
      const stored = localStorage.getItem(key);
      if (stored && textarea.value.trim() === "") {
        try {
          const draft = JSON.parse(stored);
          if (draft.text) {
            textarea.value = draft.text;
            textarea.dispatchEvent(new Event("input", { bubbles: true }));
            const note = document.createElement("p");
            note.className = "ok-box small";
            note.textContent = "Restored the text you had typed in this task.";
            textarea.closest(".editor").before(note);
          }
        } catch (e) { /* ignore a corrupt draft */ }
      }
      textarea.addEventListener("input", () => {
        localStorage.setItem(key, JSON.stringify({ text: textarea.value, savedAt: Date.now() }));
      });
    });
    // A page that says "Saved" means the previous task went through: forget its browser draft.
    if (document.querySelector(".flash-success")) {
      const submitted = sessionStorage.getItem("feedback-loop:last-submitted");
      if (submitted) localStorage.removeItem(submitted);
    }
    document.querySelectorAll("form[data-draft-key]").forEach((form) => {
      form.addEventListener("submit", () => {
        sessionStorage.setItem("feedback-loop:last-submitted", DRAFT_PREFIX + form.dataset.draftKey);
      });
    });
  }

  /* --- skip and report dialogs --- */
  function setUpDialogs() {
    document.querySelectorAll("[data-open-dialog]").forEach((button) => {
      button.addEventListener("click", () => {
        const dialog = document.getElementById(button.dataset.openDialog);
        if (!dialog) return;
        const taskForm = document.querySelector("form[data-task-form]");
        const warning = dialog.querySelector("[data-typed-warning]");
        if (warning) warning.hidden = !(taskForm && typedText(taskForm));
        dialog.showModal();
      });
    });
    document.querySelectorAll("[data-other-text]").forEach((input) => {
      const fieldset = input.closest("fieldset");
      const other = fieldset.querySelector("[data-other-reason]");
      const sync = () => { input.required = other.checked; };
      fieldset.addEventListener("change", sync);
      input.addEventListener("input", () => { if (input.value.trim()) { other.checked = true; sync(); } });
      sync();
    });
    document.querySelectorAll("[data-close-dialog]").forEach((button) => {
      button.addEventListener("click", () => button.closest("dialog").close());
    });
    document.querySelectorAll("dialog form").forEach((form) => {
      form.addEventListener("submit", () => {
        const taskForm = document.querySelector("form[data-task-form]");
        if (taskForm) taskForm.dataset.submitting = "true";
      });
    });
  }

  /* --- ranking --- */
  function groupsOf(list) {
    const groups = [];
    list.querySelectorAll(":scope > .candidate").forEach((item, index) => {
      const id = item.dataset.id;  // an opaque handle, not a message id
      if (index > 0 && item.classList.contains("tied")) groups[groups.length - 1].push(id);
      else groups.push([id]);
    });
    return groups;
  }

  function writeOrder(form) {
    const list = form.querySelector(".candidates");
    form.querySelector("input[name=order]").value = JSON.stringify(groupsOf(list));
  }

  /* The arrangement is kept in the browser too, so a reload (or a crash) does not undo the labeler's ordering. */
  function orderKey(form) {
    return form.dataset.orderKey ? DRAFT_PREFIX + form.dataset.orderKey : null;
  }

  function keepOrder(form, groups) {
    const key = orderKey(form);
    if (key && form.dataset.touched === "true") {
      localStorage.setItem(key, JSON.stringify({ groups, savedAt: Date.now() }));
    }
  }

  function restoreOrder(list, form) {
    const key = orderKey(form);
    const stored = key && localStorage.getItem(key);
    if (!stored || form.querySelector(".error-box, .field-error")) return false;  // a re-shown form has the posted order
    try {
      const groups = JSON.parse(stored).groups;
      const items = new Map(Array.from(list.querySelectorAll(":scope > .candidate")).map((i) => [i.dataset.id, i]));
      const ids = groups.flat();
      if (ids.length !== items.size || !ids.every((id) => items.has(id))) return false;
      groups.forEach((group) => group.forEach((id, n) => {
        const item = items.get(id);
        item.classList.toggle("tied", n > 0);
        list.appendChild(item);
      }));
      return true;
    } catch (e) {
      return false;
    }
  }

  function refreshRanks(list) {
    let rank = 0;
    list.querySelectorAll(":scope > .candidate").forEach((item, index) => {
      if (index === 0) item.classList.remove("tied");
      if (!item.classList.contains("tied")) rank += 1;
      item.querySelector("[data-rank]").textContent = String(rank);
      const tie = item.querySelector("[data-tie]");
      tie.setAttribute("aria-pressed", item.classList.contains("tied") ? "true" : "false");
      tie.disabled = index === 0;
    });
    const form = list.closest("form");
    writeOrder(form);
    keepOrder(form, groupsOf(list));
  }

  function setUpRanking() {
    const list = document.getElementById("candidates");
    if (!list) return;
    const form = list.closest("form");
    let selected = null;

    const touch = () => { form.dataset.touched = "true"; form.dataset.dirty = "true"; };
    const select = (item) => {
      list.querySelectorAll(".candidate.selected").forEach((el) => el.classList.remove("selected"));
      selected = item;
      if (item) {
        item.classList.add("selected");
        item.focus({ preventScroll: false });
      }
    };
    const move = (item, direction) => {
      if (!item) return;
      if (direction < 0 && item.previousElementSibling) list.insertBefore(item, item.previousElementSibling);
      if (direction > 0 && item.nextElementSibling) list.insertBefore(item.nextElementSibling, item);
      touch();
      refreshRanks(list);
      item.focus();
    };
    const toggleTie = (item) => {
      if (!item || !item.previousElementSibling) return;
      item.classList.toggle("tied");
      touch();
      refreshRanks(list);
    };

    if (window.Sortable) {
      window.Sortable.create(list, {
        animation: 150,
        forceFallback: true,  // mouse and touch events instead of native drag and drop: the same everywhere
        fallbackTolerance: 3,
        handle: ".candidate-head",
        filter: "button, input, summary, a",
        preventOnFilter: false,
        ghostClass: "dragging-ghost",
        onEnd: () => { touch(); refreshRanks(list); },
      });
    }

    list.addEventListener("click", (event) => {
      const item = event.target.closest(".candidate");
      if (!item) return;
      const moveButton = event.target.closest("[data-move]");
      if (moveButton) { move(item, moveButton.dataset.move === "up" ? -1 : 1); return; }
      if (event.target.closest("[data-tie]")) { toggleTie(item); return; }
      if (!event.target.closest("details, a, input, label")) select(item);
    });
    list.addEventListener("change", (event) => {
      const item = event.target.closest(".candidate");
      if (!item) return;
      const count = item.querySelectorAll(".flags input:checked").length;
      const badge = item.querySelector("[data-flag-count]");
      badge.textContent = String(count);
      badge.hidden = count === 0;
    });

    document.addEventListener("keydown", (event) => {
      const target = event.target;
      if (target.matches("textarea, input[type=text], input:not([type]), select") || event.ctrlKey || event.metaKey || event.altKey) return;
      const items = Array.from(list.querySelectorAll(":scope > .candidate"));
      if (/^[1-9]$/.test(event.key)) {
        const item = items[parseInt(event.key, 10) - 1];
        if (item) { event.preventDefault(); select(item); }
      } else if ((event.key === "ArrowUp" || event.key === "ArrowDown") && (selected || target.closest(".candidate"))) {
        event.preventDefault();
        const item = selected || target.closest(".candidate");
        select(item);
        move(item, event.key === "ArrowUp" ? -1 : 1);
      } else if ((event.key === "=" || event.key === "t") && selected) {
        event.preventDefault();
        toggleTie(selected);
      } else if (event.key === "Escape") {
        select(null);
      }
    });

    list.querySelectorAll("[data-body]").forEach((body) => {
      const button = body.parentElement.querySelector("[data-expand]");
      if (body.scrollHeight > body.clientHeight + 4) button.hidden = false;
      else body.classList.remove("clamped");  // it fits: no fade that suggests more
      button.addEventListener("click", () => {
        const expanded = body.classList.toggle("expanded");
        button.textContent = expanded ? "Show less" : "Show the whole reply";
      });
    });

    form.addEventListener("submit", (event) => {
      const untouched = form.dataset.touched !== "true";
      const confirming = event.submitter && event.submitter.name === "confirm_untouched";
      const allBad = form.querySelector("input[name=all_unacceptable]").checked;
      if (untouched && !confirming && !allBad && !form.querySelector("[data-testid=untouched-warning]")) {
        event.preventDefault();
        form.dataset.submitting = "false";
        showUntouchedWarning(form);
      }
    }, true);

    if (restoreOrder(list, form)) {
      form.dataset.touched = "true";
      const note = document.createElement("p");
      note.className = "ok-box small";
      note.dataset.testid = "order-restored";
      note.textContent = "Restored the order you had arranged in this task.";
      list.before(note);
    }
    refreshRanks(list);
    form.addEventListener("submit", () => {
      if (orderKey(form)) sessionStorage.setItem("feedback-loop:last-submitted", orderKey(form));
    });
    setUpImprovement(list, form);
  }

  /* --- "Improve the best": the box starts from the reply ranked first when it is opened empty, follows the
     ranking while the labeler has not edited it, and says which reply it started from --- */
  function setUpImprovement(list, form) {
    const box = form.querySelector("[data-improve]");
    if (!box) return;
    const textarea = box.querySelector("textarea");
    const source = box.querySelector("[data-improve-source]");
    let filled = null;  // {letter, text} the box was last filled with
    const first = () => list.querySelector(":scope > .candidate");
    const describe = () => {
      if (!source) return;
      const top = first();
      if (!filled || !textarea.value.trim()) { source.textContent = ""; return; }
      source.textContent = top && top.dataset.letter === filled.letter
        ? `Started from reply ${filled.letter}, ranked first.`
        : `Started from reply ${filled.letter}, which is no longer ranked first.`;
    };
    const fill = () => {
      const top = first();
      if (!top) return;
      filled = { letter: top.dataset.letter, text: top.dataset.text };
      textarea.value = filled.text;
      textarea.dispatchEvent(new Event("input", { bubbles: true }));
      describe();
    };
    box.addEventListener("toggle", () => {
      if (box.open && !textarea.value.trim()) { fill(); textarea.focus(); }
    });
    box.querySelector("[data-improve-reset]").addEventListener("click", () => { fill(); textarea.focus(); });
    new MutationObserver(() => {
      if (filled && textarea.value === filled.text) fill();  // not edited yet: follow the reply ranked first
      else describe();
    }).observe(list, { childList: true });
    textarea.addEventListener("input", () => {
      const error = box.querySelector("[data-testid=improvement-error]");
      if (error && (!filled || textarea.value !== filled.text)) error.hidden = true;
    });
  }

  function showUntouchedWarning(form) {
    const box = document.createElement("div");
    box.className = "warn-box";
    box.setAttribute("role", "alert");
    box.dataset.testid = "untouched-warning";
    box.innerHTML = "<p><strong>You left the replies in the order they were shown.</strong> " +
      "If that really is your ranking, confirm it; otherwise reorder them.</p>";
    const confirm = document.createElement("button");
    confirm.type = "submit";
    confirm.name = "confirm_untouched";
    confirm.value = "on";
    confirm.dataset.testid = "confirm-untouched";
    confirm.textContent = "Yes, this order is right";
    box.appendChild(confirm);
    form.querySelector(".candidates").before(box);
    confirm.focus();
  }

  /* --- model-written drafts, streamed into the editor --- */
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  async function jsonOf(response) {
    const type = response.headers.get("content-type") || "";
    return type.includes("json") ? response.json() : { error: (await response.text()).slice(0, 300) };
  }

  function setUpModelDrafts() {
    const button = document.querySelector("[data-draft-url]");
    if (!button) return;
    const form = button.closest("form");
    const textarea = form.querySelector("textarea[name=text]");
    const status = form.querySelector("[data-draft-status]");
    const csrf = form.querySelector("input[name=csrfmiddlewaretoken]").value;
    let running = false;

    async function draft() {
      if (running) return;
      if (textarea.value.trim() && !window.confirm("Replace your text with a draft from the model? (Ctrl+Z in the editor brings yours back.)")) return;
      running = true;
      button.disabled = true;
      form.dataset.drafting = "true";
      const before = textarea.value;
      status.textContent = "Asking the model…";
      try {
        const started = await fetch(button.dataset.draftUrl, {
          method: "POST", credentials: "same-origin", headers: { "X-CSRFToken": csrf, Accept: "application/json" },
        });
        const request = await jsonOf(started);
        if (!started.ok) throw new Error(request.error || `The draft could not start (HTTP ${started.status}).`);
        textarea.readOnly = true;
        textarea.classList.add("streaming");
        const since = performance.now();
        for (;;) {
          await sleep(250);
          const polled = await fetch(request.poll, { credentials: "same-origin", headers: { Accept: "application/json" } });
          const state = await jsonOf(polled);
          if (!polled.ok) throw new Error(state.error || `The draft could not be read (HTTP ${polled.status}).`);
          if (state.text && state.text !== textarea.value) {
            textarea.value = state.text;
            textarea.dispatchEvent(new Event("input", { bubbles: true }));  // the counter and the preview follow
          }
          if (state.status === "done") {
            status.textContent = `Draft by ${state.model_version}: edit it until it is the reply you want, then submit.`;
            break;
          }
          if (state.status === "failed") throw new Error(`The model could not write a draft: ${state.error}`);
          const waited = (performance.now() - since) / 1000;
          if (waited > 180) throw new Error("No draft after 3 minutes: the model is busy. Write your own, or try again later.");
          status.textContent = state.status === "running" ? "The model is writing…"
            : waited > 15 ? "Still waiting for the model (it is busy with other work)…" : "Waiting for the model…";
        }
      } catch (error) {
        status.textContent = error.message;
        if (!textarea.value.trim()) textarea.value = before;
      } finally {
        running = false;
        button.disabled = false;
        delete form.dataset.drafting;
        textarea.readOnly = false;
        textarea.classList.remove("streaming");
        textarea.dispatchEvent(new Event("input", { bubbles: true }));
        textarea.focus();
      }
    }

    button.addEventListener("click", draft);
    document.addEventListener("keydown", (event) => {
      if (event.altKey && !event.ctrlKey && !event.metaKey && event.code === "KeyM") {
        event.preventDefault();
        draft();
      }
    });
  }

  /* A submission's response is the next task's page: put that page's own address in the address bar, so that a
     reload shows the task instead of posting the last one again. */
  function showPageUrl() {
    const url = document.body.dataset.pageUrl;
    if (url && window.location.pathname !== url) window.history.replaceState(null, "", url);
  }

  /* --- the turn being answered: in view when the page opens (the conversation panel scrolls, not the page) --- */
  function showLastTurn() {
    const last = document.querySelector("[data-last-turn]");
    if (!last) return;
    const panel = last.closest(".card");
    if (!panel || panel.scrollHeight <= panel.clientHeight + 4) return;
    const offset = last.getBoundingClientRect().top - panel.getBoundingClientRect().top + panel.scrollTop;
    panel.scrollTop = Math.max(0, offset - 48);
  }

  /* --- actions that cannot be undone in one click ask first (cancel a run, roll back a model) --- */
  function setUpConfirmations() {
    document.addEventListener("submit", (event) => {
      const form = event.target.closest("form[data-confirm]");
      if (form && !window.confirm(form.dataset.confirm)) event.preventDefault();
    }, true);
  }

  onReady(() => {
    showPageUrl();
    setUpConfirmations();
    showLastTurn();
    setUpForms();
    setUpModelDrafts();
    setUpCounters();
    setUpDrafts();
    setUpDialogs();
    setUpRanking();
  });
})();
