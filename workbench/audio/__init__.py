"""Audio I/O (soundfile, streamed, atomic) and DSP (torchaudio) shared by every part of the workbench."""
