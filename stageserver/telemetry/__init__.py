"""What a stage leaves behind for operators: Prometheus metrics (``metrics.py``),
OpenTelemetry traces (``tracing.py``) and a log line (``logs.py``), each a stage
listener. None of them ever records a secret.
"""
