"""Avatars: decoding, face tracking and masks, preparation and its cache, the library of many."""
