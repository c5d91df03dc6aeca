"""Offline tools over the engine: ``bench``, ``roofline``, ``calibrate``, ``tune`` (and ``probe``, the
ceilings they measure). Nothing in the engine imports them; they write the tables it reads."""
