"""The noise library: blank-tape recordings screened, split and profiled per replay machine and speed.

`profile` measures noise (Welch PSD, level, tilt, bandwidth, mains hum); `screening` finds the usable
stretches of a recording; `ingest` streams recordings into the library; `library` reads it back.
"""
