// smsblock console: the only script (no inline script is allowed by the CSP).
// 1. times: <time datetime="...Z"> shown in the browser's local time;
// 2. forms: a datetime-local field (local time) also sent as UTC in its data-utc field;
// 3. live progress: pages with data-live poll /live and update runs and jobs in place,
//    reloading when the set of jobs or runs, or a state, changed.
(function () {
  "use strict";
  function pad(n) { return (n < 10 ? "0" : "") + n; }
  function localTimes(root) {
    var times = root.querySelectorAll("time[datetime]");
    for (var i = 0; i < times.length; i++) {
      var d = new Date(times[i].getAttribute("datetime"));
      if (isNaN(d.getTime())) continue;
      times[i].textContent = d.getFullYear() + "-" + pad(d.getMonth() + 1) + "-" + pad(d.getDate()) +
        " " + pad(d.getHours()) + ":" + pad(d.getMinutes());
      times[i].title = times[i].getAttribute("datetime");
    }
  }
  function utcFields() {
    var forms = document.querySelectorAll("form");
    for (var i = 0; i < forms.length; i++) {
      forms[i].addEventListener("submit", function (ev) {
        var inputs = ev.target.querySelectorAll("input[data-utc]");
        for (var j = 0; j < inputs.length; j++) {
          var target = document.getElementById(inputs[j].getAttribute("data-utc"));
          if (!target) continue;
          var v = inputs[j].value;
          var d = v ? new Date(v) : null;   // datetime-local text is read as local time
          target.value = d && !isNaN(d.getTime()) ? d.toISOString() : "";
        }
      });
    }
  }
  function setAll(selector, text) {
    var els = document.querySelectorAll(selector);
    for (var i = 0; i < els.length; i++) {
      if (els[i].tagName === "PROGRESS") els[i].value = text; else els[i].textContent = text;
    }
  }
  function live() {
    var main = document.querySelector("main[data-live]");
    if (!main) return;
    var fingerprint = main.getAttribute("data-live");
    function poll() {
      var xhr = new XMLHttpRequest();
      xhr.open("GET", "/live");
      xhr.onload = function () {
        if (xhr.status !== 200) return;   // signed out or server gone: stop quietly
        var doc = JSON.parse(xhr.responseText);
        if (doc.fingerprint !== fingerprint) {
          var active = document.activeElement;
          var typing = active && (active.tagName === "INPUT" || active.tagName === "SELECT") &&
            active.type !== "submit";
          if (!typing) { window.location.reload(); return; }
        }
        Object.keys(doc.runs).forEach(function (id) {
          var r = doc.runs[id];
          var sel = '[data-run="' + id + '"]';
          setAll(sel + '[data-f="stage"]', r.stage);
          setAll(sel + '[data-f="progress"]', r.progress);
          setAll(sel + '[data-f="bar"]', parseInt(r.progress, 10) || 0);
          setAll(sel + '[data-f="message"]', r.message);
          setAll(sel + '[data-f="ami"]', r.ami);
        });
        Object.keys(doc.jobs).forEach(function (id) {
          setAll('[data-job="' + id + '"][data-f="message"]', doc.jobs[id].message);
        });
        window.setTimeout(poll, 2000);
      };
      xhr.send();
    }
    window.setTimeout(poll, 2000);
  }
  document.addEventListener("DOMContentLoaded", function () {
    localTimes(document);
    utcFields();
    live();
  });
})();
