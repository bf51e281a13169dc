// trioqueue dashboard: auto-refresh, and dropping a shown flash message from the address.
(function () {
  "use strict";
  var KEY = "trioqueue-dashboard-auto-refresh";
  var url = new URL(window.location.href);
  if (url.searchParams.has("flash")) {
    ["flash", "id", "name", "sig"].forEach(function (k) { url.searchParams.delete(k); });
    window.history.replaceState(null, "", url.toString());
  }
  var box = document.getElementById("auto-refresh");
  if (!box) return;
  try {
    box.checked = window.localStorage.getItem(KEY) !== "off";
  } catch (e) { /* storage disabled: keep the default */ }
  box.addEventListener("change", function () {
    try { window.localStorage.setItem(KEY, box.checked ? "on" : "off"); } catch (e) {}
  });
  var seconds = Number(box.getAttribute("data-interval")) || 5;
  window.setInterval(function () {
    var typing = document.activeElement && /^(INPUT|SELECT|TEXTAREA)$/.test(document.activeElement.tagName)
      && document.activeElement !== box;
    if (box.checked && !document.hidden && !typing) window.location.reload();
  }, seconds * 1000);
})();
