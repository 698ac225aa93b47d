"""The session timeline: one media clock, input segments, frame planning, audio and video out."""
