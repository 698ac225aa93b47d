"""Adapters that plug the streaming engine into agent frameworks (Pipecat, LiveKit).

They import `realtime/`, never `server/` (tests/test_import_layers.py checks it).
"""
