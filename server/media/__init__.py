"""Media tracks and codecs: the video and audio tracks, encoders, the microphone path, link quality."""
