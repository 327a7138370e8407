"""The pieces that make several gateway processes act as one."""
