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

  /* --- character counters --- */
  function setUpCounters() {
    document.querySelectorAll("textarea[data-max-chars]").forEach((textarea) => {
      const max = parseInt(textarea.dataset.maxChars, 10);
      const form = textarea.closest("form");
      const counter = form && form.querySelector("[data-char-count]");
      if (!counter) return;
      const update = () => {
        const n = textarea.value.length;
        counter.textContent = `${n.toLocaleString()} / ${max.toLocaleString()} characters`;
        counter.classList.toggle("over", n > max * 0.95);
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
    writeOrder(list.closest("form"));
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

    refreshRanks(list);
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

  onReady(() => {
    setUpForms();
    setUpCounters();
    setUpDrafts();
    setUpDialogs();
    setUpRanking();
  });
})();
