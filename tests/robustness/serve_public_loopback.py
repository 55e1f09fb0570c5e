"""``caldera`` with one loopback address counted as public, for the robustness tests.

No public host is reachable from a test, so the tests' image server (on a loopback address such
as 127.0.0.3) plays one: a server started through this script without
``--allow-private-media-urls`` fetches from that address only, and judges every other address
(127.0.0.1, ``localhost``, ::1, link-local, private ranges) as it always does. That lets one
server show that redirects from a public host to refused addresses are refused, and how slow
or lying image servers are handled, while refused addresses stay refused.

    python serve_public_loopback.py 127.0.0.3 serve --model DIR ...
"""

from __future__ import annotations

import sys

from caldera.api.cli import main
from caldera.engine import addresses, media


def run(argv: list[str]) -> int:
    public, *args = argv

    def kind(address: object) -> str | None:
        return None if str(address) == public else addresses.private_address_kind(address)

    media.private_address_kind = kind  # the name media's checks look up at each fetch
    return main(args)


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
