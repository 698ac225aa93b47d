"""Framework adapters (Pipecat, LiveKit Agents) that run the engine in-process: they import `realtime/`
(and `models/` through it), never `server/`."""
