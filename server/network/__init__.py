"""Deployable WebRTC: ICE servers, screening of offered candidates, UDP port ranges."""
