"""Audio features: streaming resample to 16 kHz, mel windows, voice activity."""
