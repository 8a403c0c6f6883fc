"""breakglass-tui: a Claude-driven rescue console for a wedged development VM.

Imported first by every process of the project (each console, each tab's app process, the
server), so the one process-wide setting lives here: asyncssh still names the DSA and TripleDES
classes cryptography deprecates, and the ``CryptographyDeprecationWarning`` lines Python prints
for it at import would otherwise land in every tab's stderr (the server's "app stderr" log
lines) and in a terminal before the screen opens. They are about asyncssh's code, not about
anything the console does: nothing here uses DSA or TripleDES.
"""

from __future__ import annotations

import warnings

warnings.filterwarnings(
    "ignore",
    message=r".*(is deprecated|has been moved)",
    module=r"asyncssh(\.|$)",
)


def __getattr__(name: str) -> str:
    # The version from the installed metadata, read only when asked (``--version``): importing
    # importlib.metadata costs every tab's start a few milliseconds otherwise.
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("breakglass-tui")
        except PackageNotFoundError:  # a checkout that was not installed
            return "0+unknown"
    raise AttributeError(name)
