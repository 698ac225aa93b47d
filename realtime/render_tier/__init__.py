"""The render tier: mouth rendering as a service that many front-ends share (see ARCHITECTURE.md).

- `wire.py`: what crosses between a front-end and a replica (mel windows and avatar frame indices in,
  mouth patches out; the avatar travels once per replica, by reference).
- `edf_batcher.py`: a replica's batching of due frames from every front-end, earliest deadline first.
- `replica.py`: one replica: a renderer, the avatars it has prepared, its batcher. No transport.
- `remote_renderer.py`: the front-end side: a `MouthRenderer` whose batches run on the tier.

The transport (Ray Serve) lives in server/ray_render_tier.py; nothing here imports it.
"""
