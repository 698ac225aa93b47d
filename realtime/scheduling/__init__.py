"""Render workers shared by sessions: the job queue, the one batching policy, warm-up."""
