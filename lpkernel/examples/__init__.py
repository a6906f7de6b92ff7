"""Teaching and demo code: runnable programs built on the library, not part of its core."""
