"""Operations: metrics, logs, loop and heap health, session totals, the worker processes."""
