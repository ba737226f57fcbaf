"""`python -m gateway` is the same as the `iotgw` command."""

from gateway.cli import main

raise SystemExit(main())
