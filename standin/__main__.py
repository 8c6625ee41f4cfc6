"""`python -m standin`: run the Bitrix24 stand-in on loopback (see docs/standin.md)."""

from .server import main

raise SystemExit(main())
