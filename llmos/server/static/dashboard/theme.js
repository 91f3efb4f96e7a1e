// Runs before the page paints: the theme picked last time in this browser, if any
// (otherwise the stylesheet follows prefers-color-scheme).
(function () {
  try {
    var t = localStorage.getItem("llmos.theme");
    if (t === "dark" || t === "light") document.documentElement.dataset.theme = t;
  } catch (e) { /* storage disabled: follow the system */ }
})();
