// edgefleet dashboard: fill the live numbers from server-sent events (no framework).
// Values are written with textContent only, so no device text can become markup.
(function () {
  "use strict";
  function num(v) {
    if (v === null || v === undefined) { return "-"; }
    if (typeof v === "number" && !Number.isInteger(v)) { return v.toFixed(3); }
    return String(v);
  }
  var fmt = {
    num: num,
    text: function (v) { return v === null || v === undefined ? "-" : String(v); },
    pct: function (v) { return v === null || v === undefined ? "-" : (v * 100).toFixed(1) + "%"; },
    online: function (v) { return v ? "online" : "offline"; },
    time: function (v) {
      if (v === null || v === undefined) { return "-"; }
      var d = new Date(v * 1000);
      function p(n) { return (n < 10 ? "0" : "") + n; }
      return d.getFullYear() + "-" + p(d.getMonth() + 1) + "-" + p(d.getDate()) + " " +
        p(d.getHours()) + ":" + p(d.getMinutes()) + ":" + p(d.getSeconds());
    }
  };
  var url = document.body.getAttribute("data-events");
  if (!url || !window.EventSource) { return; }
  var status = document.getElementById("live-status");
  var es = new EventSource(url);
  es.addEventListener("fleet", function (ev) {
    var data;
    try { data = JSON.parse(ev.data); } catch (e) { return; }
    var nodes = document.querySelectorAll("[data-live]");
    for (var i = 0; i < nodes.length; i++) {
      var n = nodes[i], field = n.getAttribute("data-live");
      var dev = n.getAttribute("data-device");
      var row = dev === null ? data : (data.rows || {})[dev];
      if (!row || !Object.prototype.hasOwnProperty.call(row, field)) { continue; }
      var f = fmt[n.getAttribute("data-fmt")] || num;
      var text = f(row[field]);
      if (field === "model_version" && n.textContent.indexOf("@") >= 0 && row[field]) {
        text = n.textContent.split("@")[0] + "@" + row[field];
      }
      n.textContent = text;
    }
    if (status) { status.textContent = "live · updated " + fmt.time(data.ts); }
  });
  es.onerror = function () { if (status) { status.textContent = "reconnecting…"; } };
}());
