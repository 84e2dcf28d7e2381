"""Observers of chunks and events: capture files, progress logs."""
