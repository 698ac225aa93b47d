"""Access and limits: the one access table, per-address and per-session limits, admission."""
