"""The demo: a nanoGPT-style model, a corpus every Python install has, a plain training loop, and
the job behind `inrank-fx demo` (dense vs InRank, export, inference comparison)."""
