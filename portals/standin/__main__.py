"""`python -m portals.standin`: run the Bitrix24 stand-in on loopback (see README)."""

from .server import main

raise SystemExit(main())
