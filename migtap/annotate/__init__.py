"""Decoding device state with the VMSD JSON (vmdesc)."""
