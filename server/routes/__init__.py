"""HTTP routes that know the engine: offers, push, events, avatars, uploads, text-to-speech."""
