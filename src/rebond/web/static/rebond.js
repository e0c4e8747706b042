// Rebond: small keyboard helpers; every page works without this file.
document.addEventListener("keydown", function (event) {
  // "/" jumps to the patient search, as in most tools clinicians know
  if (event.key === "/" && !/INPUT|TEXTAREA|SELECT/.test(document.activeElement.tagName)) {
    var box = document.getElementById("q");
    if (box) { event.preventDefault(); box.focus(); box.select(); }
  }
});
