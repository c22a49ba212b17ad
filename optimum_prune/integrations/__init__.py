"""Thin layers that give the core the shapes other tools expect (Optimum, ...)."""
