/* maskmill: the question UI shared by the HIT page and the qualification test.
 *
 * One question at a time: a large picture (the mask outline is drawn into it by the server), the
 * class name, Yes / No / Undo buttons and keys (Y, N, U or Backspace), progress "12 / 55", and a
 * last "submit" step so the final answer can be undone too. The time per answer is measured from
 * the moment the picture is on screen to the answer, and answering is disabled until then (nobody
 * can judge a picture they have not seen).
 *
 * The Verifier knows nothing about the API: its owner decides which answers are locked (already
 * submitted, so no longer undoable) and what submitting means.
 */
(function () {
  "use strict";

  const NS = (window.Maskmill = window.Maskmill || {});

  /** The page's JSON config block (no inline script: the CSP forbids it). */
  NS.config = function () {
    const element = document.getElementById("mm-config");
    return element ? JSON.parse(element.textContent) : {};
  };

  /** fetch() a JSON endpoint; never throws. Resolves to {ok, status, data} or {ok, status, error}. */
  NS.api = async function (url, options) {
    const opts = options || {};
    const headers = { Accept: "application/json" };
    if (opts.token) headers["X-Worker-Token"] = opts.token;
    if (opts.apiKey) headers.Authorization = "Bearer " + opts.apiKey;
    const init = { method: opts.method || "GET", headers, cache: "no-store", credentials: "omit" };
    if (opts.body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(opts.body);
    }
    if (opts.keepalive) init.keepalive = true;
    let response;
    try {
      response = await fetch(url, init);
    } catch (err) {
      return {
        ok: false,
        status: 0,
        error: { code: "network", message: "Cannot reach the server. Check your connection." },
      };
    }
    let data = null;
    if (response.status !== 204) {
      try {
        data = await response.json();
      } catch (err) {
        data = null;
      }
    }
    if (response.ok) return { ok: true, status: response.status, data };
    const error = (data && data.error) || {
      code: "http_" + response.status,
      message: "The server answered with status " + response.status + ".",
    };
    return { ok: false, status: response.status, error };
  };

  /** Create an element with a class and optional text. */
  NS.el = function (tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  };

  /** Show one "message" panel (title, text, optional action button / link), hide the rest. */
  NS.showMessage = function (title, text, action) {
    const panel = document.getElementById("message");
    if (!panel) return;
    document.getElementById("message-title").textContent = title;
    document.getElementById("message-text").textContent = text;
    const button = document.getElementById("message-action");
    const link = document.getElementById("message-link");
    button.hidden = true;
    button.onclick = null;
    if (link) link.hidden = true;
    if (action && action.href && link) {
      link.textContent = action.label;
      link.href = action.href;
      link.hidden = false;
    } else if (action && action.onClick) {
      button.textContent = action.label;
      button.onclick = action.onClick;
      button.hidden = false;
    }
    panel.hidden = false;
    if (action && !action.href && action.onClick) button.focus();
  };

  NS.hideMessage = function () {
    const panel = document.getElementById("message");
    if (panel) panel.hidden = true;
  };

  const PRELOAD_AHEAD = 2;

  class Verifier {
    /**
     * @param {HTMLElement} host  where the UI is built
     * @param {object} handlers   {onAnswer(record, index), onUndo(index), isLocked(index) -> bool,
     *                             onSubmit(answers), submitLabel}
     */
    constructor(host, handlers) {
      this.host = host;
      this.handlers = handlers;
      this.questions = [];
      this.answers = [];
      this.ready = false;
      this.active = false;
      this.shownAt = 0;
      this.loadToken = 0;
      this.loadedToken = -1;
      this.build();
      this.onKey = this.onKey.bind(this);
      document.addEventListener("keydown", this.onKey);
    }

    build() {
      const h = this.host;
      h.textContent = "";
      h.hidden = true;
      this.card = NS.el("section", "verifier");
      const bar = NS.el("div", "qbar");
      const ask = NS.el("p", "question");
      ask.append("Is the ");
      this.className = NS.el("strong", "class-name");
      this.className.id = "class-name";
      ask.append(this.className, " outlined correctly?");
      this.progress = NS.el("span", "progress", "0 / 0");
      this.progress.id = "progress";
      bar.append(ask, this.progress);
      const meter = NS.el("div", "meter");
      this.meterFill = NS.el("div", "meter-fill");
      meter.append(this.meterFill);

      this.stage = NS.el("div", "stage");
      this.image = NS.el("img", "question-image");
      this.image.id = "question-image";
      this.image.alt = "The picture to judge, with the outline drawn in yellow";
      this.image.decoding = "async";
      this.status = NS.el("p", "stage-status", "Loading…");
      this.status.id = "stage-status";
      this.stage.append(this.image, this.status);

      const buttons = NS.el("div", "answer-buttons");
      this.noButton = this.button("btn answer no", "No", "N", () => this.answer(false));
      this.noButton.id = "answer-no";
      this.undoButton = this.button("btn undo", "Undo", "U", () => this.undo());
      this.undoButton.id = "answer-undo";
      this.yesButton = this.button("btn answer yes", "Yes", "Y", () => this.answer(true));
      this.yesButton.id = "answer-yes";
      buttons.append(this.noButton, this.undoButton, this.yesButton);

      this.review = NS.el("div", "review");
      this.review.id = "review";
      this.review.hidden = true;
      const reviewText = NS.el("p", "", "All questions answered. Submit your answers, or undo the last one.");
      const reviewButtons = NS.el("div", "answer-buttons");
      this.reviewUndo = this.button("btn undo", "Undo", "U", () => this.undo());
      this.submitButton = this.button(
        "btn primary submit",
        this.handlers.submitLabel || "Submit",
        "Enter",
        () => this.submit(),
      );
      this.submitButton.id = "submit-answers";
      reviewButtons.append(this.reviewUndo, this.submitButton);
      this.review.append(reviewText, reviewButtons);

      this.note = NS.el("p", "note");
      this.note.id = "verifier-note";
      this.note.setAttribute("role", "status");

      this.card.append(bar, meter, this.stage, buttons, this.review, this.note);
      this.answerButtons = buttons;
      h.append(this.card);

      this.image.addEventListener("load", () => this.onImageLoad());
      this.image.addEventListener("error", () => this.onImageError());
      this.setReady(false);
    }

    button(className, label, key, onClick) {
      const button = NS.el("button", className);
      button.type = "button";
      button.append(NS.el("span", "label", label), NS.el("kbd", "", key));
      button.addEventListener("click", (event) => {
        event.preventDefault();
        onClick();
      });
      return button;
    }

    /** Show a new set of questions; ``answers`` restores earlier ones (a reloaded page). */
    start(questions, answers) {
      this.questions = questions.slice();
      this.answers = (answers || []).slice(0, questions.length);
      this.active = true;
      this.host.hidden = false;
      this.say("");
      this.show();
    }

    stop() {
      this.active = false;
      this.ready = false;
      this.host.hidden = true;
    }

    get index() {
      return this.answers.length;
    }

    show() {
      const total = this.questions.length;
      const i = this.index;
      this.meterFill.style.width = (total ? (100 * i) / total : 0) + "%";
      if (i >= total) {
        this.ready = false;
        this.progress.textContent = total + " / " + total;
        this.stage.hidden = true;
        this.answerButtons.hidden = true;
        this.review.hidden = false;
        this.reviewUndo.disabled = !this.canUndo();
        this.submitButton.disabled = false;
        this.submitButton.focus();
        return;
      }
      const question = this.questions[i];
      this.review.hidden = true;
      this.stage.hidden = false;
      this.answerButtons.hidden = false;
      this.progress.textContent = i + 1 + " / " + total;
      this.className.textContent = question.class_name;
      this.setReady(false);
      this.status.textContent = "Loading…";
      this.status.hidden = false;
      this.loadToken += 1;
      this.image.dataset.questionId = question.id;
      this.image.src = question.image_url;
      if (this.image.complete && this.image.naturalWidth > 0) this.onImageLoad();
      for (let k = 1; k <= PRELOAD_AHEAD && i + k < total; k += 1) {
        const ahead = new Image();
        ahead.src = this.questions[i + k].image_url;
      }
      this.undoButton.disabled = !this.canUndo();
    }

    onImageLoad() {
      if (!this.active || this.index >= this.questions.length) return;
      if (this.image.dataset.questionId !== String(this.questions[this.index].id)) return;
      if (this.loadedToken === this.loadToken) return; // "complete" already handled this load
      this.loadedToken = this.loadToken;
      this.status.hidden = true;
      this.shownAt = performance.now();
      this.setReady(true);
    }

    onImageError() {
      if (!this.active || this.index >= this.questions.length) return;
      this.setReady(false);
      this.status.hidden = false;
      this.status.textContent = "The picture did not load. Retrying…";
      const token = this.loadToken;
      setTimeout(() => {
        if (token !== this.loadToken || !this.active) return;
        const question = this.questions[this.index];
        this.image.src = question.image_url + "?retry=" + Date.now();
      }, 2000);
    }

    setReady(ready) {
      this.ready = ready;
      this.yesButton.disabled = !ready;
      this.noButton.disabled = !ready;
      this.card.classList.toggle("waiting", !ready);
    }

    canUndo() {
      const last = this.index - 1;
      return last >= 0 && !this.handlers.isLocked(last);
    }

    answer(value) {
      if (!this.active || !this.ready || this.index >= this.questions.length) return;
      const question = this.questions[this.index];
      const record = {
        question_id: question.id,
        value: value,
        ms: Math.max(0, Math.round(performance.now() - this.shownAt)),
      };
      this.answers.push(record);
      this.say("");
      this.flash(value ? "yes" : "no");
      this.handlers.onAnswer(record, this.answers.length - 1);
      this.show();
    }

    undo() {
      if (!this.active || this.index === 0) return;
      if (!this.canUndo()) {
        this.say("That answer was already submitted and cannot be changed.");
        return;
      }
      this.answers.pop();
      this.say("Undone: answer this picture again.");
      if (this.handlers.onUndo) this.handlers.onUndo(this.answers.length);
      this.show();
    }

    submit() {
      if (!this.active || this.index < this.questions.length || this.submitButton.disabled) return;
      this.submitButton.disabled = true;
      this.reviewUndo.disabled = true;
      this.handlers.onSubmit(this.answers.slice());
    }

    /** Re-enable the submit step after a failed submission. */
    submitFailed(message) {
      this.submitButton.disabled = false;
      this.reviewUndo.disabled = !this.canUndo();
      this.say(message);
    }

    say(text) {
      this.note.textContent = text;
    }

    flash(kind) {
      this.card.classList.remove("flash-yes", "flash-no");
      void this.card.offsetWidth; // restart the CSS animation
      this.card.classList.add("flash-" + kind);
    }

    onKey(event) {
      if (!this.active || event.ctrlKey || event.metaKey || event.altKey) return;
      const target = event.target;
      if (target && (target.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(target.tagName))) {
        return;
      }
      const key = event.key;
      if (key === "Backspace" || key === "u" || key === "U") {
        event.preventDefault();
        if (!event.repeat) this.undo();
        return;
      }
      if (event.repeat) return; // holding a key must not answer a row of pictures
      if (key === "y" || key === "Y") {
        event.preventDefault();
        this.answer(true);
      } else if (key === "n" || key === "N") {
        event.preventDefault();
        this.answer(false);
      } else if (key === "Enter" && this.index >= this.questions.length) {
        event.preventDefault();
        if (!this.submitButton.disabled) this.submit();
      }
    }
  }

  NS.Verifier = Verifier;
})();
