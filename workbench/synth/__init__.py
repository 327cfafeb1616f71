"""The embedded synthetic archive: a tape-noise simulator with per-device signatures, and synthetic music.

Real users bring their own blank-tape recordings and clean corpus; this package is the workbench's
default on a fresh machine with no downloads, and the test oracle whose truth is known:

- `tape_noise`: what a blank tape sounds like on one registry device at one speed (hiss shaped by
  that speed's playback EQ and wavelength losses, head and amplifier noise, mains hum, rumble,
  modulation noise, dropouts, clicks and a splice), with a stable signature per device;
- `music`: clean, music-like pieces (several timbres, polyphony, dynamics, reverberation, pauses);
- `archive`: a small archive for the demo built from both.
"""
