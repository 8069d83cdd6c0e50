// The rating sheet's behaviour; inlined into the page. It never names a system: it knows items
// only by position and sample id, and replies only as side A or B.
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("sheet-data").textContent);
  var ids = data.ids;
  var total = ids.length;
  var storageKey = "human-eval-sheet:" + data.sheet;
  var sides = ["A", "B"];
  // The ratings CSV header; the scorer reads these names (human_eval/formats.py).
  var columns = ["id", "choice", "a_broken", "b_broken", "comment"];
  // sample id -> {choice: "A"|"B"|"tie"|"", comment: string, broken: {A: bool, B: bool}}
  var ratings = {};
  var storageOk = true;

  function load() {
    try {
      var raw = window.localStorage.getItem(storageKey);
      if (raw) {
        var parsed = JSON.parse(raw);
        if (parsed && typeof parsed === "object" && parsed.ratings) { ratings = parsed.ratings; }
      }
    } catch (e) { storageOk = false; }
  }
  function save() {
    try {
      window.localStorage.setItem(storageKey, JSON.stringify({ratings: ratings, saved: new Date().toISOString()}));
    } catch (e) { storageOk = false; showStorageWarning(); }
  }
  function showStorageWarning() {
    var w = document.getElementById("storage-warning");
    if (w && !storageOk) { w.hidden = false; }
  }
  function entry(id) {
    if (!Object.prototype.hasOwnProperty.call(ratings, id)) { ratings[id] = {choice: "", comment: ""}; }
    // Progress saved before the "loops or breaks" mark existed has no broken field.
    if (!ratings[id].broken) { ratings[id].broken = {A: false, B: false}; }
    return ratings[id];
  }
  function isChoice(c) { return c === "A" || c === "B" || c === "tie"; }
  function isBroken(r, side) { return !!(r && r.broken && r.broken[side]); }
  function countRated() {
    var n = 0;
    for (var i = 0; i < total; i++) {
      var r = ratings[ids[i]];
      if (r && isChoice(r.choice)) { n++; }
    }
    return n;
  }
  function paintItem(index) {
    var item = document.getElementById("item-" + index);
    var r = ratings[ids[index]];
    var choice = r && isChoice(r.choice) ? r.choice : "";
    item.classList.toggle("rated", choice !== "");
    var replies = item.querySelectorAll(".reply");
    for (var k = 0; k < replies.length; k++) {
      var side = replies[k].getAttribute("data-side");
      replies[k].classList.toggle("picked", side === choice);
      replies[k].classList.toggle("broken", isBroken(r, side));
    }
  }
  function paintProgress() {
    var n = countRated();
    var p = document.getElementById("progress");
    p.textContent = "Rated " + n + " of " + total;
    p.classList.toggle("done", n === total);
    document.getElementById("meter-fill").style.width = (total ? (100 * n / total) : 0) + "%";
  }
  function csvField(value) {
    var s = value == null ? "" : String(value);
    if (/[",\r\n]/.test(s) || /^\s|\s$/.test(s)) { s = '"' + s.replace(/"/g, '""') + '"'; }
    return s;
  }
  function csvRow(id) {
    var r = ratings[id] || {};
    var cells = {
      id: id,
      choice: isChoice(r.choice) ? r.choice : "",
      a_broken: isBroken(r, "A") ? "1" : "0",
      b_broken: isBroken(r, "B") ? "1" : "0",
      comment: r.comment || ""
    };
    return columns.map(function (name) { return csvField(cells[name]); }).join(",");
  }
  function buildCsv() {
    var lines = [columns.join(",")];
    for (var i = 0; i < total; i++) { lines.push(csvRow(ids[i])); }
    return lines.join("\r\n") + "\r\n";
  }
  function download() {
    var csv = buildCsv();
    var blob = new Blob([csv], {type: "text/csv;charset=utf-8"});
    var url = URL.createObjectURL(blob);
    var a = document.createElement("a");
    a.href = url;
    a.download = "ratings.csv";
    a.style.display = "none";
    document.body.appendChild(a);
    a.click();
    document.body.removeChild(a);
    setTimeout(function () { URL.revokeObjectURL(url); }, 10000);
    var missing = total - countRated();
    document.getElementById("status").textContent = missing
      ? "Downloaded ratings.csv \u2014 " + missing + " of " + total + " items are still unrated (saved with an empty choice)."
      : "Downloaded ratings.csv with all " + total + " items rated. Thank you!";
  }
  function restoreItem(item, r) {
    var radios = item.querySelectorAll("input[type=radio]");
    for (var k = 0; k < radios.length; k++) { radios[k].checked = radios[k].value === r.choice; }
    var marks = item.querySelectorAll("input.broken");
    for (var m = 0; m < marks.length; m++) { marks[m].checked = isBroken(r, marks[m].value); }
    item.querySelector("input.comment").value = r.comment || "";
  }
  function wireItem(index) {
    var id = ids[index];
    var item = document.getElementById("item-" + index);
    if (ratings[id]) { restoreItem(item, ratings[id]); }
    var radios = item.querySelectorAll("input[type=radio]");
    for (var j = 0; j < radios.length; j++) {
      radios[j].addEventListener("change", function (ev) {
        if (ev.target.checked) { entry(id).choice = ev.target.value; save(); paintItem(index); paintProgress(); }
      });
    }
    var marks = item.querySelectorAll("input.broken");
    for (var m = 0; m < marks.length; m++) {
      marks[m].addEventListener("change", function (ev) {
        if (sides.indexOf(ev.target.value) < 0) { return; }
        entry(id).broken[ev.target.value] = ev.target.checked; save(); paintItem(index);
      });
    }
    var comment = item.querySelector("input.comment");
    comment.addEventListener("input", function () { entry(id).comment = comment.value; save(); });
    paintItem(index);
  }

  load();
  showStorageWarning();
  for (var i = 0; i < total; i++) { wireItem(i); }
  paintProgress();
  document.getElementById("download").addEventListener("click", download);
  // Saved ratings are restored and painted: tools (and tests) wait for this before reading the page.
  document.documentElement.setAttribute("data-sheet-ready", "true");
})();
