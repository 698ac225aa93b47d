"""Adapters that plug the streaming engine into agent frameworks (Pipecat, LiveKit Agents), running it
in-process: local_engine.py (loading), pipecat.py, livekit.py.

They import `realtime/`, never `server/` (tests/test_integrations_imports.py checks it).
"""
