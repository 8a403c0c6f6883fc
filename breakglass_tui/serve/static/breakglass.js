// The page's own script (no inline script: the CSP allows only scripts from this server).
document.addEventListener("DOMContentLoaded", () => {
  const restart = document.getElementById("restart");
  if (restart) {
    restart.addEventListener("click", () => window.location.reload());
  }
});
