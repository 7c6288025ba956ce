/* maskmill: the HIT page of a local worker.
 *
 * Claim a HIT, show its questions one at a time, and submit the answers in small batches while the
 * worker goes on. The most recent answer is never sent before the next one is given (or the worker
 * confirms the final submit), so Undo always works on it; answers already sent are final (the API
 * counts a re-sent answer once, it does not change it). The assignment and its answers are kept in
 * sessionStorage, so a reload resumes where the worker was instead of losing the work.
 */
(function () {
  "use strict";

  const NS = window.Maskmill;
  const config = NS.config();
  const BATCH = 5; // answers per request while the HIT is in progress
  const RETRY_MS = 5000;
  const NO_WORK_RETRY_MS = 30000;
  const storeKey = "maskmill.hit." + config.token.slice(0, 12);

  const state = {
    assignment: null, // {assignment_id, questions, lease_expires_at}
    sent: 0, // answers[0:sent] are stored by the server
    sending: 0, // answers[0:sending] are sent or in flight (locked against undo)
    floor: 0, // answers[0:floor] came from an earlier page: final, never re-sent
    inFlight: null,
    retryTimer: null,
    finished: false,
  };

  const verifier = new NS.Verifier(document.getElementById("verifier"), {
    submitLabel: "Submit HIT",
    isLocked: (index) => index < state.sending,
    onAnswer: () => {
      save();
      flush(false);
    },
    onUndo: () => save(),
    onSubmit: () => finish(),
  });

  function save() {
    if (!state.assignment) return;
    const snapshot = { assignment: state.assignment, answers: verifier.answers, sent: state.sent };
    try {
      sessionStorage.setItem(storeKey, JSON.stringify(snapshot));
    } catch (err) {
      /* private mode or full storage: resuming after a reload is a convenience only */
    }
  }

  function forget() {
    try {
      sessionStorage.removeItem(storeKey);
    } catch (err) {
      /* ignore */
    }
  }

  function restore() {
    let snapshot = null;
    try {
      snapshot = JSON.parse(sessionStorage.getItem(storeKey) || "null");
    } catch (err) {
      snapshot = null;
    }
    if (!snapshot || !snapshot.assignment) return null;
    const expires = Date.parse(snapshot.assignment.lease_expires_at || "");
    if (!Number.isNaN(expires) && expires <= Date.now()) {
      forget();
      return null;
    }
    return snapshot;
  }

  function answersUrl() {
    return config.answersUrl.replace("{id}", encodeURIComponent(state.assignment.assignment_id));
  }

  /** Send what may be sent: all but the latest answer (in batches), or everything when ``all``. */
  async function flush(all) {
    if (state.inFlight) {
      await state.inFlight;
      if (!all || !state.assignment) return null;
    }
    const answers = verifier.answers;
    const end = all ? answers.length : answers.length - 1;
    const pending = end - state.sent;
    if (pending <= 0 || (!all && pending < BATCH)) return { ok: true, data: null };
    const batch = answers.slice(state.sent, end);
    state.sending = end;
    state.inFlight = NS.api(answersUrl(), {
      method: "POST",
      token: config.token,
      body: { answers: batch },
    });
    const result = await state.inFlight;
    state.inFlight = null;
    if (result.ok) {
      state.sent = end;
      save();
      return result;
    }
    state.sending = state.sent; // unlock: nothing of this batch is known to be stored
    if (isFatal(result)) {
      lost(result.error);
    } else {
      verifier.say("Could not save your answers yet (" + result.error.message + "). Retrying…");
      clearTimeout(state.retryTimer);
      state.retryTimer = setTimeout(() => flush(false), RETRY_MS);
    }
    return result;
  }

  /** The assignment is gone (lease expired, taken back): retrying the same request cannot help. */
  function isFatal(result) {
    return result.status >= 400 && result.status < 500 && result.status !== 429;
  }

  function lost(error) {
    verifier.stop();
    forget();
    state.assignment = null;
    NS.showMessage(
      "This HIT is no longer yours",
      error.message + " Your earlier answers in it were saved.",
      { label: "Get a new HIT", onClick: claim },
    );
  }

  async function finish() {
    if (state.finished) return;
    clearTimeout(state.retryTimer);
    verifier.say("Submitting…");
    const result = await flush(true);
    if (!result || !result.ok) {
      if (state.assignment) verifier.submitFailed("Submitting failed: press Submit to try again.");
      return;
    }
    if (result.data && result.data.complete === false) {
      state.sent = state.floor; // send everything again: the server counts repeats once
      verifier.submitFailed("The server is still missing answers: press Submit to send them again.");
      return;
    }
    state.finished = true;
    const count = verifier.answers.length;
    verifier.stop();
    forget();
    state.assignment = null;
    NS.showMessage(
      "HIT complete — thank you!",
      "You answered " + count + " questions. The next HIT is ready when you are.",
      { label: "Next HIT (Enter)", onClick: claim },
    );
  }

  async function claim() {
    NS.hideMessage();
    clearTimeout(state.retryTimer);
    const result = await NS.api(config.claimUrl, { method: "POST", token: config.token });
    if (result.ok && result.data && Array.isArray(result.data.questions)) {
      resume(result.data);
      return;
    }
    const error = result.error || { code: "empty", message: "No HIT was returned." };
    if (error.code === "not_qualified") {
      window.location.assign(config.qualificationUrl);
    } else if (error.code === "no_work" || result.status === 204) {
      NS.showMessage(
        "No work right now",
        "There are no HITs to do at the moment. This page checks again every 30 seconds.",
        { label: "Check now", onClick: claim },
      );
      state.retryTimer = setTimeout(claim, NO_WORK_RETRY_MS);
    } else if (error.code === "blocked") {
      NS.showMessage("No more work for this account", error.message);
    } else {
      NS.showMessage("Something went wrong", error.message, { label: "Try again", onClick: claim });
    }
  }

  /** A claim may resume an assignment begun elsewhere (another tab, a lost snapshot): its answered
   * questions come first, as final placeholders that are never sent again. */
  function resume(assignment) {
    const done = new Set(assignment.answered || []);
    const first = assignment.questions.filter((q) => done.has(q.id));
    const rest = assignment.questions.filter((q) => !done.has(q.id));
    const placeholders = first.map((q) => ({ question_id: q.id, value: null, ms: 0 }));
    const ordered = Object.assign({}, assignment, { questions: first.concat(rest) });
    begin(ordered, placeholders, placeholders.length);
  }

  function begin(assignment, answers, sent) {
    state.assignment = assignment;
    state.sent = sent;
    state.sending = sent;
    state.floor = sent; // answers before this were stored by an earlier page: never re-sent
    state.finished = false;
    NS.hideMessage();
    verifier.start(assignment.questions, answers);
    save();
  }

  // Enter on the "HIT complete" / "no work" message continues.
  document.addEventListener("keydown", (event) => {
    const panel = document.getElementById("message");
    const button = document.getElementById("message-action");
    if (event.key === "Enter" && panel && !panel.hidden && button && !button.hidden) {
      if (document.activeElement === button) return; // the button's own click handles it
      event.preventDefault();
      button.click();
    }
  });

  // Leaving the page: try to store what can be stored (the last answer stays undoable in the
  // snapshot, and is sent when the page comes back).
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "hidden" && state.assignment) flush(false);
  });

  const snapshot = restore();
  if (snapshot) {
    begin(snapshot.assignment, snapshot.answers || [], snapshot.sent || 0);
    if (verifier.answers.length > state.sent) flush(false);
  } else {
    claim();
  }
})();
