/* maskmill: the qualification test.
 *
 * The same question UI as a HIT; answers stay in the page (undo is always possible) until the
 * worker submits the whole test, then the server says pass / fail and when a retake is allowed.
 */
(function () {
  "use strict";

  const NS = window.Maskmill;
  const config = NS.config();
  let retakeTimer = null;

  const verifier = new NS.Verifier(document.getElementById("verifier"), {
    submitLabel: "Submit test",
    isLocked: () => false,
    onAnswer: () => {},
    onSubmit: (answers) => submit(answers),
  });

  function questionsOf(data) {
    if (Array.isArray(data)) return data;
    return data && Array.isArray(data.questions) ? data.questions : null;
  }

  function retryAfter(error) {
    const details = (error && error.details) || {};
    return typeof details.retry_after_s === "number" ? details.retry_after_s : null;
  }

  function waitText(seconds) {
    if (seconds < 90) return Math.max(1, Math.ceil(seconds)) + " seconds";
    if (seconds < 5400) return Math.ceil(seconds / 60) + " minutes";
    return Math.round(seconds / 3600) + " hours";
  }

  /** A retake is allowed in ``seconds``: say so, and offer it once the time has come. */
  function offerRetake(title, text, seconds) {
    clearTimeout(retakeTimer);
    if (seconds === null) {
      NS.showMessage(title, text);
      return;
    }
    if (seconds <= 0) {
      NS.showMessage(title, text, { label: "Take the test again", onClick: load });
      return;
    }
    NS.showMessage(title, text + " You can try again in " + waitText(seconds) + ".");
    retakeTimer = setTimeout(
      () => NS.showMessage(title, text, { label: "Take the test again", onClick: load }),
      seconds * 1000,
    );
  }

  async function load() {
    NS.hideMessage();
    document.getElementById("intro").hidden = true;
    const result = await NS.api(config.testUrl, { token: config.token });
    const questions = result.ok ? questionsOf(result.data) : null;
    if (questions && questions.length) {
      verifier.start(questions, []);
      return;
    }
    if (result.ok) {
      NS.showMessage("No test available", "The test has no questions yet. Please come back later.", {
        label: "Try again",
        onClick: load,
      });
      return;
    }
    if (result.error.code === "already_qualified") {
      NS.showMessage("You are qualified", result.error.message, {
        label: "Start working",
        href: config.hitUrl,
      });
      return;
    }
    const wait = retryAfter(result.error);
    if (wait !== null) {
      offerRetake("Not yet", result.error.message, wait);
    } else {
      NS.showMessage("The test cannot start", result.error.message, {
        label: "Try again",
        onClick: load,
      });
    }
  }

  async function submit(answers) {
    verifier.say("Submitting…");
    const result = await NS.api(config.testUrl, {
      method: "POST",
      token: config.token,
      body: { answers },
    });
    if (!result.ok) {
      if (result.status >= 400 && result.status < 500 && result.status !== 429) {
        verifier.stop();
        offerRetake("The test was not accepted", result.error.message, retryAfter(result.error));
      } else {
        verifier.submitFailed("Submitting failed (" + result.error.message + "). Try again.");
      }
      return;
    }
    verifier.stop();
    const outcome = result.data;
    const score = outcome.correct + " of " + outcome.total + " correct.";
    if (outcome.passed) {
      NS.showMessage("You passed!", score + " You can start working now.", {
        label: "Start working",
        href: config.hitUrl,
      });
      return;
    }
    const wait = typeof outcome.retry_after_s === "number" ? outcome.retry_after_s : null;
    const text =
      score +
      " That is not enough to pass. Read the instructions and examples again before retrying." +
      (wait === null ? " No retakes are left." : "");
    offerRetake("Not passed this time", text, wait);
  }

  document.getElementById("start-test").addEventListener("click", load);
})();
