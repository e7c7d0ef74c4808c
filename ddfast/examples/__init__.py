"""Runnable examples (``ddfast distill-digits``)."""
