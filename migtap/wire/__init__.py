"""Sans-IO parsers of the QEMU migration stream: no asyncio, sockets, files or logging here."""
