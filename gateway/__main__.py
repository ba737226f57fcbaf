"""`python -m gateway` is the same as the `iotgw` command."""

from gateway.launch import main

raise SystemExit(main())
